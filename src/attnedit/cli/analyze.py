"""``attnedit analyze trace | substitute | drift | patch``: the SADR paper's section 3 analyses of data.

Each subcommand parses its options and calls ``runs.analysis_runs.run_NAME``, which writes the run
directory given by ``--out`` (``runs.analyses``: manifest, ``cases.jsonl``, ``NAME.json``, figures;
resumable) and returns what is printed here. The heatmaps' token alignment: ``analysis.aggregate``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from attnedit.cli.common import (
    Language,
    QuestionTemplate,
    check_limit,
    check_writable_dir,
    error_boundary,
    parse_overrides,
    setup_logging,
    split_sadr,
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
from attnedit.runs.executors import RayOptions

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


def _setting(
    data: str,
    model: str,
    out: Path,
    first: int,
    limit: int | None,
    seed: int,
    method: str | None = None,
    preset: str | None = None,
    overrides: dict[str, str] | None = None,
    repair: bool = False,
    language: str | None = None,
    question_template: str | None = None,
    ray: RayOptions | None = None,
) -> Setting:
    params, sadr = split_sadr(overrides or {})  # -p sadr_gamma=0.1: a setting of the SADR term
    multilingual = {"language": language, "question_template": question_template}
    return Setting(
        data, model, out, first, limit, seed, method, preset, params, sadr, repair, **multilingual, ray=ray
    )


def _report(result: AnalysisResult) -> None:
    """Print where everything is."""
    typer.echo(f"{result.analysis}: {result.n_cases} cases -> {result.path}")
    for figure in result.figures:
        typer.echo(f"figure: {figure}")


def _prepare(
    verbose: bool, threads: int | None, param: list[str] | None, first: int, limit: int | None, out: Path
) -> dict[str, str]:
    """Check the flags (before any work) and set up logging; the ``--param`` overrides."""
    check_limit(limit, first)
    overrides = parse_overrides(param)
    check_writable_dir(out)
    setup_logging(verbose, threads)
    return overrides


# --- options shared by the subcommands ----------------------------------------------------------------

# where the cases are computed (``attnedit eval`` takes the same flags)
Backend = Annotated[
    str, typer.Option(help="local (this process) | ray (Ray actors; pip install attnedit[ray])")
]
Workers = Annotated[int, typer.Option(help="--backend ray: actors, each loading the model once")]
Address = Annotated[
    str | None,
    typer.Option(help="--backend ray: cluster address, or 'auto' (the running cluster); default: start one"),
]
CpusPerWorker = Annotated[float, typer.Option(help="--backend ray: CPUs per actor (its torch threads)")]
GpusPerWorker = Annotated[float, typer.Option(help="--backend ray: GPUs per actor (e.g. 0.25: 4 on one GPU)")]
MaxRetries = Annotated[int, typer.Option(help="--backend ray: tries again of a unit whose actor died")]


def ray_options(
    backend: str, workers: int, address: str | None, cpus: float, gpus: float, max_retries: int
) -> RayOptions | None:
    """The Ray settings of ``--backend ray`` (None for ``local``); without Ray installed, one line saying
    how to install it (exit 2), before any work."""
    from attnedit.runs.executors import BACKENDS, RayMissingError, require_ray

    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"must be one of {', '.join(BACKENDS)}, not {backend!r}", param_hint="--backend"
        )
    if backend == "local":
        return None
    try:
        require_ray()
    except RayMissingError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    return RayOptions(workers, address, cpus, gpus, max_retries)


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
Repair = Annotated[
    bool,
    typer.Option(help="first move unreadable lines of OUT/cases.jsonl aside (cases.jsonl.quarantine)"),
]


# the defaults of the options are those of the run functions' option dataclasses
_TRACED = ",".join(TraceOptions.kinds)
_SUBSTITUTED = ",".join(SubstituteOptions.kinds)

Out = Annotated[Path, typer.Option("--out", help="output directory (manifest, cases.jsonl, JSON, PNG)")]


# --- 1. causal tracing --------------------------------------------------------------------------------


@app.command("trace")
@error_boundary
def trace_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
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
    first: First = 0,
    limit: Limit = None,
    language: Language = None,
    question_template: QuestionTemplate = None,
    out: Out = Path("runs/analyze/trace"),
    threads: Threads = None,
    seed: Seed = 0,
    repair: Repair = False,
    backend: Backend = "local",
    workers: Workers = 2,
    address: Address = None,
    cpus_per_worker: CpusPerWorker = 1,
    gpus_per_worker: GpusPerWorker = 0,
    max_retries: MaxRetries = 2,
    verbose: Verbose = False,
) -> None:
    """ROME's causal tracing of the UNEDITED model on each case's request prompt with o_true: average
    indirect effects per module kind (heatmaps over aligned tokens) and the per-layer MLP vs attention
    effects at the subject's last token."""
    _prepare(verbose, threads, None, first, limit, out)
    ray = ray_options(backend, workers, address, cpus_per_worker, gpus_per_worker, max_retries)
    options = TraceOptions(_kinds(kinds), window, layer_window, samples, noise)
    multilingual = {"language": language, "question_template": question_template}
    _report(
        run_trace(
            _setting(data, model, out, first, limit, seed, repair=repair, **multilingual, ray=ray), options
        )
    )


