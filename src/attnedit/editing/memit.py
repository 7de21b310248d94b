"""MEMIT: z at the residual stream after the last edit layer, spread over the edit layers in ascending
order with least squares, keys recomputed per layer (each layer sees the updates below it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnedit.core.data import EditCase, EditRequest
from attnedit.core.deltas import AppliedEdit, EditBuilder
from attnedit.core.models import ModelBundle
from attnedit.core.sites import Site
from attnedit.editing.base import (
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
from attnedit.editing.optimise import LossTerm, optimise_targets
from attnedit.editing.presets import MemitParams
from attnedit.editing.solvers import least_squares_update, read_at_fact_token


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
    ) -> tuple[list[EditRequest], dict]:
        """MEMIT's MLP updates, added to ``builder`` (in place, layer by layer); the requests and the
        target optimisation's record."""
        p = self.params
        layers = sorted(p.layers)
        check_layers(bundle, layers, self.name)
        requests = [validate_request(bundle, case) for case in cases]
        lang = cases_language(cases)
        templates = method_templates(bundle, p, lang)
        covs = second_moments(bundle, "mlp_down", layers, stats_spec(p))
        injections = self._injections()
        result = optimise_targets(
            bundle,
            requests,
            templates,
            injections,
            target_settings(p, lang),
            self.terms,
            progress=len(requests) > 50,
        )
        # the MLP part for PMET, the whole residual for MEMIT
        targets = result.target(injections[-1])
        for i, layer in enumerate(layers):
            key_read = Site("mlp_down", layer, "input")
            found = read_at_fact_token(bundle, requests, templates, [key_read, self._target_read()])
            keys = found[key_read].mean(1)
            current = found[self._target_read()][:, 0]
            residual = (targets - current) * self._spread(len(layers) - i)
            delta = least_squares_update(covs[layer], keys, residual, p.mom2_update_weight)
            builder.add(bundle.adapter.weight_name("mlp_down", layer), bundle.adapter.to_weight_layout(delta))
        return requests, target_info(result)
