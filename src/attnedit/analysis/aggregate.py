"""Aggregation of per-case analysis records into the figures' grids: token alignment (ROME's averaging
over subject positions), NaN-aware means and the correlation table.

Token alignment: per prompt, the edited subject's FIRST occurrence gives ``first subject`` (its first
token), ``middle subject`` (tokens strictly between first and last, averaged), ``last subject``, ``first
subsequent`` (the token after the subject, unless it is the last token), ``further`` (tokens after that up
to, not including, the last token, averaged) and ``last`` (the prompt's last token). Tokens before the
subject are left out. A prompt without the subject only contributes to ``further`` (every token but the
last) and ``last``. Rows no prompt has stay NaN (blank in the figures).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

POSITIONS = ("first subject", "middle subject", "last subject", "first subsequent", "further", "last")
TASKS = {"DNS": "Distract-Neighborhood", "RS": "Relation"}
TARGETS = ("o_true", "o_edit")


def token_positions(n_tokens: int, first: int, last: int) -> list[list[int]]:
    """Token indices of each of ``POSITIONS`` for a prompt of ``n_tokens`` whose subject spans tokens
    ``first..last`` (``first < 0``: no subject)."""
    end = n_tokens - 1
    if first < 0:
        return [[], [], [], [], list(range(end)), [end]]
    return [
        [first],
        list(range(first + 1, last)),
        [last],
        [last + 1] if last + 1 < end else [],
        list(range(last + 2, end)),
        [end],
    ]


def aligned(values: Any, first: int, last: int) -> Any:
    """``values[layer, token]`` averaged over each of ``POSITIONS``: ``[len(POSITIONS), n_layers]``."""
    values = np.asarray(values, dtype=float)
    out = np.full((len(POSITIONS), values.shape[0]), np.nan)
    for row, tokens in enumerate(token_positions(values.shape[1], first, last)):
        if tokens:
            out[row] = values[:, tokens].mean(axis=1)
    return out


def nanmean(arrays: Sequence[Any], shape: tuple[int, ...]) -> Any:
    if not arrays:
        return np.full(shape, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        return np.nanmean(np.stack([np.asarray(a, dtype=float) for a in arrays]), axis=0)


def as_array(value: Any) -> np.ndarray:
    """A JSON list back to a float array (None -> NaN)."""
    return np.array(value, dtype=float)


def correlation_table(correlations: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per factor, Pearson r and p with P(o_edit) per task."""
    from attnedit.analysis.drift import FACTORS

    def cell(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    head = "| factor | " + " | ".join(f"{TASKS[t]} r | {TASKS[t]} p" for t in correlations) + " |"
    rule = "|---|" + "---|---|" * len(correlations)
    rows = [head, rule]
    for factor in FACTORS:
        cells = []
        for task in correlations:
            c = correlations[task][factor]
            cells += [cell(c["r"], ".3f"), cell(c["p"], ".2g")]
        rows.append(f"| {factor} | " + " | ".join(cells) + " |")
    n = ", ".join(f"{TASKS[t]}: n = {next(iter(correlations[t].values()))['n']}" for t in correlations)
    return "\n".join(rows) + f"\n\nPearson correlation with the edited model's P(o_edit) per prompt ({n}).\n"
