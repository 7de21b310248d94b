"""Attention drift (SADR section 3.3, appendix D.3): KL between the unedited and edited attention rows of
the last token, the table factors and their correlation with P(o_edit)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch

from attnedit.analysis.engine import (
    JsonResult,
    PromptBatch,
    encode_prompts,
    first_target_ids,
    measure_rows,
    together,
)
from attnedit.core.interventions import (
    Trace,
    attention_probabilities,
    main_tensor,
)
from attnedit.core.models import ModelBundle
from attnedit.core.tokens import locate_subject

logger = logging.getLogger(__name__)

TINY = 1e-30  # floor of a probability under log in the KL


def drift_kl(reference: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """KL(reference || current) over the last (key) dimension; zero-probability keys contribute 0.

    The log difference is taken per key before weighting, which keeps small drifts accurate in float32.
    """
    log_ratio = reference.clamp_min(TINY).log() - current.clamp_min(TINY).log()
    return (reference * log_ratio).sum(-1)


@dataclass
class LastTokenAttention(JsonResult):
    """The last token's attention rows and hidden states of one model over prompts.

    ``attention[i, layer, head, t]`` is the weight of prompt i's last token on its token t (zero beyond
    ``lengths[i]``); ``hidden[i, layer]`` the last token's output of block ``layer``; ``subject_last[i]``
    the edited subject's last token (its first occurrence in the prompt; -1 without subjects);
    ``target_probs[i]`` P of the prompt's targets when they were given."""

    prompts: list[str]
    lengths: np.ndarray  # [n]
    subject_last: np.ndarray  # [n]
    attention: np.ndarray  # [n, n_layers, n_heads, max_length]
    hidden: np.ndarray  # [n, n_layers, hidden]
    target_probs: np.ndarray | None = None  # [n, n_targets]


def _subject_last(
    bundle: ModelBundle, batch: PromptBatch, subjects: str | Sequence[str] | None
) -> np.ndarray:
    n = len(batch.prompts)
    if subjects is None:
        return np.full(n, -1)
    per_prompt = [subjects] * n if isinstance(subjects, str) else list(subjects)
    if len(per_prompt) != n:
        raise ValueError(f"{len(per_prompt)} subjects for {n} prompts")
    last = []
    for prompt, subject, length in zip(batch.prompts, per_prompt, batch.lengths, strict=True):
        span = locate_subject(bundle.tokenizer, prompt, subject)
        if span.text != prompt or len(span.input_ids) != length:
            raise ValueError(f"subject {subject!r}: give prompts as plain text containing it, not {prompt!r}")
        last.append(span.last_token)
    return np.array(last)


@torch.inference_mode()
def record_last_token_attention(
    bundle: ModelBundle,
    prompts: Sequence[str],
    subjects: str | Sequence[str] | None = None,
    targets: Sequence[Sequence[str]] | None = None,
    batch_rows: int = 64,
) -> LastTokenAttention:
    """One pass per batch of prompts: the last token's attention rows (every layer, per query head), its block
    outputs and P of the ``targets``; ``subjects`` (one for all prompts or one per prompt) locates the
    edited subject's last token. Run it once on the unedited and once on the edited model."""
    batch = encode_prompts(bundle, prompts)
    adapter, width = bundle.adapter, batch.width
    layer_names = [adapter.module_name("layer", layer) for layer in range(adapter.n_layers)]
    entered: list[tuple[Any, ...]] = []

    def intervene(
        rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0
    ) -> contextlib.AbstractContextManager[None]:
        query = torch.full((len(rows),), width - 1, device=prompt.device)
        last = Trace(bundle.model, layer_names, detach=True, reduce_output=lambda y, n: main_tensor(y)[:, -1])
        return together(attention_probabilities(bundle.model, adapter, query=query), last, entered=entered)

    target_ids = first_target_ids(bundle, batch, targets) if targets is not None else None
    values = measure_rows(
        bundle, batch, torch.arange(len(prompts)), intervene, target_ids, "prob", batch_rows
    )
    rows = torch.cat(
        [torch.stack([view[layer] for layer in range(adapter.n_layers)], dim=1) for view, _ in entered]
    )  # [n, layers, heads, width]
    lengths = np.array(batch.lengths)
    attention = np.zeros((len(prompts), adapter.n_layers, adapter.n_heads, int(lengths.max())))
    for p, length in enumerate(batch.lengths):
        attention[p, ..., :length] = rows[p, ..., width - length :].double().cpu().numpy()
    hidden = torch.cat([torch.stack([t[n].output for n in layer_names], dim=1) for _, t in entered])
    return LastTokenAttention(
        prompts=list(prompts),
        lengths=lengths,
        subject_last=_subject_last(bundle, batch, subjects),
        attention=attention,
        hidden=hidden.double().cpu().numpy(),
        target_probs=values.double().cpu().numpy() if values is not None else None,
    )


def _check_pair(unedited: LastTokenAttention, edited: LastTokenAttention) -> None:
    if (
        unedited.prompts != edited.prompts
        or unedited.attention.shape != edited.attention.shape
        or not np.array_equal(unedited.subject_last, edited.subject_last)
    ):
        raise ValueError(
            "unedited and edited recordings must cover the same prompts, subjects and model shape"
        )


