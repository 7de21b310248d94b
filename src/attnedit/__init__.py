"""attnedit: attention-aware knowledge editing of large language models.

The public API (``attnedit.load_model``, ``attnedit.edit``, ``attnedit.evaluate``, ...) lives in
``attnedit.api`` and is imported on first use, so ``import attnedit`` stays fast (no torch)::

    import attnedit
    bundle = attnedit.load_model("smollm2-135m")
    with attnedit.edit(bundle, "rome", attnedit.EditRequest("{} is in", "Eiffel Tower", "Rome", "Paris")):
        print(attnedit.answers(bundle, ["The Eiffel Tower is in"]))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from attnedit.core.version import __version__

# the public names, all defined in attnedit.api (imported lazily by __getattr__)
_API = (
    "AppliedEdit",
    "EditCase",
    "DataSet",
    "EditRequest",
    "MissingExtraError",
    "ModelBundle",
    "PresetError",
    "WeightEdit",
    "EvalConfig",
    "GeneralConfig",
    "answers",
    "curves",
    "data_sets",
    "edit",
    "editor",
    "evaluate",
    "export",
    "fetch_data",
    "from_model",
    "load_cases",
    "load_model",
    "method_choices",
    "method_specs",
    "methods",
    "parse_method",
    "reference",
    "register_method",
    "statistics",
    "stream",
    "target_cache",
)

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from attnedit.api import (  # noqa: F401
        AppliedEdit,
        DataSet,
        EditCase,
        EditRequest,
        GeneralConfig,
        MissingExtraError,
        ModelBundle,
        PresetError,
        WeightEdit,
        answers,
        curves,
        data_sets,
        edit,
        editor,
        evaluate,
        export,
        fetch_data,
        from_model,
        load_cases,
        load_model,
        method_choices,
        method_specs,
        methods,
        parse_method,
        reference,
        register_method,
        statistics,
        stream,
        target_cache,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module("attnedit.api"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'attnedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
