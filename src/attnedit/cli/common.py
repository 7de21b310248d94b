"""What every command shares: the error boundary, logging and thread setup, ``--param KEY=VALUE``
parsing and the checks of flags that must hold before any work (before the model loads)."""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import click
import typer

from attnedit.core.data import DEFAULT_QUESTION_TEMPLATE

P = ParamSpec("P")
R = TypeVar("R")

# multilingual (BMIKE-53) data: settings of the data, so every method (baselines included) gets the same
Language = Annotated[
    str | None,
    typer.Option(
        "--language",
        help="multilingual data: the edit language, e.g. fr (default: en); others are scored too",
    ),
]
QuestionTemplate = Annotated[
    str | None,
    typer.Option(
        "--question-template",
        help=f"multilingual data: wrapper of every question prompt, {{}} = the question "
        f"(default {DEFAULT_QUESTION_TEMPLATE!r}; '{{}}' = plain questions)",
    ),
]

# an unexpected exception is a bug of ours: say so, and where it goes
BUG_REPORT = (
    "this is a bug in attnedit, not in your input: please report it in the attnedit issue tracker "
    "with the command line and the traceback above"
)


def _is_user_error(err: BaseException) -> bool:
    """Errors of ours that name what the user must fix (bad input, flag, file, preset, model...)."""
    if isinstance(err, ValueError | OSError):  # PresetError, DataFormatError, EditRequestError, ...
        return True
    # these live in layers that import torch: import them only once such an error is in hand
    from attnedit.core.models import ModelLoadError
    from attnedit.editing.optimise import NonFiniteLossError
    from attnedit.runs.rundir import RunConflictError

    return isinstance(err, ModelLoadError | NonFiniteLossError | RunConflictError)


# typer/click's own exceptions (usage errors, explicit exits): recent typer ships its own copy of click,
# whose classes are not click's, so both sets are named
CLI_OWN: tuple[type[BaseException], ...] = (
    click.exceptions.ClickException,
    click.exceptions.Exit,
    click.exceptions.Abort,
    typer.Exit,
    typer.Abort,
    *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
)


def error_boundary(command: Callable[P, R]) -> Callable[P, R]:
    """The CLI's one error boundary, applied to every command: an error of ours becomes one line on
    stderr (exit code 2); anything else keeps its traceback plus a line saying it is a bug."""

    @functools.wraps(command)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except CLI_OWN:
            raise  # typer/click's own: usage errors (exit 2) and explicit exits
        except KeyboardInterrupt:
            raise
        except Exception as err:
            if _is_user_error(err):
                message = " ".join(str(err).split()) or type(err).__name__  # one line
                typer.echo(f"error: {message}", err=True)
                raise typer.Exit(2) from None
            traceback.print_exc(file=sys.stderr)
            typer.echo(f"internal error ({type(err).__name__}): {BUG_REPORT}", err=True)
            raise typer.Exit(1) from None

    return guarded


def check_limit(limit: int | None, first: int = 0) -> None:
    """``--limit`` >= 1 (0 or negative would run every case or drop the last), ``--first`` >= 0."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {limit}); leave it out for every case")
    if first < 0:
        raise ValueError(f"--first must be 0 or more (got {first})")


def check_writable_dir(path: Path, flag: str = "--out") -> None:
    """``path`` is (or can be made) a directory we can write to: create it and a probe file now,
    before the model loads, rather than fail after minutes of work."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path}: exists and is not a directory; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".attnedit-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"{flag} {path}: cannot write there ({err.strerror or err}); choose another {flag}"
        ) from None


def check_writable_file(path: Path, flag: str) -> None:
    """A file can be written at ``path`` (its directory is created); an existing directory is refused."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a directory; give a file name")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: cannot write there ({parent} is not a directory)")
    check_writable_dir(parent, flag)


def setup_logging(verbose: bool, threads: int | None) -> None:
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


SADR_PREFIX = "sadr_"  # --param sadr_gamma=0.1: a setting of the SADR term, not of the method


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` pairs as a dict (the values still text)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--param expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def split_sadr(overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Parsed ``--param`` overrides -> (the method's fields, the SADR settings): ``sadr_KEY=VALUE`` is
    the SADR setting KEY, handed to ``make_editor(..., sadr=...)`` like ``--gamma``/``--sadr-*``."""
    params = {k: v for k, v in overrides.items() if not k.startswith(SADR_PREFIX)}
    sadr = {k.removeprefix(SADR_PREFIX): v for k, v in overrides.items() if k.startswith(SADR_PREFIX)}
    return params, sadr
