"""What the editing methods share: request checks, settings from parameters, the edit's metadata.

One module per method, each a short composition of the shared blocks (``optimise``, ``solvers``,
``covariance``):

- ``rome``: v* at the MLP output of one layer (``optimise``), k* (``solvers.read_at_fact_token``),
  rank-one update of the MLP down-projection with C^-1 (``solvers.rank_one_update``).
- ``memit``: z at the residual stream after the last edit layer, spread over the edit layers in
  ascending order with least squares (``solvers.least_squares_update``), keys recomputed per layer.
- ``pmet``: deltas at the attention and MLP outputs of the last edit layer; only the MLP part is the
  target, spread with weight 1/sqrt(L - l) over the MLP down-projections as MEMIT does.
- ``ft``: constrained fine-tuning of one down-projection (L-infinity bound), the standard baseline.

Every editor returns an ``AppliedEdit`` whose ``.edit`` is a saveable ``WeightEdit``; any failure
(bad request, non-finite loss or update) leaves the model untouched. ``terms`` are extra loss terms
added to the target optimisation (SADR plugs in there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from attnedit.core.data import EditCase, EditRequest
from attnedit.core.deltas import EditMeta
from attnedit.core.models import ModelBundle
from attnedit.core.tokens import SubjectNotFoundError, locate_subject
from attnedit.editing.covariance import StatsSpec, second_moments_of
from attnedit.editing.losses import LossTerm
from attnedit.editing.optimise import TargetResult, TargetSettings
from attnedit.editing.presets import Layers, Params, Templates, Text, params_dict
from attnedit.editing.spec import Editor
from attnedit.editing.templates import TemplateSpec, context_templates, language


class LocateParams(Params):
    """Shared by ROME, MEMIT and PMET (names as in the reference hparams files)."""

    layers: Layers = Field(description="edited layers (ROME: one); the target is read at the last one")
    lr: float = Field(0.5, gt=0, description="learning rate of the target optimisation (v_lr)")
    steps: int = Field(20, ge=1, description="steps of the target optimisation (v_num_grad_steps)")
    kl_factor: float = Field(0.0625, ge=0, description="weight of the KL term on the 'is a' prompts")
    weight_decay: float = Field(0.5, ge=0, description="weight decay of the optimised delta (v_weight_decay)")
    clamp_norm_factor: float = Field(4.0, gt=0, description="the delta's norm clamp, times the target's norm")
    early_stop_loss: float = Field(0.05, ge=0, description="stop once the new target's NLL is below this")
    templates: Templates = Field(
        default_factory=lambda: [[5, 10], [10, 10]], description="context templates: [[length, count], ...]"
    )
    template_seed: int = Field(0, description="seed of the context-template sampling")
    stats_corpus: Text = Field(
        "model", description="second-moment corpus: a text file, hf:NAME, or 'model' (sampled from the model)"
    )
    stats_samples: int = Field(1000, ge=1, description="texts in the second-moment statistics")
    stats_max_tokens: int = Field(128, ge=1, description="tokens per statistics text")
    max_rows: int = Field(256, ge=1, description="optimisation rows per group (a memory bound)")
    target_matmul: Literal["model", "bfloat16"] = Field(
        "model",
        description="the target optimisation's matrix products: in the model's dtype, or bfloat16 (weights "
        "cast once; norms, attention, losses and the delta keep their precision)",
    )


class EditRequestError(ValueError):
    """A request that cannot be edited (names the case and the field)."""


def validate_request(bundle: ModelBundle, case: EditCase) -> EditRequest:
    """Check a case's request before any weight is touched."""
    req = case.request
    where = f"case {case.case_id}"
    for name in ("target_new", "target_true", "subject"):
        value = getattr(req, name)
        if not isinstance(value, str) or not value.strip():
            raise EditRequestError(f"{where}: requested_rewrite.{name} is empty")
    if req.target_new.strip().lower() == req.target_true.strip().lower():
        raise EditRequestError(
            f"{where}: target_new equals target_true ({req.target_new!r}): nothing to edit"
        )
    try:
        locate_subject(bundle.tokenizer, req.prompt, req.subject)
    except SubjectNotFoundError as err:
        raise EditRequestError(f"{where}: requested_rewrite.subject: {err}") from None
    return req


