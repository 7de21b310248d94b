"""``attnedit analyze trace | substitute | drift | patch``: the SADR paper's section 3 analyses of data.

Every subcommand writes into its ``--out`` directory::

    manifest.json   model fingerprint, analysis and its options, method, hyper-parameters, data sha256, seed
    cases.jsonl     one JSON line per finished case (appended and fsynced one by one)
    NAME.json       every case's record plus the aggregates the figures show (NAME = the subcommand)
    *.png           the figures

Resuming: the same command again skips the cases already in ``cases.jsonl`` (a torn last line is cut off);
a directory holding a run with other settings is refused, as ``attnedit eval`` does.

Token alignment (heatmap rows, ROME's averaging): per prompt, the edited subject's FIRST occurrence gives
``first subject`` (its first token), ``middle subject`` (tokens strictly between first and last, averaged),
``last subject``, ``first subsequent`` (the token after the subject, unless it is the last token),
``further`` (tokens after that up to, not including, the last token, averaged) and ``last`` (the prompt's
last token). Tokens before the subject are left out. A prompt without the subject only contributes to
``further`` (every token but the last) and ``last``. Rows no prompt has stay NaN (blank in the figures).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from attnedit.analysis.aggregate import (
    POSITIONS,
    TARGETS,
    TASKS,
    aligned,
    as_array,
    correlation_table,
    nanmean,
)
from attnedit.analysis.engine import json_ready
from attnedit.cli.common import parse_overrides, setup_logging, split_sadr
from attnedit.runs.analyses import Session, Setting, run_cases, start, subject_span
from attnedit.runs.analyses import finish as write_result

app = typer.Typer(
    no_args_is_help=True,
    help="The SADR paper's analyses (causal tracing, contaminating substitution, attention drift, "
    "attention patching) over a data set, with figures.",
)
logger = logging.getLogger("attnedit")

def _kinds(text: str) -> tuple[str, ...]:
    from attnedit.analysis.engine import TRACE_KINDS

    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in TRACE_KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds: comma-separated among {', '.join(TRACE_KINDS)}, not {text!r}")
    return kinds


def _layers(text: str | None) -> list[int] | None:
    """``--drift-layers``: ``A-B`` (inclusive), ``A,B,C`` or ``all``; None = every layer."""
    from attnedit.core.layer_range import parse_layers

    try:
        return parse_layers(text) if text else None
    except ValueError as err:
        raise ValueError(f"--drift-layers: {err}") from None


def finish(session: Session, records: list[dict], aggregate: dict, figures: Sequence[Path]) -> Path:
    """Write the analysis result and print where everything is."""
    path = write_result(session, records, aggregate, figures)
    typer.echo(f"{session.setting.analysis}: {len(records)} cases -> {path}")
    for figure in figures:
        typer.echo(f"figure: {figure}")
    return path


def _guarded(body: Callable[[], None]) -> None:
    try:
        body()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        logger.error("%s", err)
        raise typer.Exit(2) from None


def _prepare(verbose: bool, threads: int | None, param: list[str] | None) -> dict[str, str]:
    setup_logging(verbose, threads)
    return parse_overrides(param)


# --- options shared by the subcommands ----------------------------------------------------------------

Data = Annotated[str, typer.Argument(help="data file, or 'sample' for the shipped sample set")]
Model = Annotated[str, typer.Option(help="embedded name, local HF directory or hub id")]
Method = Annotated[str, typer.Option(help="rome | memit | pmet | ft, optionally +sadr (rome+sadr)")]
Preset = Annotated[str | None, typer.Option(help="preset name or JSON file (default: by model)")]
Param = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="override a preset field: KEY=VALUE (repeatable)")
]
First = Annotated[int, typer.Option(help="skip the cases before this index")]
Limit = Annotated[int | None, typer.Option(help="first N cases only (counted from --first)")]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads")]
Seed = Annotated[int, typer.Option(help="random seed (trace: the noise seed; recorded in the manifest)")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v")]


Out = Annotated[Path, typer.Option("--out", help="output directory (manifest, cases.jsonl, JSON, PNG)")]


# --- 1. causal tracing --------------------------------------------------------------------------------


@app.command("trace")
def trace_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    kinds: Annotated[str, typer.Option(help="module kinds to restore: layer,mlp,attn")] = "layer,mlp,attn",
    window: Annotated[int, typer.Option(help="layers restored together for mlp and attn (ROME: 10)")] = 10,
    layer_window: Annotated[int, typer.Option(help="layers restored together for 'layer' (ROME: 1)")] = 1,
    samples: Annotated[int, typer.Option(help="noise samples per case")] = 10,
    noise: Annotated[
        float | None, typer.Option(help="noise std (default: 3 x the embeddings' std, as ROME)")
    ] = None,
    first: First = 0,
    limit: Limit = None,
    out: Out = Path("runs/analyze/trace"),
    threads: Threads = None,
    seed: Seed = 0,
    verbose: Verbose = False,
) -> None:
    """ROME's causal tracing of the UNEDITED model on each case's request prompt with o_true: average
    indirect effects per module kind (heatmaps over aligned tokens) and the per-layer MLP vs attention
    effects at the subject's last token."""
    _prepare(verbose, threads, None)

    def body() -> None:
        from attnedit.analysis import plots
        from attnedit.analysis.tracing import causal_trace, layer_effects

        chosen = _kinds(kinds)
        if samples < 1:
            raise ValueError("--samples must be at least 1")
        windows = {k: (layer_window if k == "layer" else window) for k in chosen}
        options = {"kinds": list(chosen), "windows": windows, "samples": samples, "noise": noise}
        session = start(Setting("trace", data, model, out, first, limit, seed, options))
        bundle = session.bundle

        def compute(case: Any) -> dict:
            req = case.request
            record: dict[str, Any] = {"restored": {}, "layer_effects": {}}
            for w in dict.fromkeys(windows.values()):
                group = [k for k in chosen if windows[k] == w]
                trace = causal_trace(
                    bundle, req.prompt, req.subject, req.target_true, group, w, noise, samples, seed
                )
                for key in ("prompt", "subject", "target", "tokens", "subject_first", "subject_last"):
                    record[key] = getattr(trace, key)
                record.update(noise=trace.noise, clean=trace.clean, corrupted=trace.corrupted)
                record["restored"].update(trace.restored)
                record["layer_effects"].update(layer_effects(trace))
            return record

        records = run_cases(session, compute)
        n_layers = bundle.adapter.n_layers
        aggregate: dict[str, Any] = {
            "clean": nanmean([r["clean"] for r in records], ()),
            "corrupted": nanmean([r["corrupted"] for r in records], ()),
            "indirect_effect": {},
            "restored": {},
            "layer_effects": {},
        }
        for kind in chosen:
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
        names = {"layer": "hidden states", "mlp": "MLP", "attn": "attention"}
        figures = [
            plots.heatmaps(
                [
                    plots.HeatmapPanel(f"{names[k]} (window {windows[k]})", aggregate["indirect_effect"][k])
                    for k in chosen
                ],
                POSITIONS,
                out / "trace_heatmaps.png",
                title=f"causal tracing, {len(records)} cases: average indirect effect on P(o_true)",
                colorbar="restored - corrupted P",
                columns=3,
            ),
            plots.layer_lines(
                {names[k]: aggregate["layer_effects"][k] for k in chosen if k != "layer"}
                or {names[k]: aggregate["layer_effects"][k] for k in chosen},
                out / "trace_layers.png",
                title="indirect effect at the subject's last token",
                ylabel="restored - corrupted P(o_true)",
            ),
        ]
        finish(session, records, json_ready(aggregate), figures)

    _guarded(body)


