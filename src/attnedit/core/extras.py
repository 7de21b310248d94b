"""The optional extras of ``pyproject.toml`` that code needs at run time, and the one check of them.

``EXTRAS`` maps each such extra to the modules it installs (importable name -> distribution name);
``require_extra(extra, what)`` finds them with ``importlib.util.find_spec`` (nothing is imported) and
raises ``MissingExtraError``, one line naming what needs them and the ``pip install`` that adds them.
It runs where a user's choice first needs an extra, before any model loads: a method's ``MethodSpec.requires``
(checked when the method is resolved), ``attnedit serve``, ``--backend ray``. The ``docs`` and ``dev``
extras are for building the site and running the tests; no code of the package needs them.
"""

from __future__ import annotations

import importlib.util

# extra -> {importable module: distribution}; the distributions are those pyproject.toml lists
EXTRAS: dict[str, dict[str, str]] = {
    "memat": {"sklearn": "scikit-learn"},  # MEMAT's head classifiers (editing.heads)
    "serve": {"fastapi": "fastapi", "uvicorn": "uvicorn"},  # attnedit serve (serve.app)
    "ray": {"ray": "ray"},  # --backend ray (runs.executors, runs.ray_eval)
}


class MissingExtraError(ImportError):
    """Something the user asked for needs an optional extra that is not installed (one line: what needs
    which distributions, and the ``pip install`` command)."""


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be found (none: the extra is installed)."""
    try:
        modules = EXTRAS[extra]
    except KeyError:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}") from None
    return [module for module in modules if not _found(module)]


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or sys.modules[module] set to None
        return False


def missing_extra_error(extra: str, what: str, modules: list[str] | None = None) -> MissingExtraError:
    """The error saying that ``what`` needs ``extra`` (its ``modules`` that are missing; default all)."""
    names = [EXTRAS[extra][m] for m in (modules if modules is not None else list(EXTRAS[extra]))]
    listed = " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + f" and {names[-1]}"
    verb = "is" if len(names) == 1 else "are"
    return MissingExtraError(
        f"{what} needs {listed}, which {verb} not installed: pip install 'attnedit[{extra}]'"
    )


def require_extra(extra: str, what: str) -> None:
    """Raise ``MissingExtraError`` if a module of ``extra`` is not installed; ``what`` names what needs it
    (``"method 'memat'"``, ``"attnedit serve"``, ``"--backend ray"``)."""
    missing = missing_modules(extra)
    if missing:
        raise missing_extra_error(extra, what, missing)
