"""The four analysis runs of ``attnedit analyze``, callable without the CLI (a web inspector, an executor).

Each ``run_NAME(setting, options)`` starts the run directory (``runs.analyses.start``: manifest check,
resume), computes the record of every case not done yet (``NAME_record``, one case at a time), aggregates
all selected records (``analysis.aggregate``), draws the figures (``analysis.plots``), writes ``NAME.json``
and returns an ``AnalysisResult``. The options are typed dataclasses; their ``manifest()`` is what the
manifest records (and what must match to resume).

The per-case functions import the analysis functions when called, so a test can replace one in its module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnedit.analysis.aggregate import (
    POSITIONS,
    TARGETS,
    TASKS,
    AnalysisRecord,
    correlation_table,
    drift_aggregate,
    patch_aggregate,
    substitute_aggregate,
    trace_aggregate,
)
from attnedit.analysis.engine import json_ready
from attnedit.runs.analyses import Session, Setting, edit_case, finish, run_cases, start, subject_span

if TYPE_CHECKING:
    from attnedit.analysis.specificity import SpecificityPrompts
    from attnedit.core.data import EditCase
    from attnedit.core.models import ModelBundle
    from attnedit.editing.spec import Editor

logger = logging.getLogger(__name__)

KIND_NAMES = {"layer": "hidden states", "mlp": "MLP", "attn": "attention"}  # module kinds in figure titles


@dataclass(frozen=True)
class AnalysisResult:
    """What an analysis run wrote: ``NAME.json`` (records and aggregates), the number of cases in it and
    the figures; ``table`` is the drift run's correlation table (markdown, also in
    ``drift_correlations.md``)."""

    analysis: str
    path: Path
    n_cases: int
    figures: tuple[Path, ...]
    table: str | None = None


def _result(
    session: Session,
    records: list[AnalysisRecord],
    aggregate: dict[str, Any],
    figures: Sequence[Path],
    table: str | None = None,
) -> AnalysisResult:
    path = finish(session, records, aggregate, figures)
    return AnalysisResult(session.analysis, path, len(records), tuple(figures), table)


def _specificity(case: EditCase) -> SpecificityPrompts:
    """The case's Distract-Neighborhood and Relation prompts (a warning when it has none)."""
    from attnedit.analysis.specificity import specificity_prompts

    sp = specificity_prompts(case, tuple(TASKS))
    if not sp.prompts:
        logger.warning("case %s has no Distract-Neighborhood or Relation prompts: skipped", case.case_id)
    return sp


# --- 1. causal tracing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceOptions:
    """Causal tracing: the module kinds restored, the layers restored together (``window`` for mlp and
    attn, ``layer_window`` for layer), noise samples per case and the noise std (None: ROME's 3 x the
    embeddings' std)."""

    kinds: tuple[str, ...] = ("layer", "mlp", "attn")
    window: int = 10
    layer_window: int = 1
    samples: int = 10
    noise: float | None = None

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("--samples must be at least 1")

    @property
    def windows(self) -> dict[str, int]:
        """The window of each chosen kind."""
        return {k: (self.layer_window if k == "layer" else self.window) for k in self.kinds}

    def manifest(self) -> dict[str, Any]:
        """The options as the manifest records them."""
        return {
            "kinds": list(self.kinds),
            "windows": self.windows,
            "samples": self.samples,
            "noise": self.noise,
        }


def trace_record(bundle: ModelBundle, case: EditCase, options: TraceOptions, seed: int) -> AnalysisRecord:
    """One case's causal trace of the unedited model on its request prompt with o_true (one trace per
    distinct window, the kinds sharing a window restored together)."""
    from attnedit.analysis.tracing import causal_trace, layer_effects

    req = case.request
    windows = options.windows
    record: dict[str, Any] = {"restored": {}, "layer_effects": {}}
    for w in dict.fromkeys(windows.values()):
        group = [k for k in options.kinds if windows[k] == w]
        trace = causal_trace(
            bundle, req.prompt, req.subject, req.target_true, group, w, options.noise, options.samples, seed
        )
        for key in ("prompt", "subject", "target", "tokens", "subject_first", "subject_last"):
            record[key] = getattr(trace, key)
        record.update(noise=trace.noise, clean=trace.clean, corrupted=trace.corrupted)
        record["restored"].update(trace.restored)
        record["layer_effects"].update(layer_effects(trace))
    return record