# --- 2. contaminating substitution --------------------------------------------------------------------


def _task_prompts(records: Sequence[dict], task: str) -> list[tuple[dict, int]]:
    """(record, prompt index) of every prompt of ``task`` in ``records``."""
    return [(r, i) for r in records for i, m in enumerate(r["metrics"]) if m == task]


def _edited_session(
    name: str,
    data: str,
    model: str,
    method: str,
    preset: str | None,
    params: dict,
    out: Path,
    first: int,
    limit: int | None,
    seed: int,
    options: dict,
) -> Session:
    params, sadr = split_sadr(params)  # -p sadr_gamma=0.1: a setting of the SADR term
    return start(Setting(name, data, model, out, first, limit, seed, options, method, preset, params, sadr))


def _specificity(case: Any) -> Any:
    from attnedit.analysis.specificity import specificity_prompts

    sp = specificity_prompts(case, tuple(TASKS))
    if not sp.prompts:
        logger.warning("case %s has no Distract-Neighborhood or Relation prompts: skipped", case.case_id)
    return sp


@app.command("substitute")
def substitute_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    method: Method = "rome",
    preset: Preset = None,
    param: Param = None,
    kinds: Annotated[str, typer.Option(help="module kinds substituted: attn,mlp,layer")] = "attn,mlp",
    window: Annotated[int, typer.Option(help="layers substituted together (the paper: 6)")] = 6,
    first: First = 0,
    limit: Limit = None,
    out: Out = Path("runs/analyze/substitute"),
    threads: Threads = None,
    seed: Seed = 0,
    verbose: Verbose = False,
) -> None:
    """Contaminating substitution (SADR section 3.2, figures 3 and 9): edit, record the edited model's module
    outputs on the Distract-Neighborhood and Relation prompts, revert, and run the unedited model with them
    substituted over a window of layers at each token; the effect on P(o_true) and P(o_edit)."""
    overrides = _prepare(verbose, threads, param)

    def body() -> None:
        from attnedit.analysis import plots
        from attnedit.analysis.substitution import record_outputs, substitute_outputs

        chosen = _kinds(kinds)
        options = {"kinds": list(chosen), "window": window}
        session = _edited_session(
            "substitute", data, model, method, preset, overrides, out, first, limit, seed, options
        )
        bundle = session.bundle

        def compute(case: Any) -> dict:
            sp = _specificity(case)
            if not sp.prompts:
                return {"skipped": "no Distract-Neighborhood or Relation prompts"}
            edit = session.editor.apply(bundle, [case])
            try:
                recorded = record_outputs(bundle, sp.prompts, chosen)
            finally:
                edit.revert()
            effects = substitute_outputs(bundle, recorded, sp.targets, window, chosen)
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

        records = run_cases(session, compute)
        used = [r for r in records if "skipped" not in r]
        n_layers = bundle.adapter.n_layers
        shape = (len(POSITIONS), n_layers)
        aggregate: dict[str, Any] = {"effects": {}, "base": {}, "n_prompts": {}}
        prompts_of = {task: _task_prompts(used, task) for task in TASKS}
        for task, at in prompts_of.items():
            aggregate["n_prompts"][task] = len(at)
            aggregate["base"][task] = nanmean([as_array(r["base"][i]) for r, i in at], (2,))
        for kind in chosen:
            aggregate["effects"][kind] = {}
            for task, at in prompts_of.items():
                aggregate["effects"][kind][task] = {}
                for t, target in enumerate(TARGETS):
                    grids = [
                        aligned(
                            as_array(r["values"][kind][i])[..., t] - r["base"][i][t], *r["subject_tokens"][i]
                        )
                        for r, i in at
                    ]
                    aggregate["effects"][kind][task][target] = nanmean(grids, shape)
        names = {"layer": "hidden states", "mlp": "MLP", "attn": "attention"}
        figures = [
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
                title=f"contaminating substitution of edited {names[kind]} outputs (window {window}), "
                f"{len(used)} cases",
                colorbar="substituted - unedited P",
            )
            for kind in chosen
        ]
        finish(session, records, json_ready(aggregate), figures)

    _guarded(body)


