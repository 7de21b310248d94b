"""ROME: v* at the MLP output of one layer, k* at the down-projection's input, a rank-one update with C^-1."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from attnedit.core.data import EditCase, EditRequest
from attnedit.core.deltas import AppliedEdit, EditBuilder
from attnedit.core.models import ModelBundle
from attnedit.core.sites import Site
from attnedit.editing.base import (
    EditRequestError,
    LocateParams,
    LocateThenEdit,
    cases_language,
    check_layers,
    edit_metadata,
    method_templates,
    stats_spec,
    target_info,
    target_settings,
    validate_request,
)
from attnedit.editing.covariance import second_moments
from attnedit.editing.losses import LossTerm
from attnedit.editing.optimise import optimise_targets
from attnedit.editing.solvers import rank_one_update, read_at_fact_token
from attnedit.editing.spec import MethodSpec, register


class RomeParams(LocateParams):
    """ROME's parameters: the locate-then-edit ones, with one edit layer."""

    key_mode: Literal["templates", "prompt"] = Field(
        "templates",
        description="templates: k* averaged over the context templates (ROME paper, eq. 2); prompt: the key "
        "of the plain prompt (the official ROME/EasyEdit code)",
    )


@dataclass
class RomeTarget:
    """ROME's k* and v* for one request at its edit layer (``Rome.target``), before the statistics."""

    request: EditRequest
    layer: int
    key: torch.Tensor
    value: torch.Tensor
    info: dict[str, Any]


@dataclass
class Rome(LocateThenEdit):
    """ROME (Meng et al. 2022): one request, one layer's MLP down-projection."""

    params: RomeParams
    terms: list[LossTerm] = field(default_factory=list)
    name: str = "rome"
    preset: str = ""

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """Edit the model in place for one case; the returned edit reverts it exactly."""
        if len(cases) != 1:
            raise EditRequestError("rome edits one request at a time; use --mode sequential for many")
        target = self.target(bundle, cases[0])
        cov = second_moments(bundle, "mlp_down", [target.layer], stats_spec(self.params))[target.layer]
        return self.update(bundle, target, cov)

    def target(self, bundle: ModelBundle, case: EditCase) -> RomeTarget:
        """Everything of the edit but the statistics: k* and v* of the case at the edit layer."""
        p = self.params
        if len(p.layers) != 1:
            raise EditRequestError(f"rome edits one layer, got layers={p.layers}")
        if p.key_mode not in ("templates", "prompt"):
            raise EditRequestError(f"rome: key_mode must be 'templates' or 'prompt', not {p.key_mode!r}")
        layer = p.layers[0]
        check_layers(bundle, p.layers, self.name)
        request = validate_request(bundle, case)
        lang = cases_language([case])
        templates = method_templates(bundle, p, lang)
        injection = Site("mlp", layer)
        settings = target_settings(p, lang)
        result = optimise_targets(bundle, [request], templates, [injection], settings, self.terms)
        keys = read_at_fact_token(bundle, [request], templates, [Site("mlp_down", layer, "input")])
        key_per_template = next(iter(keys.values()))[0]
        key = key_per_template.mean(0) if p.key_mode == "templates" else key_per_template[0]
        return RomeTarget(request, layer, key, result.target(injection)[0], target_info(result))

    def update(self, bundle: ModelBundle, target: RomeTarget, cov: torch.Tensor) -> AppliedEdit:
        """The rank-one update that maps ``target.key`` to ``target.value`` under the key second moments
        ``cov``, applied in place (the returned edit reverts it exactly)."""
        layer = target.layer
        module = bundle.adapter.module(bundle.model, "mlp_down", layer)
        delta = rank_one_update(
            bundle.adapter.weight_view(bundle.model, "mlp_down", layer),
            getattr(module, "bias", None),
            cov,
            target.key,
            target.value,
        )
        with EditBuilder(bundle.model) as builder:
            builder.add(bundle.adapter.weight_name("mlp_down", layer), bundle.adapter.to_weight_layout(delta))
        return builder.finish(edit_metadata(self, bundle, [target.request], target.info))


SPEC = register(
    MethodSpec(
        name="rome",
        summary="ROME: one fact, a rank-one update of one layer's MLP down-projection",
        params=RomeParams,
        build=Rome,
    )
)
