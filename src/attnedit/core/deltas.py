"""Edits as objects: per-weight deltas that apply, revert bit-exactly, save and load.

A ``WeightEdit`` holds, per parameter name, the delta in the parameter's own layout and dtype. It is
applied with ``param.add_(delta)``: float addition is deterministic, so the same delta added to the
same base weights gives the same bits on any fresh copy of the model, and a saved edit reproduces the
edited model's logits exactly. Revert copies back the original tensors (never subtracts), so it is
bit-exact too. The file records each base parameter's sha256 and refuses a model whose weights differ.

A saved file proves its own integrity: its metadata holds the sha256 of every delta (``delta_hashes``)
and one ``digest`` over all the other metadata, delta hashes included, so neither the tensors nor the
metadata can change (or be swapped between files) unnoticed. ``load`` verifies both and refuses
non-finite deltas (``EditIntegrityError``, naming the file). Files saved before the digests existed
still load; only their finiteness is checked.

The metadata names the model the edit was computed on: its fingerprint (``ModelBundle.fingerprint``) and,
in files saved since it was added, its name as it was loaded (``model_name``; empty in older files, whose
digest does not cover it, so they still verify).

An edit may also CREATE a parameter: the bias of an ``nn.Linear`` module built without one
(Llama, Qwen2 and GPT-J attention output projections, where MEMAT folds its corrections). Its base hash
is ``ABSENT``; applying creates it (zeros plus the delta, in the module weight's dtype and device) and
reverting removes it again, so the model's parameters, ``state_dict`` and ``model_hash`` are the
original ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NotRequired, TypedDict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from attnedit.core.data import EditRequest
from attnedit.core.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "attnedit-edit/1"
ABSENT = "absent"  # the base hash of a parameter the edit creates: the model must not have it


class EditMismatchError(ValueError):
    """The model's weights are not the ones the edit was computed on. ``problem`` is the message without
    the hint that may follow it (``pass check=False ...``), for callers that offer no such choice."""

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem + hint)
        self.problem = problem


class EditIntegrityError(ValueError):
    """A saved edit file is damaged: unreadable, its digests do not verify, or its deltas are not finite."""


def _metadata_digest(meta: dict[str, str]) -> str:
    """sha256 over the metadata (``digest`` itself left out), keys sorted so the order does not matter."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (dtype and shape included)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    # flattened first: a 0-d tensor (GPT-2's masked_bias buffer on transformers 4.x) has no bytes view
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 binding named tensors (names and ``tensor_hash`` of each, in name order): the digest a
    cache file of tensors carries in its metadata."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"{name}:{tensor_hash(tensors[name])};".encode())
    return digest.hexdigest()