# --- 3. attention drift -------------------------------------------------------------------------------


@app.command("drift")
def drift_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    method: Method = "rome",
    preset: Preset = None,
    param: Param = None,
    drift_layers: Annotated[
        str | None, typer.Option(help="layers the factors sum over: FIRST-LAST or A,B,C (default: all)")
    ] = None,
    first: First = 0,
    limit: Limit = None,
    out: Out = Path("runs/analyze/drift"),
    threads: Threads = None,
    seed: Seed = 0,
    verbose: Verbose = False,
) -> None:
    """Attention drift (SADR section 3.3, figure 4, tables 2 and 4): per case the unedited and edited
    last-token attention on the Distract-Neighborhood and Relation prompts, the drift factors, and their
    Pearson correlation with the edited P(o_edit) per task."""
    overrides = _prepare(verbose, threads, param)

    def body() -> None:
        import numpy as np

        from attnedit.analysis import plots
        from attnedit.analysis.drift import (
            FACTORS,
            attention_drift,
            drift_factors,
            pearson,
            record_last_token_attention,
        )

        layers = _layers(drift_layers)
        options = {"drift_layers": layers}
        session = _edited_session(
            "drift", data, model, method, preset, overrides, out, first, limit, seed, options
        )
        bundle = session.bundle
        if layers is not None and not all(0 <= x < bundle.adapter.n_layers for x in layers):
            n = bundle.adapter.n_layers
            raise ValueError(f"--drift-layers {drift_layers!r}: the model has {n} layers")

        def compute(case: Any) -> dict:
            sp = _specificity(case)
            keep = [i for i, p in enumerate(sp.prompts) if sp.subject in p]
            for i in sorted(set(range(len(sp.prompts))) - set(keep)):
                logger.warning("case %s: subject not in %s prompt %r: left out", case.case_id, *_at(sp, i))
            if not keep:
                return {"skipped": "no Distract-Neighborhood or Relation prompt containing the subject"}
            prompts = [sp.prompts[i] for i in keep]
            targets = [sp.targets[i] for i in keep]
            unedited = record_last_token_attention(bundle, prompts, sp.subject, targets)
            edit = session.editor.apply(bundle, [case])
            try:
                edited = record_last_token_attention(bundle, prompts, sp.subject, targets)
            finally:
                edit.revert()
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

        records = run_cases(session, compute)
        used = [r for r in records if "skipped" not in r]
        aggregate: dict[str, Any] = {"outcome": "edited P(o_edit)", "correlations": {}, "means": {}}
        points = {}
        for task in TASKS:
            at = _task_prompts(used, task)
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
        aggregate = json_ready(aggregate)
        table = correlation_table(aggregate["correlations"])
        (out / "drift_correlations.md").write_text(table)
        figures = [
            plots.scatter(
                points,
                out / "drift_kl.png",
                title=f"attention drift vs P(o_edit), {len(used)} cases",
                xlabel="attention drift: sum of KL(W || W*)",
                ylabel="edited P(o_edit)",
            )
        ]
        finish(session, records, aggregate, figures)
        typer.echo(table)

    _guarded(body)


