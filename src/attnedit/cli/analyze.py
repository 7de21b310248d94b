"""``attnedit analyze trace | substitute | drift | patch``: the SADR paper's section 3 analyses of data.

Each subcommand parses its options and calls ``runs.analysis_runs.run_NAME``, which writes the run
directory given by ``--out`` (``runs.analyses``: manifest, ``cases.jsonl``, ``NAME.json``, figures;
resumable) and returns what is printed here. The heatmaps' token alignment: ``analysis.aggregate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from attnedit.cli.common import (
    RAY_FLAGS,
    Data,
    First,
    Language,
    Limit,
    MethodChoice,
    Model,
    OptionGroup,
    QuestionTemplate,
    Threads,
    Verbose,
    check_limit,
    check_writable_dir,
    error_boundary,
    flag,
    method_choice,
    method_flags,
    ray_options,
    setup_logging,
)
from attnedit.runs.analyses import Setting
from attnedit.runs.analysis_runs import (
    AnalysisResult,
    DriftLayersError,
    DriftOptions,
    PatchOptions,
    SubstituteOptions,
    TraceOptions,
    run_drift,
    run_patch,
    run_substitute,
    run_trace,
)

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


def _report(result: AnalysisResult) -> None:
    """Print where everything is."""
    typer.echo(f"{result.analysis}: {result.n_cases} cases -> {result.path}")
    for figure in result.figures:
        typer.echo(f"figure: {figure}")


# --- the flags every analysis takes, given to its command as one ``Setting`` -----------------------------

Seed = Annotated[int, typer.Option(help="random seed (trace: the noise seed; recorded in the manifest)")]
Repair = Annotated[
    bool,
    typer.Option(help="first move unreadable lines of OUT/cases.jsonl aside (cases.jsonl.quarantine)"),
]
Out = Annotated[Path, typer.Option("--out", help="output directory (manifest, cases.jsonl, JSON, PNG)")]


def _setting(
    data: str,
    model: str,
    first: int,
    limit: int | None,
    language: str | None,
    question_template: str | None,
    out: Path,
    threads: int | None,
    seed: int,
    repair: bool,
    verbose: bool,
    choice: MethodChoice | None = None,
    **ray_flags: Any,
) -> Setting:
    """Check the flags (before any work), set up logging and Ray: the analysis's ``Setting``."""
    check_limit(limit, first)
    check_writable_dir(out)
    ray = ray_options(**ray_flags)
    setup_logging(verbose, threads)
    return Setting(
        data,
        model,
        out,
        first,
        limit,
        seed,
        method=choice.method if choice is not None else None,
        preset=choice.preset if choice is not None else None,
        params=choice.params if choice is not None else {},
        sadr=choice.sadr if choice is not None else {},
        repair=repair,
        language=language,
        question_template=question_template,
        ray=ray,
    )


