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

# one case's record of an analysis run as read back from ``cases.jsonl`` (parsed JSON)
AnalysisRecord = dict[str, Any]


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
    """Element-wise mean ignoring NaN; all NaN (or no arrays: ``shape``) stays NaN."""
    if not arrays:
        return np.full(shape, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        return np.nanmean(np.stack([np.asarray(a, dtype=float) for a in arrays]), axis=0)


def as_array(value: Any) -> np.ndarray:
    """A JSON list back to a float array (None -> NaN)."""
    return np.array(value, dtype=float)


def correlation_table(correlations: dict[str, dict[str, dict[str, Any]]]) -> str:
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


# --- per analysis: the records of ``attnedit analyze NAME`` -> the aggregates its figures show -----------
# Records are the JSON-ready per-case dicts of ``cases.jsonl`` (lists, None for NaN); a record with
# "skipped" has no prompts. Each function needs only the records and the model's layer count, so a subset
# of finished cases can be re-aggregated without the model.


def task_prompts(records: Sequence[AnalysisRecord], task: str) -> list[tuple[AnalysisRecord, int]]:
    """(record, prompt index) of every prompt of ``task`` (a key of ``TASKS``) in ``records``."""
    return [(r, i) for r in records for i, m in enumerate(r["metrics"]) if m == task]


def trace_aggregate(records: Sequence[AnalysisRecord], kinds: Sequence[str], n_layers: int) -> dict[str, Any]:
    """Causal tracing: mean clean and corrupted P(o_true); per module kind the aligned restored P and
    indirect effect (``[len(POSITIONS), n_layers]``) and the per-layer effect at the subject's last token."""
    aggregate: dict[str, Any] = {
        "clean": nanmean([r["clean"] for r in records], ()),
        "corrupted": nanmean([r["corrupted"] for r in records], ()),
        "indirect_effect": {},
        "restored": {},
        "layer_effects": {},
    }
    for kind in kinds:
        grids = [
            aligned(as_array(r["restored"][kind]), r["subject_first"], r["subject_last"]) for r in records
        ]
        corrupted = [as_array(r["corrupted"]) for r in records]
        shape = (len(POSITIONS), n_layers)
        aggregate["restored"][kind] = nanmean(grids, shape)
        aggregate["indirect_effect"][kind] = nanmean(
            [g - c for g, c in zip(grids, corrupted, strict=True)], shape
        )
        aggregate["layer_effects"][kind] = nanmean(
            [as_array(r["layer_effects"][kind]) for r in records], (n_layers,)
        )
    return aggregate


def substitute_aggregate(
    records: Sequence[AnalysisRecord], kinds: Sequence[str], n_layers: int
) -> dict[str, Any]:
    """Contaminating substitution: per task the prompt count and mean unedited [P(o_true), P(o_edit)];
    per module kind, task and target the aligned mean effect of the substitution (substituted - unedited)."""
    used = [r for r in records if "skipped" not in r]
    shape = (len(POSITIONS), n_layers)
    aggregate: dict[str, Any] = {"effects": {}, "base": {}, "n_prompts": {}}
    prompts_of = {task: task_prompts(used, task) for task in TASKS}
    for task, at in prompts_of.items():
        aggregate["n_prompts"][task] = len(at)
        aggregate["base"][task] = nanmean([as_array(r["base"][i]) for r, i in at], (2,))
    for kind in kinds:
        aggregate["effects"][kind] = {}
        for task, at in prompts_of.items():
            aggregate["effects"][kind][task] = {}
            for t, target in enumerate(TARGETS):
                grids = [
                    aligned(as_array(r["values"][kind][i])[..., t] - r["base"][i][t], *r["subject_tokens"][i])
                    for r, i in at
                ]
                aggregate["effects"][kind][task][target] = nanmean(grids, shape)
    return aggregate


def drift_aggregate(records: Sequence[AnalysisRecord]) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """Attention drift: per task the Pearson correlation of each drift factor with the edited P(o_edit)
    and the means; plus, per task name, the (KL drift, edited P(o_edit)) points of the scatter figure."""
    from attnedit.analysis.drift import FACTORS, pearson

    used = [r for r in records if "skipped" not in r]
    aggregate: dict[str, Any] = {"outcome": "edited P(o_edit)", "correlations": {}, "means": {}}
    points = {}
    for task in TASKS:
        at = task_prompts(used, task)
        outcome = np.array([r["p_edited"][i][1] for r, i in at], dtype=float)
        factor_values = {f: np.array([r["factors"][f][i] for r, i in at], dtype=float) for f in FACTORS}
        aggregate["correlations"][task] = {
            f: pearson(values, outcome).to_json() for f, values in factor_values.items()
        }
        aggregate["means"][task] = {
            "n": len(at),
            "p_edit_edited": nanmean(list(outcome), ()),
            "p_edit_unedited": nanmean([r["p_unedited"][i][1] for r, i in at], ()),
            **{f: nanmean(list(v), ()) for f, v in factor_values.items()},
        }
        points[TASKS[task]] = (factor_values["kl"], outcome)
    return aggregate, points


def patch_aggregate(records: Sequence[AnalysisRecord], n_layers: int, scores: bool) -> dict[str, Any]:
    """Attention patching: per task the prompt count, the mean patched curves per target
    (``[n_layers]``, by window centre) and the mean edited and unedited levels; with ``scores`` the
    aligned mean effect of the single-entry variant (patched - edited) per task and target."""
    used = [r for r in records if "skipped" not in r]
    aggregate: dict[str, Any] = {"curves": {}, "p_edited": {}, "p_unedited": {}, "n_prompts": {}}
    if scores:
        aggregate["scores"] = {}
    for task in TASKS:
        at = task_prompts(used, task)
        aggregate["n_prompts"][task] = len(at)
        curve = nanmean([as_array(r["curves"][i]) for r, i in at], (n_layers, 2))
        edited = nanmean([as_array(r["p_edited"][i]) for r, i in at], (2,))
        unedited = nanmean([as_array(r["p_unedited"][i]) for r, i in at], (2,))
        aggregate["curves"][task] = {target: curve[:, t] for t, target in enumerate(TARGETS)}
        aggregate["p_edited"][task] = {target: edited[t] for t, target in enumerate(TARGETS)}
        aggregate["p_unedited"][task] = {target: unedited[t] for t, target in enumerate(TARGETS)}
        if scores:
            aggregate["scores"][task] = {}
            for t, target in enumerate(TARGETS):
                grids = [
                    aligned(as_array(r["scores"][i])[..., t] - r["p_edited"][i][t], *r["subject_tokens"][i])
                    for r, i in at
                ]
                aggregate["scores"][task][target] = nanmean(grids, (len(POSITIONS), n_layers))
    return aggregate
