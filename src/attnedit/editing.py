"""The editor interface the runner drives: edit the model for some cases, then revert exactly.

``make_editor`` builds a method from its preset (``presets.py``) plus overrides. ``none`` leaves
the model untouched (the unedited baseline row of the paper's tables); ``rome``, ``memit``, ``pmet``
and ``ft`` are in ``methods.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from attnedit.data import EditCase
from attnedit.methods import FineTune, Memit, Pmet, Rome
from attnedit.models import ModelBundle
from attnedit.presets import load_preset, make_params


class AppliedEdit(Protocol):
    def revert(self) -> None:
        """Restore the weights the edit changed, bit for bit (in place: ``copy_``/``add_``)."""


class Editor(Protocol):
    name: str

    def hyperparameters(self) -> dict:
        """Everything that determines the edit (written to the run manifest)."""

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """Edit the model in place for these cases (one for single mode, many for batch mode)."""


@dataclass
class NoEdit:
    """Method ``none``: evaluates the unedited model."""

    name: str = "none"
    params: dict = field(default_factory=dict)

    def hyperparameters(self) -> dict:
        return {}

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        return _Unchanged()


class _Unchanged:
    def revert(self) -> None:
        return None


METHODS: dict[str, Callable[..., Editor]] = {
    "none": NoEdit,
    "rome": Rome,
    "memit": Memit,
    "pmet": Pmet,
    "ft": FineTune,
}


def make_editor(
    method: str,
    model_name: str = "smollm2-135m",
    preset: str | None = None,
    overrides: dict[str, object] | None = None,
) -> Editor:
    """The editor for ``method`` with the preset for ``model_name`` (or ``preset``) and overrides."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    if method == "none":
        if overrides or preset:
            raise ValueError("method 'none' takes no preset or parameters")
        return NoEdit()
    data = load_preset(method, model_name, preset)
    editor = METHODS[method](make_params(method, data, overrides))
    editor.preset = data["model"]
    return editor
