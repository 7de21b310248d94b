"""IntAttn-Edit: MEMIT's least squares applied to the MLP down-projections AND to the attention output
projections W_o, the two families of updates weighted (1 - alpha) and alpha.

Our reading of the paper (no code was released; docs/methods.md, "IntAttn-Edit", lists our choices):

1. One target z per request at the residual output of the last MLP edit layer (MEMIT's target and
   injection; ``+sadr`` adds SADR's term to this optimisation).
2. Second moments of the inputs of ``mlp_down`` at the MLP layers and of ``attn_o`` at the attention
   layers, in one corpus pass when both are missing.
3. MEMIT's layer loop (``Memit.update_layers``) over the MLP layers gives D_mlp; independently, from the
   unedited model, the same loop over the attention layers' W_o (key: the input of W_o at the subject's
   last token, i.e. the concatenated head outputs; current: the residual at MEMIT's read site; the same
   z) gives D_attn. Each loop applies its deltas as it goes (later layers see earlier ones), so each runs
   on a scratch edit that is reverted before the other.
4. The edit is ``(1 - alpha) D_mlp + alpha D_attn``, one revertible ``WeightEdit``. Computing both
   families apart and scaling afterwards is the only reading in which alpha sets each module's share.
   alpha = 0 is MEMIT bit for bit (the attention pass is skipped and 1.0 x D_mlp is exact); alpha = 1
   changes only W_o.

``alpha="trace"``: causal tracing (``analysis.tracing``) of the first ``trace_cases`` requests of the
batch on the unedited model, logit measure (the paper's logit difference), one layer per restoration;
alpha = sum of the attention layers' effects / (that + sum of the MLP layers' effects), effects at the
subject's last token averaged over the traced requests.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from attnedit.analysis.tracing import subject_last_effects
from attnedit.core.data import EditCase, EditRequest
from attnedit.core.deltas import AppliedEdit, EditBuilder
from attnedit.core.models import ModelBundle
from attnedit.editing.base import (
    EditRequestError,
    cases_language,
    check_layers,
    edit_metadata,
    method_templates,
    stats_spec,
    target_info,
    validate_request,
)
from attnedit.editing.covariance import second_moments_of
from attnedit.editing.losses import LossTerm
from attnedit.editing.methods.memit import Memit, MemitParams
from attnedit.editing.presets import Layers
from attnedit.editing.spec import MethodSpec, register

logger = logging.getLogger(__name__)

TRACE_MEASURE = "logit"  # the paper's "logit difference": restored minus corrupted logit of the target


def _share(value: float | str) -> float | str:
    if isinstance(value, str):
        if value != "trace":
            raise PydanticCustomError("share", "expected a number in [0, 1] or one of ('trace',)")
        return value
    if not 0 <= value <= 1:
        raise PydanticCustomError("share", "must be >= 0" if value < 0 else "must be <= 1")
    return value


class IntAttnParams(MemitParams):
    """MEMIT's parameters (``layers``: the MLP edit layers; the target z is read after the last one) plus
    the attention output projections IntAttn-Edit also rewrites and the share ``alpha`` they get."""

    attn_layers: Layers = Field(
        default_factory=lambda: [2, 3, 4],
        description="the attention output projections W_o rewritten (the paper's 2-4), none above the last "
        "MLP layer",
    )
    alpha: Annotated[float | str, AfterValidator(_share)] = Field(
        0.3, description="in [0, 1]: W_o gets alpha of its update, the MLPs 1 - alpha; or 'trace'"
    )
    attn_mom2_update_weight: float | None = Field(
        None, ge=0, description="lambda of the W_o least squares; null: mom2_update_weight"
    )
    trace_cases: int = Field(
        10, ge=1, description="alpha='trace': the first this many requests of a batch are causally traced"
    )

    @model_validator(mode="after")
    def _attn_lambda(self) -> IntAttnParams:
        if self.attn_mom2_update_weight is None:
            self.attn_mom2_update_weight = self.mom2_update_weight
        return self


@dataclass
class AlphaChoice:
    """The share of the W_o updates for one batch and how it was found (``trace``: the traced effects)."""

    alpha: float
    source: str  # "fixed" | "trace"
    trace: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """What the edit's info records."""
        return {"alpha": self.alpha, "alpha_source": self.source, "trace": self.trace}


