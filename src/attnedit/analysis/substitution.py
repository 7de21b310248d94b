"""Contaminating substitution (SADR section 3.2, appendix D.1): the edited model's module outputs copied
into the unedited model at (layer window, token)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from attnedit.analysis.engine import (
    TRACE_KINDS,
    JsonResult,
    check_kinds,
    encode_prompts,
    first_target_ids,
    measure_rows,
    record_module_outputs,
    restorer,
    split_grid,
    token_grid,
)
from attnedit.core.models import ModelBundle

logger = logging.getLogger(__name__)


@dataclass
class RecordedOutputs:
    """Module outputs of one model over prompts (left-padded as every function here pads them)."""

    prompts: tuple[str, ...]
    kinds: tuple[str, ...]
    outputs: dict[str, dict[int, torch.Tensor]]  # kind -> layer -> [n_prompts, width, hidden]


@torch.inference_mode()
def record_outputs(
    bundle: ModelBundle, prompts: Sequence[str], kinds: Sequence[str] = TRACE_KINDS
) -> RecordedOutputs:
    """Record every layer's output of each module kind at every token (run it with the edit applied)."""
    kinds = check_kinds(kinds)
    outputs, _ = record_module_outputs(bundle, encode_prompts(bundle, prompts), kinds, None, "prob")
    return RecordedOutputs(tuple(prompts), kinds, outputs)


@dataclass
class InterventionEffects(JsonResult):
    """P(targets) of prompts without (``base``) and with an intervention per (window centre, [token]).

    ``values[i]`` is ``[n_layers, n_tokens_i, n_targets]`` for token-wise interventions, ``[n_layers,
    n_targets]`` for layer-only ones; ``effects`` = values - base (the paper's tracing effect)."""

    analysis: str
    prompts: list[str]
    targets: list[list[str]]
    tokens: list[list[str]]
    window: int
    base: np.ndarray  # [n_prompts, n_targets]
    values: list[np.ndarray]
    effects: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.effects = [v - b for v, b in zip(self.values, self.base, strict=True)]


@torch.inference_mode()
def substitute_outputs(
    bundle: ModelBundle,
    recorded: RecordedOutputs,
    targets: Sequence[Sequence[str]],
    window: int = 6,
    kinds: Sequence[str] | None = None,
    batch_rows: int = 128,
) -> dict[str, InterventionEffects]:
    """Contaminating substitution (SADR section 3.2): run the current (unedited) model on the recorded
    prompts with the recorded (edited) outputs of a module kind copied in over the window of layers
    centred on each layer, at each token; P of each prompt's targets (e.g. (o_true, o_edit)) per kind."""
    kinds = check_kinds(kinds or recorded.kinds)
    missing = [k for k in kinds if k not in recorded.outputs]
    if missing:
        raise ValueError(f"outputs of {missing} were not recorded")
    batch = encode_prompts(bundle, recorded.prompts)
    if recorded.outputs[kinds[0]][0].shape[1] != batch.width:
        raise ValueError("the recorded outputs belong to other prompts or another tokenizer")
    n_layers = bundle.adapter.n_layers
    specs, row_prompt = token_grid(batch, n_layers, window, kinds)
    intervene = restorer(bundle, batch, recorded.outputs, specs)
    values = measure_rows(
        bundle,
        batch,
        row_prompt,
        intervene,
        first_target_ids(bundle, batch, targets),
        "prob",
        batch_rows,
        specs,
    )
    base, per_kind = split_grid(values, batch, n_layers, kinds)
    tokens = [batch.tokens(bundle, p) for p in range(len(batch.prompts))]
    return {
        kind: InterventionEffects(
            analysis=f"contaminating_substitution:{kind}",
            prompts=list(batch.prompts),
            targets=[list(t) for t in targets],
            tokens=tokens,
            window=window,
            base=base,
            values=per_kind[kind],
        )
        for kind in kinds
    }
