"""The editor interface the runner drives: edit the model for some cases, then revert exactly.

``make_editor`` builds a method from its preset (``presets.py``) plus overrides. ``none`` leaves
the model untouched (the unedited baseline row of the paper's tables); ``rome``, ``memit``, ``pmet``
and ``ft`` are in ``methods.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from attnedit.core.data import EditCase
from attnedit.core.models import ModelBundle
from attnedit.editing.ft import FineTune
from attnedit.editing.memit import Memit
from attnedit.editing.pmet import Pmet
from attnedit.editing.presets import load_preset, make_params
from attnedit.editing.rome import Rome
from attnedit.editing.sadr import SadrSettings, SadrTerm, sadr_settings

logger = logging.getLogger(__name__)
SADR_PREFIX = "sadr_"  # override keys for the SADR term: sadr_gamma, sadr_heads, sadr_layers, ...


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
        return Unchanged()


class Unchanged:
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
    base, _, extra = method.partition("+")
    if base not in METHODS or extra not in ("", "sadr") or (extra and base == "none"):
        raise ValueError(
            f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}, "
            "and any of them but none with '+sadr' (e.g. rome+sadr)"
        )
    params = dict(overrides or {})
    sadr_overrides = {
        k.removeprefix(SADR_PREFIX): params.pop(k) for k in list(params) if k.startswith(SADR_PREFIX)
    }
    if sadr_overrides and not extra:
        example = "rome+sadr" if base == "none" else f"{base}+sadr"
        raise ValueError(f"SADR settings {sorted(sadr_overrides)} need a '+sadr' method (e.g. {example})")
    if base == "none":
        if params or preset:
            raise ValueError("method 'none' takes no preset or parameters")
        return NoEdit()
    data = load_preset(base, model_name, preset)
    terms = []
    if extra:
        block = data.get("sadr")
        if block is None:
            logger.warning(
                "preset %r has no 'sadr' block: SADR runs with the defaults %s and the base steps",
                data["model"],
                SadrSettings().describe(),
            )
        block = block or {}
        # the SADR block may change the base method's parameters (the paper runs ROME for 80 steps)
        params = {**block.get("params", {}), **params}
        terms.append(SadrTerm(sadr_settings(block, sadr_overrides)))
    editor = METHODS[base](make_params(base, data, params), terms=terms)
    editor.name = method
    editor.preset = data["model"]
    return editor
