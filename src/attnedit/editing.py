"""The editor interface the runner drives: edit the model for a case, then revert exactly.

Methods register a factory in ``METHODS``. ``none`` leaves the model untouched (the unedited
baseline row of the paper's tables); the locate-then-edit methods plug in here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from attnedit.data import EditCase
from attnedit.models import ModelBundle


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


METHODS: dict[str, Callable[..., Editor]] = {"none": NoEdit}


def make_editor(method: str, **params: object) -> Editor:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[method](**params) if params else METHODS[method]()
