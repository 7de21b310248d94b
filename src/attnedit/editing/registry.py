"""The editor interface the runner drives: edit the model for some cases, then revert exactly.

``make_editor`` builds a method from the preset of the model it is given (``presets.py``) plus
overrides. ``none`` leaves the model untouched (an empty edit: the unedited baseline row of the
paper's tables); ``rome``, ``memit``, ``pmet``, ``memat``, ``intattn`` and ``ft`` have a module each
(``rome.py``, ...; MEMAT's head blocks are ``heads.py``). MEMAT takes MEMIT's presets
(``presets.PRESET_METHOD``); IntAttn-Edit has its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from attnedit.core.data import EditCase
from attnedit.core.deltas import AppliedEdit, WeightEdit
from attnedit.core.models import ModelBundle
from attnedit.editing.ft import FineTune
from attnedit.editing.intattn import IntAttn
from attnedit.editing.memat import Memat
from attnedit.editing.memit import Memit
from attnedit.editing.pmet import Pmet
from attnedit.editing.presets import load_preset, make_params
from attnedit.editing.rome import Rome
from attnedit.editing.sadr import SadrSettings, SadrTerm, sadr_settings

logger = logging.getLogger(__name__)


class Editor(Protocol):
    name: str

    def hyperparameters(self) -> dict:
        """Everything that determines the edit (written to the run manifest)."""

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """Edit the model in place for these cases (one for single mode, many for batch mode)."""

    def prepare(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """The one-time work of ``apply`` for such cases (context templates, second moments), done ahead
        into ``bundle``'s caches without editing (a Ray run shares it with every worker)."""


@dataclass
class NoEdit:
    """Method ``none``: evaluates the unedited model."""

    name: str = "none"
    params: dict = field(default_factory=dict)

    def hyperparameters(self) -> dict:
        return {}

    def prepare(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """Nothing to prepare."""

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """An empty edit (no deltas): the model is untouched, and the result is handled like any edit."""
        edit = WeightEdit(
            deltas={},
            method=self.name,
            hyperparameters={},
            requests=[case.request for case in cases],
            base_hashes={},
            model_fingerprint=bundle.fingerprint,
        )
        return edit.apply(bundle.model)


METHODS: dict[str, Callable[..., Editor]] = {
    "none": NoEdit,
    "rome": Rome,
    "memit": Memit,
    "pmet": Pmet,
    "memat": Memat,
    "intattn": IntAttn,
    "ft": FineTune,
}


def make_editor(
    method: str,
    model: ModelBundle | str,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    sadr: Mapping[str, Any] | SadrSettings | None = None,
) -> Editor:
    """The editor for ``method`` (``rome``, ``rome+sadr``...) with its preset and overrides.

    ``model``: the loaded ``ModelBundle`` (or its name): the preset is the one matching that model, unless
    ``preset`` names another (a preset name or a JSON file); a model without a preset is a
    ``PresetError``, never another model's preset. ``overrides``: fields of the method's parameters
    (``steps``, ``layers``...; strings are parsed). ``sadr``: for ``X+sadr`` methods, the regulariser's
    settings: a ``SadrSettings``, or some of its fields over the preset's ``sadr`` block
    (``{"gamma": 0.1, "layers": (20, 29)}``; see ``sadr.sadr_settings``).
    """
    if isinstance(model, ModelBundle):
        model_name = model.name
    elif isinstance(model, str) and model:
        model_name = model
    else:
        raise TypeError(
            f"make_editor needs the model (a ModelBundle or its name) to choose a preset, not {model!r}"
        )
    base, _, extra = method.partition("+")
    if base not in METHODS or extra not in ("", "sadr") or (extra and base == "none"):
        raise ValueError(
            f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}, "
            "and any of them but none with '+sadr' (e.g. rome+sadr)"
        )
    params = dict(overrides or {})
    if sadr and not extra:
        named = sorted(sadr) if isinstance(sadr, Mapping) else ["SadrSettings"]
        example = "rome+sadr" if base == "none" else f"{base}+sadr"
        raise ValueError(f"SADR settings {named} need a '+sadr' method (e.g. {example})")
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
        terms.append(SadrTerm(sadr_settings(block, sadr)))
    editor = METHODS[base](make_params(base, data, params), terms=terms)
    editor.name = method
    editor.preset = data["model"]
    return editor