def check_layers(bundle: ModelBundle, layers: Sequence[int], method: str) -> None:
    """Refuse edit layers outside the model."""
    bad = [layer for layer in layers if not 0 <= layer < bundle.adapter.n_layers]
    if bad:
        raise EditRequestError(f"{method}: layer(s) {bad} outside 0..{bundle.adapter.n_layers - 1}")


def cases_language(cases: Sequence[EditCase]) -> str:
    """The language all ``cases`` are in (``""``: data without one); a batch mixing languages is refused."""
    found = {case.language for case in cases}
    if len(found) > 1:
        raise EditRequestError(f"one edit cannot mix languages {sorted(found)}; edit each language apart")
    return found.pop() if found else ""


def target_settings(p: LocateParams, lang: str = "") -> TargetSettings:
    """The target optimisation's settings from a locate-then-edit method's parameters, with the KL
    prompt of the requests' language."""
    return TargetSettings(
        kl_prompt=language(lang).kl_prompt,
        lr=p.lr,
        steps=p.steps,
        kl_factor=p.kl_factor,
        weight_decay=p.weight_decay,
        clamp_norm_factor=p.clamp_norm_factor,
        early_stop_loss=p.early_stop_loss,
        max_rows=p.max_rows,
        matmul=p.target_matmul,
    )


def method_templates(bundle: ModelBundle, p: LocateParams, lang: str = "") -> list[str]:
    """The context templates the method's parameters ask for (``"{}"`` first), sampled from seed words of
    the requests' language."""
    spec = TemplateSpec(
        lengths=tuple((int(a), int(b)) for a, b in p.templates),
        seed_words=language(lang).seed_words,
        seed=p.template_seed,
    )
    return context_templates(bundle, spec)


def stats_spec(p: LocateParams) -> StatsSpec:
    """The key second-moment statistics the method's parameters ask for."""
    return StatsSpec(corpus=p.stats_corpus, samples=p.stats_samples, max_tokens=p.stats_max_tokens)


def target_info(result: TargetResult) -> dict[str, Any]:
    """The target optimisation's per-request record kept with the edit."""
    return {"steps": result.steps, "final_loss": result.final_loss, "loss_parts": result.loss_parts}


def edit_metadata(
    editor: Editor, bundle: ModelBundle, requests: list[EditRequest], info: dict[str, Any]
) -> EditMeta:
    """Everything a ``WeightEdit`` records besides its deltas (``EditBuilder.finish``'s argument)."""
    return {
        "method": editor.name,
        "hyperparameters": editor.hyperparameters(),
        "requests": requests,
        "model_fingerprint": bundle.fingerprint,
        "model_name": bundle.name,
        "info": info,
    }


@dataclass
class LocateThenEdit:
    """The fields and manifest record of the locate-then-edit methods (ROME, MEMIT, PMET)."""

    params: LocateParams
    terms: list[LossTerm] = field(default_factory=list)
    name: str = ""
    preset: str = ""

    def statistics(self) -> dict[str, list[int]]:
        """The key second moments the method's edits read, ``{component: layers}`` (the MLP
        down-projections of the edit layers)."""
        return {"mlp_down": sorted(self.params.layers)}

    def prepare(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """The one-time work of ``apply`` for edits of ``cases`` (their language), done ahead: the
        context templates and the key second moments, kept in ``bundle``'s caches. Nothing is edited;
        ``apply`` computes whatever is not there itself, so calling this is never required."""
        method_templates(bundle, self.params, cases_language(cases))
        second_moments_of(bundle, self.statistics(), stats_spec(self.params))

    def hyperparameters(self) -> dict[str, Any]:
        """Everything that determines the edit (written to the run manifest)."""
        return {
            "preset": self.preset,
            **params_dict(self.params),
            "stats": stats_spec(self.params).describe(),
            "terms": [t.describe() for t in self.terms],
        }