def _trace_case(
    bundle: ModelBundle, editor: Editor | None, case: EditCase, options: TraceOptions, seed: int
) -> AnalysisRecord:
    """``trace_record`` as ``run_cases`` calls a per-case function (no editor: the unedited model)."""
    return trace_record(bundle, case, options, seed)


def trace_figures(aggregate: dict[str, Any], options: TraceOptions, n_cases: int, out: Path) -> list[Path]:
    """The indirect-effect heatmaps and the per-layer effects at the subject's last token."""
    from attnedit.analysis import plots

    chosen, windows = options.kinds, options.windows
    return [
        plots.heatmaps(
            [
                plots.HeatmapPanel(f"{KIND_NAMES[k]} (window {windows[k]})", aggregate["indirect_effect"][k])
                for k in chosen
            ],
            POSITIONS,
            out / "trace_heatmaps.png",
            title=f"causal tracing, {n_cases} cases: average indirect effect on P(o_true)",
            colorbar="restored - corrupted P",
            columns=3,
        ),
        plots.layer_lines(
            # MLP against attention; the hidden states only when no other kind was traced
            {KIND_NAMES[k]: aggregate["layer_effects"][k] for k in chosen if k != "layer"}
            or {KIND_NAMES[k]: aggregate["layer_effects"][k] for k in chosen},
            out / "trace_layers.png",
            title="indirect effect at the subject's last token",
            ylabel="restored - corrupted P(o_true)",
        ),
    ]


def run_trace(setting: Setting, options: TraceOptions) -> AnalysisResult:
    """ROME's causal tracing of the unedited model (``setting.method`` must be None) over the cases."""
    session = start("trace", setting, options.manifest(), edit=False)
    bundle = session.bundle
    records = run_cases(session, partial(_trace_case, options=options, seed=setting.seed))
    aggregate = trace_aggregate(records, options.kinds, bundle.adapter.n_layers)
    figures = trace_figures(aggregate, options, len(records), setting.out)
    return _result(session, records, json_ready(aggregate), figures)


# --- 2. contaminating substitution --------------------------------------------------------------------


@dataclass(frozen=True)
class SubstituteOptions:
    """Contaminating substitution: the module kinds substituted and the layers substituted together."""

    kinds: tuple[str, ...] = ("attn", "mlp")
    window: int = 6

    def manifest(self) -> dict[str, Any]:
        """The options as the manifest records them."""
        return {"kinds": list(self.kinds), "window": self.window}


def substitute_record(
    bundle: ModelBundle, editor: Editor | None, case: EditCase, options: SubstituteOptions
) -> AnalysisRecord:
    """One case: edit, record the edited module outputs on its specificity prompts, revert, and run the
    unedited model with them substituted (a record with "skipped" when the case has no such prompts)."""
    from attnedit.analysis.substitution import record_outputs, substitute_outputs

    chosen = options.kinds
    sp = _specificity(case)
    if not sp.prompts:
        return {"skipped": "no Distract-Neighborhood or Relation prompts"}
    edit = edit_case(editor, bundle, case)
    try:
        recorded = record_outputs(bundle, sp.prompts, chosen)
    finally:
        edit.revert()
    effects = substitute_outputs(bundle, recorded, sp.targets, options.window, chosen)
    any_kind = effects[chosen[0]]
    return {
        "subject": sp.subject,
        "metrics": sp.metrics,
        "prompts": sp.prompts,
        "targets": sp.targets,
        "tokens": any_kind.tokens,
        "subject_tokens": [
            subject_span(bundle, p, sp.subject, len(t))
            for p, t in zip(sp.prompts, any_kind.tokens, strict=True)
        ],
        "base": any_kind.base,
        "values": {kind: effects[kind].values for kind in chosen},
    }


def substitute_figures(
    aggregate: dict[str, Any], options: SubstituteOptions, n_used: int, out: Path
) -> list[Path]:
    """One heatmap figure per module kind: a panel per task and target."""
    from attnedit.analysis import plots

    return [
        plots.heatmaps(
            [
                plots.HeatmapPanel(
                    f"{TASKS[task]}: effect on P({target})", aggregate["effects"][kind][task][target]
                )
                for task in TASKS
                for target in TARGETS
            ],
            POSITIONS,
            out / f"substitute_{kind}.png",
            title=f"contaminating substitution of edited {KIND_NAMES[kind]} outputs "
            f"(window {options.window}), {n_used} cases",
            colorbar="substituted - unedited P",
        )
        for kind in options.kinds
    ]