def model_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name and bytes): equal before an edit and after revert."""
    digest = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(name.encode())
        digest.update(tensor_hash(tensor).encode())
    return digest.hexdigest()


# JSON objects (hyperparameters, info): written with json.dumps, read back with json.loads
JSONObject = dict[str, Any]


class EditMeta(TypedDict):
    """What a ``WeightEdit`` records besides its deltas and base hashes (``EditBuilder.finish`` takes it)."""

    method: str
    hyperparameters: JSONObject
    requests: list[EditRequest]
    model_fingerprint: NotRequired[str]
    model_name: NotRequired[str]
    info: NotRequired[JSONObject]


@dataclass
class WeightEdit:
    """The weight changes of one edit (one request, or a batch of them); no deltas for method ``none``."""

    deltas: dict[str, torch.Tensor]  # parameter name -> delta (parameter layout and dtype)
    method: str
    hyperparameters: JSONObject
    requests: list[EditRequest]
    # parameter name -> sha256 of the weights the delta was computed on (ABSENT: the edit creates it)
    base_hashes: dict[str, str]
    model_fingerprint: str = ""
    info: JSONObject = field(default_factory=dict)  # optimisation steps, losses...
    model_name: str = ""  # the model's name as loaded (``ModelBundle.name``); "" in files saved before it

    def model_label(self) -> str:
        """The model this edit was computed on, for messages: its name and fingerprint as far as known."""
        name = repr(self.model_name) if self.model_name else "a model"
        return f"{name} (fingerprint {self.model_fingerprint or 'not recorded'})"

    @property
    def created(self) -> list[str]:
        """The parameters this edit creates (biases the model does not have)."""
        return [name for name in self.deltas if self.base_hashes.get(name) == ABSENT]

    def apply(self, model: nn.Module, check: bool = True) -> AppliedEdit:
        """Add the deltas in place (creating the parameters the edit creates); ``check`` refuses
        weights other than the edit's base, and a model that already has a parameter to create."""
        params = dict(model.named_parameters())
        creates = set(self.created)
        missing = [name for name in self.deltas if name not in params and name not in creates]
        if missing:
            raise EditMismatchError(f"the model has no parameter(s) {missing}")
        new: dict[str, nn.Linear] = {}  # the parameters to create, by their owning module
        for name, delta in self.deltas.items():
            shape: tuple[int, ...]
            if name in creates and name not in params:
                new[name] = bias_owner(model, name)
                shape = (new[name].out_features,)
            elif name in creates and check:
                raise EditMismatchError(
                    f"{name} exists in this model, but this edit creates it (the edit of "
                    f"{self.model_label()})",
                    "; pass check=False to add the delta to it",
                )
            else:
                shape = tuple(params[name].shape)
            if tuple(delta.shape) != shape:
                raise EditMismatchError(f"{name}: delta shape {tuple(delta.shape)} != {shape}")
            if check and name not in creates and tensor_hash(params[name]) != self.base_hashes.get(name):
                raise EditMismatchError(
                    f"{name} differs from the weights this edit was computed on (those of "
                    f"{self.model_label()})",
                    "; pass check=False to add it anyway",
                )
        applied = AppliedEdit(self)
        with torch.no_grad():
            for name, delta in self.deltas.items():
                if name in new:
                    applied._create(name, new[name], delta)
                else:
                    applied._add(name, params[name], delta)
        return applied

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the deltas, plus request, method, preset and hashes as metadata (the
        base hashes say which parameters the edit creates), each delta's sha256 and a digest binding them
        (see the module docstring). An edit without deltas saves too."""
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.deltas.items()}
        metadata = {
            "format": FORMAT,
            "method": self.method,
            "hyperparameters": json.dumps(self.hyperparameters),
            "requests": json.dumps([asdict(r) for r in self.requests]),
            "base_hashes": json.dumps(self.base_hashes),
            "model_fingerprint": self.model_fingerprint,
            "info": json.dumps(self.info),
            "delta_hashes": json.dumps({k: tensor_hash(v) for k, v in tensors.items()}),
        }
        if self.model_name:  # only then: an edit without a name saves the metadata it always did
            metadata["model_name"] = self.model_name
        metadata["digest"] = _metadata_digest(metadata)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata))

    @classmethod
    def load(cls, path: str | Path) -> WeightEdit:
        """Read a saved edit, verifying its digests and the finiteness of its deltas
        (``EditIntegrityError`` naming the file otherwise)."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                deltas = {name: fh.get_tensor(name) for name in fh.keys()}
        except SafetensorError as err:  # a damaged header or a truncated file
            raise EditIntegrityError(f"{path}: not a readable edit file ({err})") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an attnedit edit file (format {meta.get('format')!r})")
        _verify(path, meta, deltas)
        try:
            return cls(
                deltas=deltas,
                method=meta["method"],
                hyperparameters=json.loads(meta["hyperparameters"]),
                requests=[EditRequest(**r) for r in json.loads(meta["requests"])],
                base_hashes=json.loads(meta["base_hashes"]),
                model_fingerprint=meta.get("model_fingerprint", ""),
                info=json.loads(meta.get("info", "{}")),
                model_name=meta.get("model_name", ""),
            )
        except (KeyError, TypeError, ValueError) as err:  # only an old, undigested file gets here
            raise EditIntegrityError(f"{path}: damaged edit metadata ({err!r})") from err


def _verify(path: str | Path, meta: dict[str, str], deltas: dict[str, torch.Tensor]) -> None:
    """Check a loaded edit file's digests (when it has them) and that every delta is finite."""
    if "digest" not in meta:
        logger.debug("%s: saved before edit files carried digests; only finiteness is checked", path)
    else:
        if meta["digest"] != _metadata_digest(meta):
            raise EditIntegrityError(f"{path}: the metadata digest does not verify (the file was changed)")
        try:
            expected = json.loads(meta.get("delta_hashes", ""))
        except ValueError:
            expected = None
        if not isinstance(expected, dict) or set(expected) != set(deltas):
            raise EditIntegrityError(f"{path}: the file's deltas are not the ones its metadata lists")
        bad = [name for name, delta in deltas.items() if tensor_hash(delta) != expected[name]]
        if bad:
            raise EditIntegrityError(
                f"{path}: the delta(s) {bad} do not match their sha256 (the file was changed)"
            )
    nonfinite = [name for name, delta in deltas.items() if not torch.isfinite(delta).all()]
    if nonfinite:
        raise EditIntegrityError(f"{path}: the delta(s) {nonfinite} hold non-finite values")