def traced_alpha(
    bundle: ModelBundle, requests: list[EditRequest], mlp_layers: list[int], attn_layers: list[int]
) -> AlphaChoice:
    """alpha from causal tracing of ``requests`` (the stored fact, ``target_true``) on the model as it is."""
    attn = np.zeros(len(attn_layers))
    mlp = np.zeros(len(mlp_layers))
    for req in requests:
        # only the subject's last token of the edit layers is restored: the effects alpha needs, not the
        # whole (layer, token) grid of a causal trace
        effects, _ = subject_last_effects(
            bundle,
            req.prompt,
            req.subject,
            req.target_true,
            {"attn": attn_layers, "mlp": mlp_layers},
            measure=TRACE_MEASURE,
        )
        attn += effects["attn"]
        mlp += effects["mlp"]
    attn /= len(requests)
    mlp /= len(requests)
    # a negative total effect (restoring the module lowers the target's logit on average) is no share of
    # the fact's storage: clipped at 0 so that alpha stays in [0, 1]
    attn_total = max(float(attn.sum()), 0.0)
    mlp_total = max(float(mlp.sum()), 0.0)
    if attn_total + mlp_total > 0:
        alpha = attn_total / (attn_total + mlp_total)
    else:
        logger.warning("intattn: no positive traced effect in the edit layers; alpha = 0 (MEMIT)")
        alpha = 0.0
    record = {
        "cases": len(requests),
        "measure": TRACE_MEASURE,
        "attn_effects": attn.round(6).tolist(),
        "mlp_effects": mlp.round(6).tolist(),
        "attn_total": attn_total,
        "mlp_total": mlp_total,
    }
    return AlphaChoice(alpha, "trace", record)


def _norm(deltas: dict[str, torch.Tensor], share: float = 1.0) -> float:
    """The Frobenius norm of a family of updates (all its matrices together), times ``share``."""
    return share * math.sqrt(sum(float(d.double().pow(2).sum()) for d in deltas.values()))


@dataclass
class FamilyUpdates:
    """Each family's full update (float64, by weight name) from the unedited model, and how it was found."""

    requests: list[EditRequest]
    updates: dict[str, dict[str, torch.Tensor]]  # "mlp_down" / "attn_o" -> weight name -> delta
    choice: AlphaChoice
    info: dict[str, Any]  # the target optimisation's record
    seconds: dict[str, float]