# --- 2. contaminating substitution --------------------------------------------------------------------


@app.command("substitute")
@error_boundary
def substitute_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    method: Method = "rome",
    preset: Preset = None,
    param: Param = None,
    kinds: Annotated[str, typer.Option(help="module kinds substituted: attn,mlp,layer")] = _SUBSTITUTED,
    window: Annotated[
        int, typer.Option(help="layers substituted together (the paper: 6)")
    ] = SubstituteOptions.window,
    first: First = 0,
    limit: Limit = None,
    language: Language = None,
    question_template: QuestionTemplate = None,
    out: Out = Path("runs/analyze/substitute"),
    threads: Threads = None,
    seed: Seed = 0,
    repair: Repair = False,
    backend: Backend = "local",
    workers: Workers = 2,
    address: Address = None,
    cpus_per_worker: CpusPerWorker = 1,
    gpus_per_worker: GpusPerWorker = 0,
    max_retries: MaxRetries = 2,
    verbose: Verbose = False,
) -> None:
    """Contaminating substitution (SADR section 3.2, figures 3 and 9): edit, record the edited model's module
    outputs on the Distract-Neighborhood and Relation prompts, revert, and run the unedited model with them
    substituted over a window of layers at each token; the effect on P(o_true) and P(o_edit)."""
    overrides = _prepare(verbose, threads, param, first, limit, out)
    ray = ray_options(backend, workers, address, cpus_per_worker, gpus_per_worker, max_retries)
    options = SubstituteOptions(_kinds(kinds), window)
    setting = _setting(
        data,
        model,
        out,
        first,
        limit,
        seed,
        method,
        preset,
        overrides,
        repair,
        language,
        question_template,
        ray,
    )
    _report(run_substitute(setting, options))


# --- 3. attention drift -------------------------------------------------------------------------------


@app.command("drift")
@error_boundary
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
    language: Language = None,
    question_template: QuestionTemplate = None,
    out: Out = Path("runs/analyze/drift"),
    threads: Threads = None,
    seed: Seed = 0,
    repair: Repair = False,
    backend: Backend = "local",
    workers: Workers = 2,
    address: Address = None,
    cpus_per_worker: CpusPerWorker = 1,
    gpus_per_worker: GpusPerWorker = 0,
    max_retries: MaxRetries = 2,
    verbose: Verbose = False,
) -> None:
    """Attention drift (SADR section 3.3, figure 4, tables 2 and 4): per case the unedited and edited
    last-token attention on the Distract-Neighborhood and Relation prompts, the drift factors, and their
    Pearson correlation with the edited P(o_edit) per task."""
    overrides = _prepare(verbose, threads, param, first, limit, out)
    ray = ray_options(backend, workers, address, cpus_per_worker, gpus_per_worker, max_retries)
    layers = _layers(drift_layers)
    options = DriftOptions(None if layers is None else tuple(layers))
    setting = _setting(
        data,
        model,
        out,
        first,
        limit,
        seed,
        method,
        preset,
        overrides,
        repair,
        language,
        question_template,
        ray,
    )
    try:
        result = run_drift(setting, options)
    except DriftLayersError as err:
        raise ValueError(f"--drift-layers {drift_layers!r}: the model has {err.n_layers} layers") from None
    _report(result)
    typer.echo(result.table)


# --- 4. attention patching ----------------------------------------------------------------------------


@app.command("patch")
@error_boundary
def patch_command(
    data: Data = "sample",
    model: Model = "smollm2-135m",
    method: Method = "rome",
    preset: Preset = None,
    param: Param = None,
    window: Annotated[
        int, typer.Option(help="layers patched together (the paper: 10)")
    ] = PatchOptions.window,
    queries: Annotated[
        str, typer.Option(help="all (whole attention matrices, the paper) | last")
    ] = PatchOptions.queries,
    scores: Annotated[
        bool, typer.Option(help="also the single-entry variant: the last token's score on each token")
    ] = PatchOptions.scores,
    first: First = 0,
    limit: Limit = None,
    language: Language = None,
    question_template: QuestionTemplate = None,
    out: Out = Path("runs/analyze/patch"),
    threads: Threads = None,
    seed: Seed = 0,
    repair: Repair = False,
    backend: Backend = "local",
    workers: Workers = 2,
    address: Address = None,
    cpus_per_worker: CpusPerWorker = 1,
    gpus_per_worker: GpusPerWorker = 0,
    max_retries: MaxRetries = 2,
    verbose: Verbose = False,
) -> None:
    """Attention patching (SADR section 3.4, figure 5; --scores: appendix D.2, figure 10): run the edited
    model with the unedited attention over a window of layers; P(o_true) and P(o_edit) against the window
    centre, with the unpatched edited and the unedited levels."""
    overrides = _prepare(verbose, threads, param, first, limit, out)
    ray = ray_options(backend, workers, address, cpus_per_worker, gpus_per_worker, max_retries)
    options = PatchOptions(window, queries, scores)
    setting = _setting(
        data,
        model,
        out,
        first,
        limit,
        seed,
        method,
        preset,
        overrides,
        repair,
        language,
        question_template,
        ray,
    )
    _report(run_patch(setting, options))