def _at(sp: Any, i: int) -> tuple[str, str]:
    return TASKS.get(sp.metrics[i], sp.metrics[i]), sp.prompts[i]


# --- 4. attention patching ----------------------------------------------------------------------------


@app.command("patch")
def patch_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    method: Method = "rome",
    preset: Preset = None,
    param: Param = None,
    window: Annotated[int, typer.Option(help="layers patched together (the paper: 10)")] = 10,
    queries: Annotated[str, typer.Option(help="all (whole attention matrices, the paper) | last")] = "all",
    scores: Annotated[
        bool, typer.Option(help="also the single-entry variant: the last token's score on each token")
    ] = False,
    first: First = 0,
    limit: Limit = None,
    out: Out = Path("runs/analyze/patch"),
    threads: Threads = None,
    seed: Seed = 0,
    verbose: Verbose = False,
) -> None:
    """Attention patching (SADR section 3.4, figure 5; --scores: appendix D.2, figure 10): run the edited
    model with the unedited attention over a window of layers; P(o_true) and P(o_edit) against the window
    centre, with the unpatched edited and the unedited levels."""
    overrides = _prepare(verbose, threads, param)

    def body() -> None:
        from attnedit.analysis import plots
        from attnedit.analysis.drift import record_last_token_attention
        from attnedit.analysis.patching import (
            PATCH_QUERIES,
            patch_attention,
            patch_attention_scores,
            record_attention,
        )

        if queries not in PATCH_QUERIES:
            raise ValueError(f"--queries must be one of {', '.join(PATCH_QUERIES)}, not {queries!r}")
        options = {"window": window, "queries": queries, "scores": scores}
        session = _edited_session(
            "patch", data, model, method, preset, overrides, out, first, limit, seed, options
        )
        bundle = session.bundle

        def compute(case: Any) -> dict:
            sp = _specificity(case)
            if not sp.prompts:
                return {"skipped": "no Distract-Neighborhood or Relation prompts"}
            unedited = record_last_token_attention(bundle, sp.prompts, None, sp.targets).target_probs
            recorded = record_attention(bundle, sp.prompts)
            edit = session.editor.apply(bundle, [case])
            try:
                curves = patch_attention(bundle, recorded, sp.targets, window, queries)
                single = patch_attention_scores(bundle, recorded, sp.targets, window) if scores else None
            finally:
                edit.revert()
            record = {
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

        records = run_cases(session, compute)
        used = [r for r in records if "skipped" not in r]
        n_layers = bundle.adapter.n_layers
        aggregate: dict[str, Any] = {"curves": {}, "p_edited": {}, "p_unedited": {}, "n_prompts": {}}
        if scores:
            aggregate["scores"] = {}
        panels, score_panels = [], []
        for task in TASKS:
            at = _task_prompts(used, task)
            aggregate["n_prompts"][task] = len(at)
            curve = nanmean([as_array(r["curves"][i]) for r, i in at], (n_layers, 2))
            edited = nanmean([as_array(r["p_edited"][i]) for r, i in at], (2,))
            unedited = nanmean([as_array(r["p_unedited"][i]) for r, i in at], (2,))
            aggregate["curves"][task] = {target: curve[:, t] for t, target in enumerate(TARGETS)}
            aggregate["p_edited"][task] = {target: edited[t] for t, target in enumerate(TARGETS)}
            aggregate["p_unedited"][task] = {target: unedited[t] for t, target in enumerate(TARGETS)}
            panels.append(
                plots.LinePanel(
                    f"{TASKS[task]} ({len(at)} prompts)",
                    {f"patched P({target})": curve[:, t] for t, target in enumerate(TARGETS)},
                    {
                        **{f"edited P({target})": float(edited[t]) for t, target in enumerate(TARGETS)},
                        **{f"unedited P({target})": float(unedited[t]) for t, target in enumerate(TARGETS)},
                    },
                )
            )
            if scores:
                aggregate["scores"][task] = {}
                for t, target in enumerate(TARGETS):
                    grids = [
                        aligned(
                            as_array(r["scores"][i])[..., t] - r["p_edited"][i][t], *r["subject_tokens"][i]
                        )
                        for r, i in at
                    ]
                    mean = nanmean(grids, (len(POSITIONS), n_layers))
                    aggregate["scores"][task][target] = mean
                    score_panels.append(plots.HeatmapPanel(f"{TASKS[task]}: effect on P({target})", mean))
        figures = [
            plots.line_panels(
                panels,
                out / "patch_curves.png",
                title=f"attention patching ({queries} queries, window {window}), {len(used)} cases",
                ylabel="P",
            )
        ]
        if scores:
            figures.append(
                plots.heatmaps(
                    score_panels,
                    POSITIONS,
                    out / "patch_scores.png",
                    title=f"single-entry attention patching (window {window}), {len(used)} cases",
                    colorbar="patched - edited P",
                )
            )
        finish(session, records, json_ready(aggregate), figures)

    _guarded(body)
