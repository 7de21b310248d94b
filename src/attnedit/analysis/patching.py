"""Attention patching (SADR section 3.4, appendix D.2): the edited model run with the unedited attention
probabilities over a window of layers, or one pre-softmax score of the last token replaced."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnedit.analysis.engine import (
    PromptBatch,
    Restoration,
    encode_prompts,
    first_target_ids,
    measure_rows,
    restoration_sites,
    split_grid,
    together,
    token_grid,
    window_layers,
)
from attnedit.analysis.substitution import InterventionEffects
from attnedit.core.interventions import (
    attention_softmax,
)
from attnedit.core.models import ModelBundle

logger = logging.getLogger(__name__)


PATCH_QUERIES = ("all", "last")


@dataclass
class RecordedAttention:
    """Attention scores (before the softmax, mask added) and probabilities of one model over prompts, every
    layer, ``[n_prompts, query_head, width, width]`` (left-padded as every function here pads them)."""

    prompts: tuple[str, ...]
    scores: dict[int, torch.Tensor]
    probabilities: dict[int, torch.Tensor]


@torch.inference_mode()
def record_attention(bundle: ModelBundle, prompts: Sequence[str], batch_rows: int = 64) -> RecordedAttention:
    """Record every layer's attention scores and probabilities (run it on the unedited model)."""
    batch = encode_prompts(bundle, prompts)
    entered: list[tuple[Any, ...]] = []

    def intervene(
        rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0
    ) -> contextlib.AbstractContextManager[object]:
        return together(attention_softmax(bundle.model, bundle.adapter), entered=entered)

    measure_rows(bundle, batch, torch.arange(len(prompts)), intervene, None, "prob", batch_rows)
    layers = range(bundle.adapter.n_layers)
    return RecordedAttention(
        prompts=tuple(prompts),
        scores={layer: torch.cat([e[0].scores[layer] for e in entered]) for layer in layers},
        probabilities={layer: torch.cat([e[0].probabilities[layer] for e in entered]) for layer in layers},
    )


PATCH_KINDS = ("probabilities", "last_query", "last_score")


def _patch(
    bundle: ModelBundle,
    batch: PromptBatch,
    recorded: RecordedAttention,
    targets: Sequence[Sequence[str]],
    kind: str,
    specs: Sequence[Restoration],
    row_prompt: torch.Tensor,
    batch_rows: int,
) -> torch.Tensor:
    """Measure rows run with recorded attention patched in at each spec's layers. ``kind``: ``probabilities``
    replaces every query row, ``last_query`` the query row of the spec's token, ``last_score`` the last
    query's pre-softmax score on the spec's token."""
    if kind not in PATCH_KINDS:
        raise ValueError(f"patch kind must be one of {PATCH_KINDS}, not {kind!r}")
    if recorded.prompts != batch.prompts or recorded.probabilities[0].shape[-1] != batch.width:
        raise ValueError(
            "the recorded attention belongs to other prompts (record_attention on the same ones)"
        )

    def intervene(
        rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0
    ) -> contextlib.AbstractContextManager[object]:
        where = {layer: at for (_, layer), at in restoration_sites(specs, rows, prompt, batch).items()}

        def replace(x: torch.Tensor, layer: int) -> torch.Tensor:
            if layer not in where:
                return x
            r, c = where[layer]
            out = x.clone()
            if kind == "probabilities":
                out[r] = recorded.probabilities[layer][prompt[r]].to(out.dtype)
            elif kind == "last_query":
                out[r, :, c - offset] = recorded.probabilities[layer][prompt[r], :, c].to(out.dtype)
            else:
                out[r, :, -1, c] = recorded.scores[layer][prompt[r], :, -1, c].to(out.dtype)
            return out

        if kind == "last_score":
            return attention_softmax(bundle.model, bundle.adapter, edit_scores=replace, retain=False)
        return attention_softmax(bundle.model, bundle.adapter, edit_probabilities=replace, retain=False)

    target_ids = first_target_ids(bundle, batch, targets)
    return measure_rows(bundle, batch, row_prompt, intervene, target_ids, "prob", batch_rows, specs)


@torch.inference_mode()
def patch_attention(
    bundle: ModelBundle,
    recorded: RecordedAttention,
    targets: Sequence[Sequence[str]],
    window: int = 10,
    queries: str = "all",
    batch_rows: int = 128,
) -> InterventionEffects:
    """Attention patching (SADR section 3.4, figure 5): run the current (edited) model with the recorded
    (unedited) attention probabilities over the window of layers centred on each layer; ``queries="all"``
    patches whole attention matrices (the paper), ``"last"`` only the last token's row.
    ``values[i]`` is ``[n_layers, n_targets]``: P of each target against the window's centre."""
    if queries not in PATCH_QUERIES:
        raise ValueError(f"queries must be one of {PATCH_QUERIES}, not {queries!r}")
    batch = encode_prompts(bundle, recorded.prompts)
    n, n_layers = len(batch.prompts), bundle.adapter.n_layers
    kind = "probabilities" if queries == "all" else "last_query"
    centres = [(p, layer) for p in range(n) for layer in range(n_layers)]
    specs = [Restoration()] * n + [
        Restoration(kind, window_layers(layer, window, n_layers), (batch.lengths[p] - 1,))
        for p, layer in centres
    ]
    row_prompt = torch.tensor(list(range(n)) + [p for p, _ in centres])
    values = (
        _patch(bundle, batch, recorded, targets, kind, specs, row_prompt, batch_rows).double().cpu().numpy()
    )
    curves = values[n:].reshape(n, n_layers, -1)
    return InterventionEffects(
        analysis=f"attention_patching:{queries}",
        prompts=list(batch.prompts),
        targets=[list(t) for t in targets],
        tokens=[batch.tokens(bundle, p) for p in range(n)],
        window=window,
        base=values[:n],
        values=list(curves),
    )


@torch.inference_mode()
def patch_attention_scores(
    bundle: ModelBundle,
    recorded: RecordedAttention,
    targets: Sequence[Sequence[str]],
    window: int = 10,
    batch_rows: int = 128,
) -> InterventionEffects:
    """Single-entry attention patching (SADR appendix D.2, figure 10): run the current (edited) model with
    only the last token's pre-softmax score on token t replaced by the recorded (unedited) one, over the
    window of layers centred on each layer. ``values[i]`` is ``[n_layers, n_tokens_i, n_targets]``."""
    batch = encode_prompts(bundle, recorded.prompts)
    n_layers = bundle.adapter.n_layers
    specs, row_prompt = token_grid(batch, n_layers, window, ("last_score",))
    values = _patch(bundle, batch, recorded, targets, "last_score", specs, row_prompt, batch_rows)
    base, per_kind = split_grid(values, batch, n_layers, ("last_score",))
    return InterventionEffects(
        analysis="attention_patching:last_score",
        prompts=list(batch.prompts),
        targets=[list(t) for t in targets],
        tokens=[batch.tokens(bundle, p) for p in range(len(batch.prompts))],
        window=window,
        base=base,
        values=per_kind["last_score"],
    )