@dataclass
class IntAttn(Memit):
    """IntAttn-Edit (module docstring): MEMIT's updates of the MLPs and of W_o, mixed by alpha."""

    params: IntAttnParams
    terms: list[LossTerm] = field(default_factory=list)
    name: str = "intattn"
    preset: str = ""

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """Edit the model in place for all cases together; the returned edit reverts it exactly."""
        found = self.family_updates(bundle, cases)
        alpha = found.choice.alpha
        with EditBuilder(bundle.model) as builder:
            mix(builder, found.updates, alpha)
        info = {
            **found.info,
            "intattn": {
                **found.choice.describe(),
                "mlp_layers": sorted(self.params.layers),
                "attn_layers": sorted(self.params.attn_layers),
                "seconds": found.seconds,
                # the norms of each family's update as computed and as applied (times its share)
                "update_norms": {
                    FAMILIES[c]: {
                        "computed": _norm(found.updates[c]),
                        "applied": _norm(found.updates[c], share),
                    }
                    for c, share in shares(alpha).items()
                    if c in found.updates
                },
            },
        }
        logger.info(
            "intattn: alpha %.4f (%s); update norms %s",
            alpha,
            found.choice.source,
            info["intattn"]["update_norms"],
        )
        return builder.finish(edit_metadata(self, bundle, found.requests, info))

    def statistics(self) -> dict[str, list[int]]:
        """The second moments of the families the edits update (both when alpha is traced per batch)."""
        return self._families(None if self.params.alpha == "trace" else float(self.params.alpha))

    def _families(self, alpha: float | None, both: bool = False) -> dict[str, list[int]]:
        """``{component: layers}`` of the families updated at ``alpha`` (None: not known yet, both). A
        family with no share is not computed at all: alpha = 0 is MEMIT, alpha = 1 touches only W_o."""
        wanted = {}
        if alpha is None or alpha < 1 or both:
            wanted["mlp_down"] = sorted(self.params.layers)
        if alpha is None or alpha > 0 or both:
            wanted["attn_o"] = sorted(self.params.attn_layers)
        return wanted

    def family_updates(self, bundle: ModelBundle, cases: list[EditCase], both: bool = False) -> FamilyUpdates:
        """Steps 1-3 (module docstring): alpha, statistics, the target, and each family's full update from
        the unedited model (the model is left as it was). A family with no share is not computed, unless
        ``both`` (the alpha sweep mixes the same two families at many alphas)."""
        p = self.params
        mlp_layers, attn_layers = sorted(p.layers), sorted(p.attn_layers)
        check_layers(bundle, mlp_layers, self.name)
        check_layers(bundle, attn_layers, self.name)
        if attn_layers[-1] > mlp_layers[-1]:
            # W_o above the read site cannot move the residual the target is read from
            raise EditRequestError(
                f"{self.name}: attention layer(s) {[a for a in attn_layers if a > mlp_layers[-1]]} are above "
                f"the last MLP layer {mlp_layers[-1]}, where the target is read"
            )
        requests = [validate_request(bundle, case) for case in cases]
        lang = cases_language(cases)
        templates = method_templates(bundle, p, lang)
        seconds: dict[str, float] = {}

        t0 = time.perf_counter()
        if p.alpha == "trace":
            choice = traced_alpha(bundle, requests[: p.trace_cases], mlp_layers, attn_layers)
            seconds["trace"] = time.perf_counter() - t0
        else:
            choice = AlphaChoice(float(p.alpha), "fixed")
        wanted = self._families(choice.alpha, both)

        t0 = time.perf_counter()
        covs = second_moments_of(bundle, wanted, stats_spec(p))
        seconds["stats"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = self.optimise(bundle, requests, templates, lang)
        targets = result.target(self._injections()[-1])
        seconds["targets"] = time.perf_counter() - t0

        updates: dict[str, dict[str, torch.Tensor]] = {}
        attn_weight = p.attn_mom2_update_weight
        assert attn_weight is not None  # IntAttnParams' validator fills it in
        weights = {"mlp_down": p.mom2_update_weight, "attn_o": attn_weight}
        for component, layers in wanted.items():
            t0 = time.perf_counter()
            # each family from the unedited model: its loop runs on a scratch edit, reverted at once
            loop = (requests, templates, targets, component, layers, covs[component], weights[component])
            with EditBuilder(bundle.model) as scratch:
                updates[component] = self.update_layers(scratch, bundle, *loop)
            scratch.applied.revert()
            seconds["mlp_loop" if component == "mlp_down" else "attn_loop"] = time.perf_counter() - t0
        return FamilyUpdates(requests, updates, choice, target_info(result), seconds)


FAMILIES = {"mlp_down": "mlp", "attn_o": "attn"}


def shares(alpha: float) -> dict[str, float]:
    """Each family's share of its own update: the MLPs 1 - alpha, W_o alpha."""
    return {"mlp_down": 1.0 - alpha, "attn_o": alpha}


def mix(builder: EditBuilder, updates: dict[str, dict[str, torch.Tensor]], alpha: float) -> None:
    """Add ``(1 - alpha) D_mlp + alpha D_attn`` to ``builder`` (a family with no share is left out)."""
    for component, share in shares(alpha).items():
        if share == 0 or component not in updates:
            continue
        for name, delta in updates[component].items():
            # float64 before the cast to the weights' dtype; a share of 1.0 is exact (MEMIT)
            builder.add(name, delta * share)


SPEC = register(
    MethodSpec(
        name="intattn",
        summary="IntAttn-Edit: MEMIT's least squares on the MLPs and on the attention output projections "
        "together, mixed by alpha",
        params=IntAttnParams,
        build=IntAttn,
    )
)
