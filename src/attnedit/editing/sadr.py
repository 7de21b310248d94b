"""SADR, Selective Attention Drift Restriction (SADR paper, section 4, equation 2), as a loss term.

For each optimisation prompt S_j (context template + request prompt), in every layer l and query head
h, take the attention row of the last prompt token (the position that predicts the first target
token). The reference is the same row of the model before the edit: the optimisation's step 0, where
every optimised delta is still zero (computed once per edit; with sequential edits it is the model
before the current edit). A head is selected when its current weight on the subject's last token
exceeds the maximum over heads of the reference weights there (recomputed every step, no gradient
through the selection)::

    L_SADR = 1/N sum_j sum_l sum_{h selected} KL(reference row || current row)

and the term returns gamma * L_SADR per request. Options: ``heads="all"`` (every head constrained,
the paper's figure 6 ablation), ``heads="increased"`` (every head whose weight on the subject's last
token rose above its own reference weight: a looser rule than the paper's, ours), a layer range, and
``prompt_reduction="sum"`` (sum instead of mean over prompts). The official code's ``--gamma`` flag
is our gamma times 1e4 (flag 100 = gamma 0.01); its reference is the step-0 attention, as here.
Layers at or below the lowest optimised layer cannot drift (their KL is exactly zero) and are not
recorded.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from attnedit.analysis.drift import drift_kl
from attnedit.core.layer_range import parse_layers
from attnedit.editing.losses import StepState, per_request_mean
from attnedit.editing.presets import Params, PresetError, build_params
from attnedit.editing.rows import SplitBatch

logger = logging.getLogger(__name__)

HEAD_RULES = ("selective", "increased", "all")
PROMPT_REDUCTIONS = ("mean", "sum")


def _layer_range(value: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is not None and (value[0] < 0 or value[1] < value[0]):
        raise PydanticCustomError("layer_range", "expected a layer range with 0 <= first <= last")
    return value


class SadrSettings(Params):
    """The regulariser's settings (recorded in the run manifest)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    gamma: float = Field(0.01, ge=0, description="weight of the term (the official code's --gamma / 10000)")
    heads: Literal["selective", "increased", "all"] = Field(
        "selective",
        description="selective: the paper's rule; increased: every head whose weight on the subject's last "
        "token rose above its own reference weight (looser, ours); all: every head (figure 6 ablation)",
    )
    layers: Annotated[tuple[int, int] | None, AfterValidator(_layer_range)] = Field(
        None, description="inclusive layer range [first, last]; null: every layer"
    )
    prompt_reduction: Literal["mean", "sum"] = Field(
        "mean", description="over the optimisation prompts: mean (the paper) or sum"
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # a preset's JSON [first, last]

    def describe(self) -> dict[str, Any]:
        """JSON-ready (the layer range as a list, as a manifest read back holds it)."""
        out = self.model_dump()
        out["layers"] = list(self.layers) if self.layers is not None else None
        return out


SETTING_KEYS = tuple(SadrSettings.model_fields)
BLOCK_KEYS = ("params", "source")  # a preset's sadr block may also change the base method's parameters


def sadr_settings(
    block: dict[str, Any], overrides: Mapping[str, Any] | SadrSettings | None = None
) -> SadrSettings:
    """Settings from a preset's ``sadr`` block plus ``overrides``.

    ``overrides``: a ``SadrSettings`` (used as it is: the block's settings are replaced), or a mapping
    of some of its fields (``gamma``, ``heads``, ``layers``, ``prompt_reduction``) on top of the block;
    ``layers`` is ``(first, last)``, inclusive; None means every layer. Strings, as a command line gives
    them, are parsed (``gamma="0.1"``, ``layers="6-29"`` or ``"all"``).
    """
    unknown = sorted(set(block) - set(SETTING_KEYS) - set(BLOCK_KEYS))
    if unknown:
        raise PresetError(
            f"preset 'sadr' block: unknown field(s) {unknown}; known: {', '.join(SETTING_KEYS + BLOCK_KEYS)}"
        )
    if isinstance(overrides, SadrSettings):
        return overrides
    values = {k: v for k, v in block.items() if k in SETTING_KEYS}
    origin = {k: "preset sadr block" for k in values}
    for key, value in (overrides or {}).items():
        if key not in SETTING_KEYS:
            raise PresetError(f"SADR has no setting {key!r}; known: {', '.join(SETTING_KEYS)}")
        values[key] = _parse(key, value) if isinstance(value, str) else value
        origin[key] = "override"
    return build_params(SadrSettings, "SADR", values, origin)


def _parse(key: str, text: str) -> Any:
    """A setting given as text (``--sadr-layers 6-29``, ``-p sadr_gamma=0.1``)."""
    text = text.strip()
    if key == "gamma":
        try:
            return float(text)
        except ValueError:
            raise PresetError(f"SADR gamma={text!r}: expected a number") from None
    if key == "layers":
        try:
            layers = parse_layers(text)
        except ValueError as err:
            raise PresetError(f"SADR {err}") from None
        if layers is None:
            return None
        if layers != list(range(layers[0], layers[0] + len(layers))):
            raise PresetError(f"SADR layers {text!r}: expected one contiguous range FIRST-LAST (or all)")
        return (layers[0], layers[-1])
    return text


def select_heads(
    reference: torch.Tensor, current: torch.Tensor, fact_key: torch.Tensor, rule: str = "selective"
) -> torch.Tensor:
    """Heads whose current weight on the subject's last token exceeds a threshold: the maximum over
    heads of the reference weights there (``selective``, the paper's rule) or the head's own reference
    weight (``increased``); ``all`` selects every head. Inputs ``[L, B, H, K]``; returns ``[L, B, H]``."""
    if rule == "all":
        return torch.ones(current.shape[:3], dtype=torch.bool, device=current.device)
    index = fact_key.view(1, -1, 1, 1).expand(*current.shape[:3], 1)
    on_fact = current.detach().gather(-1, index)[..., 0]
    threshold = reference.gather(-1, index)[..., 0]
    if rule == "selective":
        threshold = threshold.amax(dim=-1, keepdim=True)
    return on_fact > threshold


@dataclass
class SadrTerm:
    """The SADR loss term for ``optimise_targets`` and fine-tuning (``LossTerm`` protocol)."""

    settings: SadrSettings = field(default_factory=SadrSettings)
    name: str = "sadr"
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    # the step-0 attention of each batch the optimisation cycles through (several: minibatches of MEMAT's
    # corrections, length groups of the target optimisation), keyed by the batch's id with a weak
    # reference to it, so that a finished optimisation's batches are not kept alive
    _references: dict[int, tuple[weakref.ref[SplitBatch], torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )
    last_reference: torch.Tensor | None = field(default=None, init=False, repr=False)  # the latest recorded
    _n_layers: int = field(default=0, init=False, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.settings.describe()}

    def attention_layers(self, n_layers: int) -> Sequence[int]:
        self._n_layers = n_layers
        if self.settings.layers is None:
            return range(n_layers)
        lo, hi = self.settings.layers
        if hi >= n_layers:
            raise ValueError(
                f"SADR layer range {self.settings.layers} is outside the model's {n_layers} layers"
            )
        return range(lo, hi + 1)

    def __call__(self, state: StepState) -> torch.Tensor:
        device = state.batch.suffix_ids.device
        if not state.attention:  # every requested layer is below the optimised one: nothing can drift
            self.diagnostics = {}
            return torch.zeros(state.n_requests, device=device)
        own = set(self.attention_layers(self._n_layers or max(state.attention) + 1))
        layers = sorted(layer for layer in state.attention if layer in own)  # other terms may read more
        if not layers:
            self.diagnostics = {}
            return torch.zeros(state.n_requests, device=device)
        rows = state.prompt_rows
        current = torch.stack([state.attention[layer][rows] for layer in layers]).float()  # [L, R, H, K]
        reference = self._reference(state, current)
        kl = drift_kl(reference, current)  # [L, R, H]
        selected = select_heads(reference, current, state.fact_key[rows], self.settings.heads)
        per_prompt = (kl * selected).sum(dim=(0, 2))  # [R]
        request = state.batch.request_index
        value = per_request_mean(per_prompt, rows, request, state.n_requests)
        if self.settings.prompt_reduction == "sum":
            counts = torch.zeros(state.n_requests, device=device).index_add(
                0, request[rows], torch.ones_like(per_prompt)
            )
            value = value * counts
        with torch.no_grad():
            self.diagnostics = self._diagnose(kl.detach(), selected, layers, rows, request, state.n_requests)
            self.diagnostics["unweighted"] = value.detach()
        return self.settings.gamma * value

    def _reference(self, state: StepState, current: torch.Tensor) -> torch.Tensor:
        """The batch's reference attention: recorded at its step 0 (the model before the edit)."""
        key = id(state.batch)
        if state.step == 0:
            # a new optimisation or a new batch of one: forget the batches that no longer exist
            self._references = {k: v for k, v in self._references.items() if v[0]() is not None}
            self._references[key] = (weakref.ref(state.batch), current.detach())
            self.last_reference = current.detach()
        known = self._references.get(key)
        if known is None or known[0]() is not state.batch:
            raise RuntimeError("SADR needs the step-0 attention of every batch as its reference")
        return known[1]

    def _diagnose(
        self,
        kl: torch.Tensor,
        selected: torch.Tensor,
        layers: list[int],
        rows: torch.Tensor,
        request: torch.Tensor,
        n: int,
    ) -> dict[str, torch.Tensor]:
        """Per request (mean over its prompts): heads selected and KL summed over all heads, in total
        and per model layer (``[n, n_layers]``, zero where the layer cannot drift or is not recorded)."""
        n_layers = max(self._n_layers, max(layers) + 1)
        index = torch.tensor(layers, device=kl.device)

        def by_layer(x: torch.Tensor) -> torch.Tensor:  # [L, R] -> [n, n_layers]
            full = torch.zeros(n_layers, x.shape[1], device=x.device).index_copy(0, index, x.float())
            return torch.stack([per_request_mean(f, rows, request, n) for f in full], dim=1)

        kl_layer, sel_layer = by_layer(kl.sum(-1)), by_layer(selected.sum(-1))
        return {
            "heads_selected": sel_layer.sum(1),
            "kl_all_heads": kl_layer.sum(1),
            "kl_by_layer": kl_layer,
            "selected_by_layer": sel_layer,
        }