def run_substitute(setting: Setting, options: SubstituteOptions) -> AnalysisResult:
    """Contaminating substitution (SADR section 3.2) of ``setting.method``'s edits over the cases."""
    session = start("substitute", setting, options.manifest(), edit=True)
    bundle = session.bundle
    records = run_cases(session, partial(substitute_record, options=options))
    aggregate = substitute_aggregate(records, options.kinds, bundle.adapter.n_layers)
    n_used = sum("skipped" not in r for r in records)
    figures = substitute_figures(aggregate, options, n_used, setting.out)
    return _result(session, records, json_ready(aggregate), figures)


# --- 3. attention drift -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftOptions:
    """Attention drift: the layers the drift factors sum over (None: every layer)."""

    layers: tuple[int, ...] | None = None

    def manifest(self) -> dict[str, Any]:
        """The options as the manifest records them."""
        return {"drift_layers": None if self.layers is None else list(self.layers)}


class DriftLayersError(ValueError):
    """Drift layers the model does not have."""

    def __init__(self, layers: Sequence[int], n_layers: int) -> None:
        super().__init__(f"drift layers {list(layers)}: the model has {n_layers} layers")
        self.n_layers = n_layers


def drift_record(
    bundle: ModelBundle, editor: Editor | None, case: EditCase, options: DriftOptions
) -> AnalysisRecord:
    """One case: the unedited and edited last-token attention on its specificity prompts that contain the
    subject, the drift factors and the KL drift per layer (a record with "skipped" when none is left)."""
    from attnedit.analysis.drift import FACTORS, attention_drift, drift_factors, record_last_token_attention

    sp = _specificity(case)
    keep = [i for i, p in enumerate(sp.prompts) if sp.subject in p]
    for i in sorted(set(range(len(sp.prompts))) - set(keep)):
        task = TASKS.get(sp.metrics[i], sp.metrics[i])
        logger.warning("case %s: subject not in %s prompt %r: left out", case.case_id, task, sp.prompts[i])
    if not keep:
        return {"skipped": "no Distract-Neighborhood or Relation prompt containing the subject"}
    prompts = [sp.prompts[i] for i in keep]
    targets = [sp.targets[i] for i in keep]
    unedited = record_last_token_attention(bundle, prompts, sp.subject, targets)
    edit = edit_case(editor, bundle, case)
    try:
        edited = record_last_token_attention(bundle, prompts, sp.subject, targets)
    finally:
        edit.revert()
    layers = None if options.layers is None else list(options.layers)
    factors = drift_factors(unedited, edited, layers)
    return {
        "subject": sp.subject,
        "metrics": [sp.metrics[i] for i in keep],
        "prompts": prompts,
        "targets": targets,
        "subject_last": unedited.subject_last,
        "p_unedited": unedited.target_probs,
        "p_edited": edited.target_probs,
        "factors": {name: getattr(factors, name) for name in FACTORS},
        "factor_layers": factors.layers,
        "kl_per_layer": attention_drift(unedited, edited).sum(axis=2),
    }


def run_drift(setting: Setting, options: DriftOptions) -> AnalysisResult:
    """Attention drift (SADR section 3.3) of ``setting.method``'s edits over the cases; the result's
    ``table`` holds the factors' correlations with the edited P(o_edit) (also ``drift_correlations.md``).
    Raises ``DriftLayersError`` (after writing the manifest) for layers the model does not have."""
    from attnedit.analysis import plots

    session = start("drift", setting, options.manifest(), edit=True)
    bundle = session.bundle
    n_layers = bundle.adapter.n_layers
    if options.layers is not None and not all(0 <= x < n_layers for x in options.layers):
        raise DriftLayersError(options.layers, n_layers)
    records = run_cases(session, partial(drift_record, options=options))
    aggregate, points = drift_aggregate(records)
    aggregate = json_ready(aggregate)
    table = correlation_table(aggregate["correlations"])
    (setting.out / "drift_correlations.md").write_text(table)
    n_used = sum("skipped" not in r for r in records)
    figures = [
        plots.scatter(
            points,
            setting.out / "drift_kl.png",
            title=f"attention drift vs P(o_edit), {n_used} cases",
            xlabel="attention drift: sum of KL(W || W*)",
            ylabel="edited P(o_edit)",
        )
    ]
    return _result(session, records, aggregate, figures, table)


