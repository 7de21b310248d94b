"""MEMIT: z at the residual stream after the last edit layer, spread over the edit layers in ascending
order with least squares, keys recomputed per layer (each layer sees the updates below it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field

from attnedit.core.data import EditCase, EditRequest
from attnedit.core.deltas import AppliedEdit, EditBuilder
from attnedit.core.models import ModelBundle
from attnedit.core.sites import Site
from attnedit.editing.base import (
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
from attnedit.editing.optimise import TargetResult, optimise_targets
from attnedit.editing.presets import Templates
from attnedit.editing.solvers import least_squares_update, read_at_fact_token
from attnedit.editing.spec import MethodSpec, register


class MemitParams(LocateParams):
    """MEMIT's parameters: the locate-then-edit ones, the defaults of MEMIT's reference hparams, and the
    weight of the statistics in the least squares."""

    clamp_norm_factor: float = Field(0.75, gt=0, description="the delta's norm bound, times the target's")
    templates: Templates = Field(
        default_factory=lambda: [[10, 5]], description="context templates: [[length, count], ...]"
    )
    mom2_update_weight: float = Field(
        15000.0, ge=0, description="lambda in Delta = R K^T (lambda C + K K^T)^-1"
    )


@dataclass
class Memit(LocateThenEdit):
    """MEMIT (Meng et al. 2023): many requests at once over several layers' MLP down-projections.

    Subclasses change where the targets are optimised (``_injections``; the last one is the target),
    where the target's current value is read (``_target_read``) and the share of the remaining residual
    each layer takes (``_spread``)."""

    params: MemitParams
    terms: list[LossTerm] = field(default_factory=list)
    name: str = "memit"
    preset: str = ""

    def _injections(self) -> list[Site]:
        return [Site("layer", self.params.layers[-1])]

    def _target_read(self) -> Site:
        """Where the current value of the target is read (MEMIT: the residual after the last layer)."""
        return Site("layer", self.params.layers[-1], "output")

    def _spread(self, remaining: int) -> float:
        return 1.0 / remaining

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """Edit the model in place for all cases together; the returned edit reverts it exactly."""
        with EditBuilder(bundle.model) as builder:
            requests, info = self.edit_mlp(builder, bundle, cases)
        return builder.finish(edit_metadata(self, bundle, requests, info))

    def edit_mlp(
        self, builder: EditBuilder, bundle: ModelBundle, cases: list[EditCase]
    ) -> tuple[list[EditRequest], dict[str, Any]]:
        """MEMIT's MLP updates, added to ``builder`` (in place, layer by layer); the requests and the
        target optimisation's record."""
        p = self.params
        layers = sorted(p.layers)
        check_layers(bundle, layers, self.name)
        requests = [validate_request(bundle, case) for case in cases]
        lang = cases_language(cases)
        templates = method_templates(bundle, p, lang)
        covs, weight = self._layer_matrices(bundle, layers)
        result = self.optimise(bundle, requests, templates, lang)
        # the MLP part for PMET, the whole residual for MEMIT
        targets = result.target(self._injections()[-1])
        self.update_layers(builder, bundle, requests, templates, targets, "mlp_down", layers, covs, weight)
        return requests, target_info(result)

    def _layer_matrices(
        self, bundle: ModelBundle, layers: list[int]
    ) -> tuple[dict[int, torch.Tensor], float]:
        """The per-layer matrices and the weight ``_layer_update`` takes for the MLP down-projections:
        MEMIT's key second moments and lambda (AlphaEdit: its projections and ridge)."""
        return second_moments(
            bundle, "mlp_down", layers, stats_spec(self.params)
        ), self.params.mom2_update_weight

    def optimise(
        self, bundle: ModelBundle, requests: list[EditRequest], templates: list[str], lang: str
    ) -> TargetResult:
        """The target optimisation at the method's injections (with the extra loss terms)."""
        return optimise_targets(
            bundle,
            requests,
            templates,
            self._injections(),
            target_settings(self.params, lang),
            self.terms,
            progress=len(requests) > 50,
        )

    def _layer_update(
        self, layer: int, matrix: torch.Tensor, keys: torch.Tensor, residual: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """One layer's update [out, in] from its keys and residual: MEMIT's least squares under
        ``weight`` times the second moments ``matrix`` (AlphaEdit: its projected update)."""
        return least_squares_update(matrix, keys, residual, weight)

    def update_layers(
        self,
        builder: EditBuilder,
        bundle: ModelBundle,
        requests: list[EditRequest],
        templates: list[str],
        targets: torch.Tensor,
        component: str,
        layers: list[int],
        covs: dict[int, torch.Tensor],
        weight: float,
    ) -> dict[str, torch.Tensor]:
        """MEMIT's layer loop over ``component``'s weight at ``layers`` (ascending): per layer, the keys
        (the component's input at the fact token, mean over templates) and the remaining residual
        ``targets - current`` (read at ``_target_read``, share ``_spread``), the least-squares update with
        ``covs`` and lambda ``weight`` (``_layer_update``), added to ``builder`` at once (so later layers
        see it).

        Returns each update as added: ``{parameter name: delta}`` (float64, parameter layout)."""
        deltas: dict[str, torch.Tensor] = {}
        target_read = self._target_read()
        for i, layer in enumerate(layers):
            key_read = Site(component, layer, "input")
            found = read_at_fact_token(bundle, requests, templates, [key_read, target_read])
            keys = found[key_read].mean(1)
            current = found[target_read][:, 0]
            residual = (targets - current) * self._spread(len(layers) - i)
            delta = self._layer_update(layer, covs[layer], keys, residual, weight)
            name = bundle.adapter.weight_name(component, layer)
            deltas[name] = bundle.adapter.to_weight_layout(delta)
            builder.add(name, deltas[name])
        return deltas


SPEC = register(
    MethodSpec(
        name="memit",
        summary="MEMIT: many facts at once, least squares over several layers' MLP down-projections",
        params=MemitParams,
        build=Memit,
    )
)