def attention_drift(unedited: LastTokenAttention, edited: LastTokenAttention) -> np.ndarray:
    """KL(W_lh || W*_lh) of the last token's attention row per prompt, layer and query head ``[n, L, H]``
    (W unedited, W* edited; the quantity SADR's equation 2 restrains and figure 4 correlates)."""
    _check_pair(unedited, edited)
    return drift_kl(torch.from_numpy(unedited.attention), torch.from_numpy(edited.attention)).numpy()


FACTORS = (
    "kl",
    "subject_max_head",
    "other_max_head",
    "subject_all_heads",
    "hidden_norm",
    "hidden_distance",
    "hidden_cosine",
)


@dataclass
class DriftFactors(JsonResult):
    """Per prompt, the factors the SADR paper correlates with P(o_edit); s is the edited subject's last
    token, W/W* the unedited/edited last-token attention rows, h/h* the last token's block outputs."""

    layers: list[int]  # the layers l the sums run over
    hidden_layer: int  # the block whose output h is
    kl: np.ndarray  # figure 4, table 4 "attention drift": sum_l sum_h KL(W_lh || W*_lh)
    subject_max_head: np.ndarray  # table 2 (1): sum_l max_h |W_lh[s] - W*_lh[s]|
    other_max_head: np.ndarray  # table 2 (2): sum_l max_h ||W_lh[\s] - W*_lh[\s]||_2 (other tokens)
    subject_all_heads: np.ndarray  # table 2 (3): sum_l sum_h |W_lh[s] - W*_lh[s]|
    hidden_norm: np.ndarray  # table 4: ||h*||
    hidden_distance: np.ndarray  # table 4: ||h - h*||
    hidden_cosine: np.ndarray  # table 4: cos(h, h*)


def drift_factors(
    unedited: LastTokenAttention,
    edited: LastTokenAttention,
    layers: Sequence[int] | None = None,
    hidden_layer: int = -1,
) -> DriftFactors:
    """The table 2 and table 4 factors (and figure 4's KL sum) over ``layers`` (default all; the paper
    restricts l to the layers whose attention matters); hidden states of block ``hidden_layer`` (the last)."""
    _check_pair(unedited, edited)
    if np.any(unedited.subject_last < 0):
        raise ValueError("the drift factors need the edited subject: record with subjects=...")
    n_layers = unedited.attention.shape[1]
    chosen = list(range(n_layers)) if layers is None else list(layers)
    delta = unedited.attention[:, chosen] - edited.attention[:, chosen]  # [n, L', H, K]
    rows, s = np.arange(len(delta)), unedited.subject_last
    on_subject = np.abs(delta[rows, :, :, s])  # [n, L', H]
    others = delta.copy()
    others[rows, :, :, s] = 0.0
    h, h_edited = unedited.hidden[:, hidden_layer], edited.hidden[:, hidden_layer]
    norm, norm_edited = np.linalg.norm(h, axis=-1), np.linalg.norm(h_edited, axis=-1)
    return DriftFactors(
        layers=chosen,
        hidden_layer=hidden_layer % unedited.hidden.shape[1],
        kl=attention_drift(unedited, edited)[:, chosen].sum(axis=(1, 2)),
        subject_max_head=on_subject.max(axis=2).sum(axis=1),
        other_max_head=np.linalg.norm(others, axis=-1).max(axis=2).sum(axis=1),
        subject_all_heads=on_subject.sum(axis=(1, 2)),
        hidden_norm=norm_edited,
        hidden_distance=np.linalg.norm(h - h_edited, axis=-1),
        hidden_cosine=(h * h_edited).sum(-1) / (norm * norm_edited),
    )


@dataclass(frozen=True)
class Correlation(JsonResult):
    """Pearson's r with its two-sided p-value over n pairs."""

    r: float
    p: float
    n: int


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Pearson's r and the two-sided p-value of the t-test with n - 2 degrees of freedom
    (t = r sqrt((n - 2) / (1 - r^2))). NaN for fewer than 3 pairs or a constant input."""
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson needs paired values, got {a.shape} and {b.shape}")
    n = len(a)
    if n < 3:
        logger.warning("Pearson correlation undefined for %d pairs", n)
        return Correlation(math.nan, math.nan, n)
    da, db = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(da @ da) * float(db @ db))
    if denominator == 0.0:
        logger.warning("Pearson correlation undefined for a constant input")
        return Correlation(math.nan, math.nan, n)
    r = float(np.clip(float(da @ db) / denominator, -1.0, 1.0))
    if abs(r) == 1.0:
        return Correlation(r, 0.0, n)
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return Correlation(r, float(2.0 * scipy.stats.t.sf(abs(t), n - 2)), n)


def correlate(factors: DriftFactors, outcome: Sequence[float] | np.ndarray) -> dict[str, Correlation]:
    """Pearson correlation of every factor with ``outcome`` per prompt (the paper: edited P(o_edit))."""
    return {name: pearson(getattr(factors, name), outcome) for name in FACTORS}