# --- 4. attention patching ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchOptions:
    """Attention patching: the layers patched together, which queries' attention is patched (``all``:
    whole matrices, as the paper; ``last``: the last token's row) and whether to add the single-entry
    variant (the last token's score on each token)."""

    window: int = 10
    queries: str = "all"
    scores: bool = False

    def __post_init__(self) -> None:
        from attnedit.analysis.patching import PATCH_QUERIES

        if self.queries not in PATCH_QUERIES:
            raise ValueError(f"--queries must be one of {', '.join(PATCH_QUERIES)}, not {self.queries!r}")

    def manifest(self) -> dict[str, Any]:
        """The options as the manifest records them."""
        return {"window": self.window, "queries": self.queries, "scores": self.scores}


def patch_record(
    bundle: ModelBundle, editor: Editor | None, case: EditCase, options: PatchOptions
) -> AnalysisRecord:
    """One case: the unedited attention on its specificity prompts, then the edited model run with it
    patched over each window of layers (a record with "skipped" when the case has no such prompts)."""
    from attnedit.analysis.drift import record_last_token_attention
    from attnedit.analysis.patching import patch_attention, patch_attention_scores, record_attention

    sp = _specificity(case)
    if not sp.prompts:
        return {"skipped": "no Distract-Neighborhood or Relation prompts"}
    unedited = record_last_token_attention(bundle, sp.prompts, None, sp.targets).target_probs
    recorded = record_attention(bundle, sp.prompts)
    edit = edit_case(editor, bundle, case)
    try:
        curves = patch_attention(bundle, recorded, sp.targets, options.window, options.queries)
        single = (
            patch_attention_scores(bundle, recorded, sp.targets, options.window) if options.scores else None
        )
    finally:
        edit.revert()
    record: AnalysisRecord = {
        "subject": sp.subject,
        "metrics": sp.metrics,
        "prompts": sp.prompts,
        "targets": sp.targets,
        "tokens": curves.tokens,
        "p_unedited": unedited,
        "p_edited": curves.base,
        "curves": curves.values,
    }
    if single is not None:
        record["scores"] = single.values
        record["subject_tokens"] = [
            subject_span(bundle, p, sp.subject, len(t))
            for p, t in zip(sp.prompts, curves.tokens, strict=True)
        ]
    return record


def patch_figures(aggregate: dict[str, Any], options: PatchOptions, n_used: int, out: Path) -> list[Path]:
    """The patched curves per task (with the edited and unedited levels); with ``scores`` the heatmaps of
    the single-entry variant."""
    from attnedit.analysis import plots

    panels, score_panels = [], []
    for task in TASKS:
        curves, edited, unedited = (aggregate[k][task] for k in ("curves", "p_edited", "p_unedited"))
        panels.append(
            plots.LinePanel(
                f"{TASKS[task]} ({aggregate['n_prompts'][task]} prompts)",
                {f"patched P({target})": curves[target] for target in TARGETS},
                {
                    **{f"edited P({target})": float(edited[target]) for target in TARGETS},
                    **{f"unedited P({target})": float(unedited[target]) for target in TARGETS},
                },
            )
        )
        if options.scores:
            score_panels += [
                plots.HeatmapPanel(f"{TASKS[task]}: effect on P({target})", aggregate["scores"][task][target])
                for target in TARGETS
            ]
    window = options.window
    figures = [
        plots.line_panels(
            panels,
            out / "patch_curves.png",
            title=f"attention patching ({options.queries} queries, window {window}), {n_used} cases",
            ylabel="P",
        )
    ]
    if options.scores:
        figures.append(
            plots.heatmaps(
                score_panels,
                POSITIONS,
                out / "patch_scores.png",
                title=f"single-entry attention patching (window {window}), {n_used} cases",
                colorbar="patched - edited P",
            )
        )
    return figures


def run_patch(setting: Setting, options: PatchOptions) -> AnalysisResult:
    """Attention patching (SADR section 3.4; ``scores``: appendix D.2) of ``setting.method``'s edits."""
    session = start("patch", setting, options.manifest(), edit=True)
    bundle = session.bundle
    records = run_cases(session, partial(patch_record, options=options))
    aggregate = patch_aggregate(records, bundle.adapter.n_layers, options.scores)
    n_used = sum("skipped" not in r for r in records)
    figures = patch_figures(aggregate, options, n_used, setting.out)
    return _result(session, records, json_ready(aggregate), figures)