def _analysis(name: str, edits: bool) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``attnedit analyze NAME``: the command takes the common flags (and, for an analysis of an
    edit, the method flags) and receives them as ``setting: Setting``."""
    method = method_flags() if edits else ()
    names = [p.name for p in method]

    def build(**values: Any) -> Setting:
        choice = method_choice(**{n: values.pop(n) for n in names}) if edits else None
        return _setting(**values, choice=choice)

    group = OptionGroup(
        "setting",
        build,
        head=(flag("data", Data, "sample"), flag("model", Model, "smollm2-135m"), *method),
        tail=(
            flag("first", First, 0),
            flag("limit", Limit, None),
            flag("language", Language, None),
            flag("question_template", QuestionTemplate, None),
            flag("out", Out, Path(f"runs/analyze/{name}")),
            flag("threads", Threads, None),
            flag("seed", Seed, 0),
            flag("repair", Repair, False),
            *RAY_FLAGS,
            flag("verbose", Verbose, False),
        ),
    )
    return lambda command: app.command(name)(error_boundary(group(command)))


# the defaults of the options are those of the run functions' option dataclasses
_TRACED = ",".join(TraceOptions.kinds)
_SUBSTITUTED = ",".join(SubstituteOptions.kinds)


# --- 1. causal tracing --------------------------------------------------------------------------------


@_analysis("trace", edits=False)
def trace_command(
    setting: Setting,
    kinds: Annotated[str, typer.Option(help="module kinds to restore: layer,mlp,attn")] = _TRACED,
    window: Annotated[
        int, typer.Option(help="layers restored together for mlp and attn (ROME: 10)")
    ] = TraceOptions.window,
    layer_window: Annotated[
        int, typer.Option(help="layers restored together for 'layer' (ROME: 1)")
    ] = TraceOptions.layer_window,
    samples: Annotated[int, typer.Option(help="noise samples per case")] = TraceOptions.samples,
    noise: Annotated[
        float | None, typer.Option(help="noise std (default: 3 x the embeddings' std, as ROME)")
    ] = TraceOptions.noise,
) -> None:
    """ROME's causal tracing of the UNEDITED model on each case's request prompt with o_true: average
    indirect effects per module kind (heatmaps over aligned tokens) and the per-layer MLP vs attention
    effects at the subject's last token."""
    _report(run_trace(setting, TraceOptions(_kinds(kinds), window, layer_window, samples, noise)))


# --- 2. contaminating substitution --------------------------------------------------------------------


@_analysis("substitute", edits=True)
def substitute_command(
    setting: Setting,
    kinds: Annotated[str, typer.Option(help="module kinds substituted: attn,mlp,layer")] = _SUBSTITUTED,
    window: Annotated[
        int, typer.Option(help="layers substituted together (the paper: 6)")
    ] = SubstituteOptions.window,
) -> None:
    """Contaminating substitution (SADR section 3.2, figures 3 and 9): edit, record the edited model's module
    outputs on the Distract-Neighborhood and Relation prompts, revert, and run the unedited model with them
    substituted over a window of layers at each token; the effect on P(o_true) and P(o_edit)."""
    options = SubstituteOptions(_kinds(kinds), window)
    _report(run_substitute(setting, options))


# --- 3. attention drift -------------------------------------------------------------------------------


@_analysis("drift", edits=True)
def drift_command(
    setting: Setting,
    drift_layers: Annotated[
        str | None, typer.Option(help="layers the factors sum over: FIRST-LAST or A,B,C (default: all)")
    ] = None,
) -> None:
    """Attention drift (SADR section 3.3, figure 4, tables 2 and 4): per case the unedited and edited
    last-token attention on the Distract-Neighborhood and Relation prompts, the drift factors, and their
    Pearson correlation with the edited P(o_edit) per task."""
    layers = _layers(drift_layers)
    options = DriftOptions(None if layers is None else tuple(layers))
    try:
        result = run_drift(setting, options)
    except DriftLayersError as err:
        raise ValueError(f"--drift-layers {drift_layers!r}: the model has {err.n_layers} layers") from None
    _report(result)
    typer.echo(result.table)


# --- 4. attention patching ----------------------------------------------------------------------------


@_analysis("patch", edits=True)
def patch_command(
    setting: Setting,
    window: Annotated[
        int, typer.Option(help="layers patched together (the paper: 10)")
    ] = PatchOptions.window,
    queries: Annotated[
        str, typer.Option(help="all (whole attention matrices, the paper) | last")
    ] = PatchOptions.queries,
    scores: Annotated[
        bool, typer.Option(help="also the single-entry variant: the last token's score on each token")
    ] = PatchOptions.scores,
) -> None:
    """Attention patching (SADR section 3.4, figure 5; --scores: appendix D.2, figure 10): run the edited
    model with the unedited attention over a window of layers; P(o_true) and P(o_edit) against the window
    centre, with the unpatched edited and the unedited levels."""
    options = PatchOptions(window, queries, scores)
    _report(run_patch(setting, options))