def bias_owner(model: nn.Module, name: str) -> nn.Linear:
    """The module whose missing bias ``name`` (``<module>.bias``) names: an ``nn.Linear`` built without
    one. Raises ``EditMismatchError`` for any other name."""
    module_name, _, kind = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if kind == "bias" else None
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear) or module.bias is not None:
        raise EditMismatchError(
            f"the model has no parameter {name!r}, and it is not the missing bias of a Linear module"
        )
    return module


@dataclass(eq=False)  # an edit in place is itself, not its contents
class AppliedEdit:
    """An edit in place on a model. ``revert()`` restores it bit for bit: copies the original weights
    back and removes the parameters the edit created; it is idempotent.

    As a context manager it reverts on exit (exceptions included), unless ``keep()`` was called: then
    the edit stays, e.g. for sequential editing, where later edits build on it.
    """

    edit: WeightEdit
    # parameter name -> its weights before the edit (for the parameters the edit changes)
    originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)
    _created: dict[str, nn.Linear] = field(default_factory=dict, repr=False)  # name -> owning module
    reverted: bool = False
    kept: bool = False

    def _add(self, name: str, param: nn.Parameter, delta: torch.Tensor) -> None:
        """Add ``delta`` to an existing parameter, keeping its weights for ``revert``."""
        self.originals[name] = param.detach().clone()
        self._params[name] = param
        with torch.no_grad():
            param.add_(delta.to(param.device, param.dtype))

    def _create(self, name: str, module: nn.Linear, delta: torch.Tensor) -> nn.Parameter:
        """Give ``module`` the bias ``name``: zeros plus ``delta``, in its weight's dtype and device."""
        weight = module.weight
        with torch.no_grad():
            bias = torch.zeros(delta.shape, dtype=weight.dtype, device=weight.device)
            bias.add_(delta.to(weight.device, weight.dtype))
        param = nn.Parameter(bias, requires_grad=weight.requires_grad)
        module.bias = param
        self._created[name] = module
        self._params[name] = param
        return param

    def revert(self) -> None:
        """Restore the model as it was before the edit, bit for bit (a second call does nothing)."""
        if self.reverted:
            return
        with torch.no_grad():
            for name, original in self.originals.items():
                self._params[name].copy_(original)
        for module in self._created.values():
            # unregisters it (what ``module.bias = None`` calls): Linear(bias=False) holds a None bias so too
            module.register_parameter("bias", None)
        self.reverted = True

    def keep(self) -> AppliedEdit:
        """Leave the edit in place when the ``with`` block ends (``revert()`` still undoes it)."""
        self.kept = True
        return self

    def __enter__(self) -> AppliedEdit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.kept:
            self.revert()


class EditBuilder:
    """Collects an editor's weight changes, applying each at once (later layers see earlier edits).

    On an exception inside the ``with`` block every change is reverted: the model is left untouched.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = dict(model.named_parameters())
        self.deltas: dict[str, torch.Tensor] = {}
        self.base_hashes: dict[str, str] = {}
        # the changes so far, revertible; ``finish`` gives it its WeightEdit
        self.applied = AppliedEdit(WeightEdit({}, "", {}, [], {}))

    def add(self, name: str, delta: torch.Tensor) -> None:
        """Add ``delta`` (parameter layout; any float dtype) to parameter ``name`` now. ``name`` may be
        the missing bias of an ``nn.Linear`` module (``<module>.bias``): it is created."""
        if name in self.deltas:
            raise ValueError(f"{name} is already changed by this edit")
        if not torch.isfinite(delta).all():
            raise FloatingPointError(f"the update of {name} is not finite; the model is unchanged")
        if name in self.params:
            param = self.params[name]
            cast = delta.to(param.device, param.dtype).contiguous()
            self.base_hashes[name] = tensor_hash(param)
            self.applied._add(name, param, cast)
        else:
            module = bias_owner(self.model, name)
            if tuple(delta.shape) != (module.out_features,):
                raise ValueError(f"{name}: delta shape {tuple(delta.shape)} != ({module.out_features},)")
            cast = delta.to(module.weight.device, module.weight.dtype).contiguous()
            self.base_hashes[name] = ABSENT
            self.params[name] = self.applied._create(name, module, cast)
        self.deltas[name] = cast.cpu()

    def __enter__(self) -> EditBuilder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.applied.revert()

    def finish(self, edit_meta: EditMeta) -> AppliedEdit:
        """The edit made so far, in place, with ``edit_meta`` (method, hyperparameters, requests...)."""
        self.applied.edit = WeightEdit(deltas=self.deltas, base_hashes=self.base_hashes, **edit_meta)
        return self.applied
