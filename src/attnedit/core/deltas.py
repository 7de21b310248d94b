"""Edits as objects: per-weight deltas that apply, revert bit-exactly, save and load.

A ``WeightEdit`` holds, per parameter name, the delta in the parameter's own layout and dtype. It is
applied with ``param.add_(delta)``: float addition is deterministic, so the same delta added to the
same base weights gives the same bits on any fresh copy of the model, and a saved edit reproduces the
edited model's logits exactly. Revert copies back the original tensors (never subtracts), so it is
bit-exact too. The file records each base parameter's sha256 and refuses a model whose weights differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from attnedit.core.data import EditRequest

FORMAT = "attnedit-edit/1"


class EditMismatchError(ValueError):
    """The model's weights are not the ones the edit was computed on."""


def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (dtype and shape included)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    # flattened first: a 0-d tensor (GPT-2's masked_bias buffer on transformers 4.x) has no bytes view
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name and bytes): equal before an edit and after revert."""
    digest = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(name.encode())
        digest.update(tensor_hash(tensor).encode())
    return digest.hexdigest()


@dataclass
class WeightEdit:
    """The weight changes of one edit (one request, or a batch of them)."""

    deltas: dict[str, torch.Tensor]  # parameter name -> delta (parameter layout and dtype)
    method: str
    hyperparameters: dict
    requests: list[EditRequest]
    base_hashes: dict[str, str]  # parameter name -> sha256 of the weights the delta was computed on
    model_fingerprint: str = ""
    info: dict = field(default_factory=dict)  # optimisation steps, losses...

    def apply(self, model: nn.Module, check: bool = True) -> AppliedEdit:
        """Add the deltas in place; ``check`` refuses weights other than the edit's base."""
        params = dict(model.named_parameters())
        missing = [name for name in self.deltas if name not in params]
        if missing:
            raise EditMismatchError(f"the model has no parameter(s) {missing}")
        for name, delta in self.deltas.items():
            if params[name].shape != delta.shape:
                raise EditMismatchError(
                    f"{name}: delta shape {tuple(delta.shape)} != {tuple(params[name].shape)}"
                )
            if check and tensor_hash(params[name]) != self.base_hashes.get(name):
                raise EditMismatchError(
                    f"{name} differs from the weights this edit was computed on "
                    f"(model fingerprint {self.model_fingerprint!r}); pass check=False to add it anyway"
                )
        applied = AppliedEdit(self, {name: params[name].detach().clone() for name in self.deltas}, params)
        with torch.no_grad():
            for name, delta in self.deltas.items():
                params[name].add_(delta.to(params[name].device, params[name].dtype))
        return applied

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the deltas, plus request, method, preset and hashes as metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": FORMAT,
            "method": self.method,
            "hyperparameters": json.dumps(self.hyperparameters),
            "requests": json.dumps([asdict(r) for r in self.requests]),
            "base_hashes": json.dumps(self.base_hashes),
            "model_fingerprint": self.model_fingerprint,
            "info": json.dumps(self.info),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.deltas.items()}, str(tmp), metadata)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> WeightEdit:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an attnedit edit file (format {meta.get('format')!r})")
            deltas = {name: fh.get_tensor(name) for name in fh.keys()}
        return cls(
            deltas=deltas,
            method=meta["method"],
            hyperparameters=json.loads(meta["hyperparameters"]),
            requests=[EditRequest(**r) for r in json.loads(meta["requests"])],
            base_hashes=json.loads(meta["base_hashes"]),
            model_fingerprint=meta.get("model_fingerprint", ""),
            info=json.loads(meta.get("info", "{}")),
        )


@dataclass
class AppliedEdit:
    """An edit in place on a model; ``revert()`` copies the original weights back."""

    edit: WeightEdit
    originals: dict[str, torch.Tensor]
    _params: dict[str, nn.Parameter]
    reverted: bool = False

    def revert(self) -> None:
        if self.reverted:
            return
        with torch.no_grad():
            for name, original in self.originals.items():
                self._params[name].copy_(original)
        self.reverted = True


class EditBuilder:
    """Collects an editor's weight changes, applying each at once (later layers see earlier edits).

    On an exception inside the ``with`` block every change is reverted: the model is left untouched.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = dict(model.named_parameters())
        self.deltas: dict[str, torch.Tensor] = {}
        self.base_hashes: dict[str, str] = {}
        self.originals: dict[str, torch.Tensor] = {}

    def add(self, name: str, delta: torch.Tensor) -> None:
        """Add ``delta`` (parameter layout; any float dtype) to parameter ``name`` now."""
        if name in self.deltas:
            raise ValueError(f"{name} is already changed by this edit")
        param = self.params[name]
        if not torch.isfinite(delta).all():
            raise FloatingPointError(f"the update of {name} is not finite; the model is unchanged")
        cast = delta.to(param.device, param.dtype).contiguous()
        self.base_hashes[name] = tensor_hash(param)
        self.originals[name] = param.detach().clone()
        with torch.no_grad():
            param.add_(cast)
        self.deltas[name] = cast.cpu()

    def __enter__(self) -> EditBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            with torch.no_grad():
                for name, original in self.originals.items():
                    self.params[name].copy_(original)

    def finish(self, edit_meta: dict) -> AppliedEdit:
        edit = WeightEdit(deltas=self.deltas, base_hashes=self.base_hashes, **edit_meta)
        return AppliedEdit(edit, self.originals, self.params)
