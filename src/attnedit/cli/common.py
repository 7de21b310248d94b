"""What every command shares: the error boundary, logging and thread setup, ``--param KEY=VALUE``
parsing, the checks of flags that must hold before any work (before the model loads), and the flags
several commands take, declared once (the aliases below; ``OptionGroup`` for a set of flags that a
command receives as one value: the method choice, the Ray backend)."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import click
import typer

from attnedit.core.data import DEFAULT_QUESTION_TEMPLATE, SAMPLE_DATA
from attnedit.core.extras import MissingExtraError, require_extra

if TYPE_CHECKING:
    from attnedit.runs.executors import RayOptions

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

# --- flags several commands take -----------------------------------------------------------------------

Data = Annotated[
    str,
    typer.Argument(
        help=f"data file, a data set name (attnedit data list), or '{SAMPLE_DATA}' for the shipped sample set"
    ),
]
Model = Annotated[str, typer.Option(help="embedded name, local HF directory or hub id")]
Device = Annotated[str, typer.Option(help="where the model runs: cpu, cuda, cuda:N or auto")]
Dtype = Annotated[
    str,
    typer.Option(
        help="the weights' precision: float32, bfloat16 or float16 (targets and solvers stay float32/64)"
    ),
]
Preset = Annotated[str | None, typer.Option(help="preset name or JSON file (default: by model)")]
Param = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="override a preset field: KEY=VALUE (repeatable)")
]
First = Annotated[int, typer.Option(help="skip the cases before this index")]
Limit = Annotated[int | None, typer.Option(help="first N cases only (counted from --first)")]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v")]

SadrFlag = Annotated[
    bool, typer.Option("--sadr", help="add the SADR regulariser (same as METHOD+sadr, e.g. rome+sadr)")
]
SadrGamma = Annotated[
    float | None,
    typer.Option("--gamma", help="SADR weight (default: the preset's); the official code's --gamma / 10000"),
]
SadrHeads = Annotated[
    str | None,
    typer.Option(
        "--sadr-heads",
        help="SADR heads: selective (the paper) | increased (ours, looser) | all (its ablation)",
    ),
]
SadrLayers = Annotated[
    str | None, typer.Option("--sadr-layers", help="SADR layer range FIRST-LAST (default: every layer)")
]
SadrReduction = Annotated[
    str | None, typer.Option("--sadr-reduction", help="over the prompts: mean (the paper) | sum")
]

# where the cases are computed
Backend = Annotated[
    str,
    typer.Option(
        help="local (this process) | ray (Ray actors; needs the extra: pip install 'attnedit\\[ray]')"
    ),
]
Workers = Annotated[int, typer.Option(help="--backend ray: actors, each loading the model once")]
Address = Annotated[
    str | None,
    typer.Option(help="--backend ray: cluster address, or 'auto' (the running cluster); default: start one"),
]
CpusPerWorker = Annotated[float, typer.Option(help="--backend ray: CPUs per actor (its torch threads)")]
GpusPerWorker = Annotated[float, typer.Option(help="--backend ray: GPUs per actor (e.g. 0.25: 4 on one GPU)")]
MaxRetries = Annotated[int, typer.Option(help="--backend ray: tries again of a unit whose actor died")]


def flag(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """A command parameter (a typer flag), for ``OptionGroup``."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


@dataclass(frozen=True)
class OptionGroup:
    """Flags several commands take, declared once: ``@group`` adds ``head`` before a command's own flags and
    ``tail`` after them (typer reads the signature), and hands the command ``build(**their values)`` as
    its parameter ``provides`` instead. ``build`` runs inside the command's error boundary."""

    provides: str
    build: Callable[..., Any]
    head: Sequence[inspect.Parameter] = ()
    tail: Sequence[inspect.Parameter] = ()

    def __call__(self, command: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(command, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()]
        names = [p.name for p in (*self.head, *self.tail)]

        @functools.wraps(command)
        def grouped(**kwargs: Any) -> R:
            values = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, **{self.provides: self.build(**values)})

        params = [*self.head, *(p for p in own if p.name != self.provides), *self.tail]
        # typer reads the signature inspect.signature finds there; functions do not declare the attribute
        grouped.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]  # see above
        grouped.__annotations__ = {p.name: p.annotation for p in params}
        return grouped


@dataclass(frozen=True)
class MethodChoice:
    """``--method/--preset/--param`` and the SADR flags, resolved: the method (``X+sadr`` with --sadr), its
    preset, its preset overrides and the SADR settings (the --gamma/--sadr-* flags and any ``--param
    sadr_KEY=VALUE``)."""

    method: str
    preset: str | None
    params: dict[str, str]
    sadr: dict[str, object]


def method_choice(
    method: str,
    preset: str | None,
    param: list[str] | None,
    sadr: bool,
    gamma: float | None,
    sadr_heads: str | None,
    sadr_layers: str | None,
    sadr_reduction: str | None,
) -> MethodChoice:
    """The ``MethodChoice`` of the flags (``method_flags``): the method parsed once, here, its optional
    extras checked (``MethodSpec.check_requirements``: a ``MissingExtraError`` before the model loads), and
    the ``--param`` pairs split between its fields and SADR's (``api.parse_method``, ``Method.split``)."""
    from attnedit.api import parse_method

    if sadr and not method.endswith("+sadr"):
        method = f"{method}+sadr"
    try:
        choice = parse_method(method)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--method") from None
    choice.spec.check_requirements()  # a missing extra (memat: scikit-learn): one line, before any model
    params, settings = choice.split(parse_overrides(param))
    flags = {"gamma": gamma, "heads": sadr_heads, "layers": sadr_layers, "prompt_reduction": sadr_reduction}
    for key, value in flags.items():
        if value is None:
            continue
        if key in settings:
            raise typer.BadParameter(f"SADR {key} is given twice: by its option and by --param")
        settings[key] = value
    return MethodChoice(choice.name, preset, params, settings)


