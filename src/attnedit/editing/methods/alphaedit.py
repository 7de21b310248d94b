"""AlphaEdit: MEMIT's targets and keys, each layer's update projected onto the null space of the keys to
preserve (``nullspace``) and solved against the keys of the stream's earlier edits (C_prev).

Per edit layer, lowest first (``Memit.update_layers``):
``Delta^T = (P (K K^T + C_prev) + l2 I)^-1 P K R^T`` (``solvers.projected_update``), with P from the same
cached key second moments MEMIT uses. ``C_prev`` (per layer, zero at first) is the sum of ``K K^T`` of
the earlier groups of a sequential stream, their keys read on the model after their edit
(``after_group``, called by sequential mode); batch and single mode never call it, so every group is
edited against ``C_prev = 0``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field, ValidationInfo, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from attnedit.core.data import EditCase
from attnedit.core.deltas import tensors_digest
from attnedit.core.files import atomic_write
from attnedit.core.models import ModelBundle
from attnedit.core.sites import Site
from attnedit.editing.base import (
    cases_language,
    check_layers,
    method_templates,
    stats_spec,
    validate_request,
)
from attnedit.editing.covariance import second_moments_of
from attnedit.editing.methods.memit import Memit, MemitParams
from attnedit.editing.nullspace import NullspaceRule, RuleName, null_space_projections
from attnedit.editing.solvers import projected_update, read_at_fact_token
from attnedit.editing.spec import MethodSpec, register

logger = logging.getLogger(__name__)

COMPONENT = "mlp_down"


class AlphaEditParams(MemitParams):
    """AlphaEdit's parameters: MEMIT's (targets, keys, statistics), the projection's rule and the ridge;
    MEMIT's lambda is 0 (the projection replaces its ``lambda C`` term)."""

    mom2_update_weight: float = Field(
        0.0, ge=0, le=0, description="MEMIT's lambda: 0 in AlphaEdit (the projection replaces lambda C)"
    )
    nullspace_rule: RuleName = Field(
        "absolute",
        description="which eigen-directions of the key statistics the update may use: 'absolute' "
        "(eigenvalue < threshold, the official rule), 'relative' (< threshold x the largest), "
        "'fraction' (that share of the directions, smallest eigenvalues first)",
    )
    nullspace_threshold: float = Field(
        2e-2, gt=0, description="the rule's number: an eigenvalue bound, a ratio, or a share in (0, 1]"
    )
    l2: float = Field(10.0, gt=0, description="the ridge L2 in (P (K K^T + C_prev) + L2 I)^-1 P K R^T")

    @field_validator("nullspace_threshold")
    @classmethod
    def _share_at_most_one(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("nullspace_rule") == "fraction" and value > 1:
            raise ValueError("the 'fraction' rule keeps a share of the directions: at most 1")
        return value


class StateIntegrityError(ValueError):
    """A saved AlphaEdit state that does not load or verify, or belongs to other settings."""


@dataclass
class AlphaEdit(Memit):
    """AlphaEdit (Fang et al. 2025): MEMIT whose updates are projected onto the null space of the
    preserved keys, with the keys of a stream's earlier edits (``prior``: C_prev per layer, float64)."""

    params: AlphaEditParams
    name: str = "alphaedit"
    prior: dict[int, torch.Tensor] = field(default_factory=dict)
    streamed: int = 0  # requests whose keys are in ``prior``

    def rule(self) -> NullspaceRule:
        """The projection's rule from the parameters."""
        return NullspaceRule(self.params.nullspace_rule, self.params.nullspace_threshold)

    def _layer_matrices(
        self, bundle: ModelBundle, layers: list[int]
    ) -> tuple[dict[int, torch.Tensor], float]:
        projections = null_space_projections(bundle, COMPONENT, layers, stats_spec(self.params), self.rule())
        return projections, self.params.l2

    def _layer_update(
        self, layer: int, matrix: torch.Tensor, keys: torch.Tensor, residual: torch.Tensor, weight: float
    ) -> torch.Tensor:
        return projected_update(matrix, keys, residual, self.prior.get(layer), weight)

    def prepare(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """MEMIT's one-time work (templates, statistics) and the projections from those statistics."""
        method_templates(bundle, self.params, cases_language(cases))
        second_moments_of(bundle, self.statistics(), stats_spec(self.params))
        null_space_projections(
            bundle, COMPONENT, sorted(self.params.layers), stats_spec(self.params), self.rule()
        )

    # -- the stream's state ------------------------------------------------------------------------------

    def after_group(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """Add ``K K^T`` of ``cases`` (their keys at every edit layer, read on the model as it is now, the
        group's edit in place) to ``prior``: the next groups of the stream are solved against them."""
        p = self.params
        layers = sorted(p.layers)
        check_layers(bundle, layers, self.name)
        requests = [validate_request(bundle, case) for case in cases]
        templates = method_templates(bundle, p, cases_language(cases))
        reads = [Site(COMPONENT, layer, "input") for layer in layers]
        found = read_at_fact_token(bundle, requests, templates, reads)
        for layer, read in zip(layers, reads, strict=True):
            keys = found[read].mean(1).double()
            gram = keys.T @ keys
            self.prior[layer] = gram if layer not in self.prior else self.prior[layer] + gram
        self.streamed += len(requests)

    def reset_state(self) -> None:
        """Forget the stream (``C_prev = 0``)."""
        self.prior = {}
        self.streamed = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stream's state: ``prior.LAYER`` (C_prev of each layer, float64) and ``streamed``."""
        state = {f"prior.{layer}": tensor for layer, tensor in sorted(self.prior.items())}
        return {**state, "streamed": torch.tensor([self.streamed])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take a ``state_dict``'s state; one of other edit layers is a ``StateIntegrityError``."""
        prior: dict[int, torch.Tensor] = {}
        for name, tensor in state.items():
            if name == "streamed":
                continue
            layer = int(name.removeprefix("prior.")) if name.removeprefix("prior.").isdigit() else -1
            if not name.startswith("prior.") or layer not in self.params.layers:
                raise StateIntegrityError(
                    f"state entry {name!r}: not C_prev of an edit layer {sorted(self.params.layers)}"
                )
            if tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
                raise StateIntegrityError(f"AlphaEdit state entry {name!r} is not a square matrix")
            prior[layer] = tensor.double()
        self.prior = prior
        self.streamed = int(state["streamed"].item()) if "streamed" in state else 0

    def save_state(self, path: str | Path) -> Path:
        """Write the state to ``path`` (safetensors with the sha256 of its tensors), atomically."""
        tensors = {name: tensor.contiguous() for name, tensor in self.state_dict().items()}
        meta = {
            "sha256": tensors_digest(tensors),
            "method": "alphaedit",
            "layers": json.dumps(sorted(self.params.layers)),
        }
        return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), meta))

    def load_state(self, path: str | Path) -> None:
        """Read a state written by ``save_state``; a file that does not load or verify, or was written for
        other edit layers, is a ``StateIntegrityError`` (the state is then unchanged)."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors: dict[str, torch.Tensor] = {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError) as err:
            raise StateIntegrityError(f"AlphaEdit state {path} does not load: {err}") from None
        if meta.get("method") != "alphaedit" or meta.get("sha256") != tensors_digest(tensors):
            raise StateIntegrityError(f"AlphaEdit state {path} does not verify against its digest")
        layers = json.dumps(sorted(self.params.layers))
        if meta.get("layers") != layers:
            raise StateIntegrityError(
                f"AlphaEdit state {path} is of edit layers {meta.get('layers')}, not {layers}"
            )
        self.load_state_dict(tensors)


SPEC = register(
    MethodSpec(
        name="alphaedit",
        summary="AlphaEdit: MEMIT with updates projected onto the null space of preserved keys",
        params=AlphaEditParams,
        build=AlphaEdit,
    )
)
