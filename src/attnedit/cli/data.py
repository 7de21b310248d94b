"""``attnedit data list | fetch | verify``: the registered data sets (``core.datasets``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from attnedit.cli.common import Verbose, error_boundary, setup_logging
from attnedit.core.data import FORMATS, sample_path
from attnedit.core.datasets import (
    DATA_ENV,
    DATASETS,
    DataSet,
    data_cache,
    data_dirs,
    dataset_files,
    get_dataset,
    locate,
    verify,
)
from attnedit.core.download import human_size

app = typer.Typer(
    no_args_is_help=True,
    help=f"The data sets attnedit evaluates on, by name: found in ${DATA_ENV} folders, the cache, or "
    "downloaded from their pinned source.",
)

Names = Annotated[list[str] | None, typer.Argument(help="data set names (attnedit data list); none: all")]


def _presence(dataset: DataSet) -> str:
    places = {locate(f)[1] for f in dataset.files}
    if places == {"missing"}:
        return "missing"
    if "missing" in places:
        return "partly (" + ", ".join(sorted(places - {"missing"})) + ")"
    return ", ".join(sorted(places))


def _checked(names: list[str] | None) -> list[str]:
    """``names`` (all when empty), each a registered name: an unknown one is an error before any work."""
    for name in names or []:
        get_dataset(name)
    return list(names or DATASETS)


@app.command("list")
@error_boundary
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per data set")] = False,
) -> None:
    """Every registered data set: name, records, size, format, license, source, and where it is."""
    if as_json:
        for ds in DATASETS.values():
            row = {
                "name": ds.name,
                "title": ds.title,
                "records": ds.records,
                "bytes": ds.size,
                "format": ds.format,
                "license": ds.license,
                "source": ds.source,
                "present": _presence(ds),
                "files": [
                    {"name": f.name, "sha256": f.sha256, "bytes": f.size, "urls": f.urls} for f in ds.files
                ],
                "note": ds.note,
            }
            typer.echo(json.dumps(row))
        return
    typer.echo("| name | what | records | size | format | license | source | present |")
    typer.echo("|---|---|---:|---:|---|---|---|---|")
    for ds in DATASETS.values():
        edit = "" if ds.format in FORMATS else " (not edit cases)"
        typer.echo(
            f"| {ds.name} | {ds.title} | {ds.records:,} | {human_size(ds.size)} | {ds.format}{edit} "
            f"| {ds.license} | {ds.source} | {_presence(ds)} |"
        )
    typer.echo(f"\nsample: the shipped sample set ({sample_path().name}), always present")
    folders = ", ".join(str(d) for d in data_dirs()) or "none set"
    typer.echo(f"looked up in: ${DATA_ENV} ({folders}), then the cache ({data_cache()}), then downloaded")


@app.command("fetch")
@error_boundary
def fetch_command(
    names: Names = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the server before giving up")] = 60.0,
    verbose: Verbose = False,
) -> None:
    """Download data sets into the cache (those already on this machine are left as they are).
    Interrupted downloads resume; every file is checked against its pinned sha256."""
    if timeout <= 0:
        raise ValueError(f"--timeout must be positive (got {timeout})")
    chosen = _checked(names)
    setup_logging(verbose, None)
    for name in chosen:
        paths = dataset_files(name, download_missing=True, timeout=timeout)
        typer.echo(f"{name}: " + ", ".join(str(p) for p in paths))


@app.command("verify")
@error_boundary
def verify_command(names: Names = None) -> None:
    """Check the data set files on this machine against their pinned sha256. A cached file that does
    not match is an error (exit 1: delete it and fetch again); a file in an ATTNEDIT_DATA folder may be
    a local copy (filtered, converted) and is reported, not refused."""
    bad = 0
    for status in verify(_checked(names)):
        if status.where == "missing":
            verdict = "missing"
        elif status.matches:
            verdict = "ok: the pinned upstream file"
        elif status.where == "cache":
            verdict = "CORRUPT: sha256 differs from the pinned one; delete it and fetch again"
            bad += 1
        else:
            verdict = "a local copy: differs from the pinned upstream file"
        where = "" if status.path is None else f" {status.path}"
        typer.echo(f"{status.dataset} {status.file}:{where} {verdict}")
    if bad:
        raise typer.Exit(1)