def methods_help(with_none: bool = False) -> str:
    """The ``--method`` help, from the method registry."""
    from attnedit.api import methods

    names = [m for m in methods() if m != "none"]
    listed = " | ".join((["none (unedited)"] if with_none else []) + names)
    return f"{listed}, optionally +sadr (rome+sadr)"


def method_flags(default: str = "rome", help: str | None = None) -> tuple[inspect.Parameter, ...]:
    """The flags of ``method_choice``: ``--method`` (with this default and help), ``--preset``,
    ``--param/-p``, ``--sadr``, ``--gamma``, ``--sadr-heads``, ``--sadr-layers``, ``--sadr-reduction``."""
    return (
        flag("method", Annotated[str, typer.Option(help=help or methods_help(default == "none"))], default),
        flag("preset", Preset, None),
        flag("param", Param, None),
        flag("sadr", SadrFlag, False),
        flag("gamma", SadrGamma, None),
        flag("sadr_heads", SadrHeads, None),
        flag("sadr_layers", SadrLayers, None),
        flag("sadr_reduction", SadrReduction, None),
    )


def edit_method(default: str = "rome", help: str | None = None) -> OptionGroup:
    """``@edit_method()``: the command takes the method flags and receives ``choice: MethodChoice``."""
    return OptionGroup("choice", method_choice, head=method_flags(default, help))


def ray_options(
    backend: str,
    workers: int,
    address: str | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_retries: int,
) -> RayOptions | None:
    """The Ray settings of ``--backend ray`` (None for ``local``); without Ray installed, one line saying
    how to install it (``RayMissingError``, a ``MissingExtraError``: exit 2), before any work."""
    from attnedit.runs.executors import BACKENDS, RayOptions, require_ray

    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"must be one of {', '.join(BACKENDS)}, not {backend!r}", param_hint="--backend"
        )
    if backend == "local":
        return None
    require_ray()
    return RayOptions(workers, address, cpus_per_worker, gpus_per_worker, max_retries)


RAY_FLAGS = (
    flag("backend", Backend, "local"),
    flag("workers", Workers, 2),
    flag("address", Address, None),
    flag("cpus_per_worker", CpusPerWorker, 1.0),
    flag("gpus_per_worker", GpusPerWorker, 0.0),
    flag("max_retries", MaxRetries, 2),
)
# ``@ray_backend``: the command takes the Ray flags and receives ``ray: RayOptions | None``
ray_backend = OptionGroup("ray", ray_options, tail=RAY_FLAGS)


# an unexpected exception is a bug of ours: say so, and where it goes
BUG_REPORT = (
    "this is a bug in attnedit, not in your input: please report it in the attnedit issue tracker "
    "with the command line and the traceback above"
)


def _is_user_error(err: BaseException) -> bool:
    """Errors of ours that name what the user must fix (bad input, flag, file, preset, model, a missing
    optional extra...)."""
    if isinstance(err, ValueError | OSError | MissingExtraError):  # PresetError, DataFormatError, ...
        return True
    # these live in layers that import torch: import them only once such an error is in hand
    from attnedit.core.models import ModelLoadError
    from attnedit.editing.adam import NonFiniteLossError
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
    stderr (exit code 2; units whose Ray workers died, exit code 1); anything else keeps its traceback
    plus a line saying it is a bug."""

    @functools.wraps(command)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except CLI_OWN:
            raise  # typer/click's own: usage errors (exit 2) and explicit exits
        except KeyboardInterrupt:
            raise
        except Exception as err:
            from attnedit.runs.executors import UnitsFailedError  # no heavy imports
            from attnedit.runs.sequential import StreamCollapsedError

            # workers died (the rest was written, a rerun resumes), or the model collapsed in a stream
            if isinstance(err, UnitsFailedError | StreamCollapsedError):
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(1) from None
            if _is_user_error(err):
                message = " ".join(str(err).split()) or type(err).__name__  # one line
                typer.echo(f"error: {message}", err=True)
                raise typer.Exit(2) from None
            traceback.print_exc(file=sys.stderr)
            typer.echo(f"internal error ({type(err).__name__}): {BUG_REPORT}", err=True)
            raise typer.Exit(1) from None

    return guarded


def require_serve() -> None:
    """``attnedit serve`` needs the ``serve`` extra (FastAPI, uvicorn): without it, one line saying how to
    install it (``MissingExtraError``, exit 2), before the model loads."""
    require_extra("serve", "attnedit serve")


def check_limit(limit: int | None, first: int = 0) -> None:
    """``--limit`` >= 1 (0 or negative would run every case or drop the last), ``--first`` >= 0."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {limit}); leave it out for every case")
    if first < 0:
        raise ValueError(f"--first must be 0 or more (got {first})")


def check_model_flags(device: str, dtype: str) -> None:
    """``--device`` names a device this machine has and ``--dtype`` a supported precision: checked
    before anything loads, the error naming the flag."""
    from attnedit.core.models import ModelLoadError, resolve_device, resolve_dtype

    for flag, check, value in (("--device", resolve_device, device), ("--dtype", resolve_dtype, dtype)):
        try:
            check(value)
        except ModelLoadError as err:
            raise ValueError(f"{flag}: {err}") from None


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


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` pairs as a dict (the values still text)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--param expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out
