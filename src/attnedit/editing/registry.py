"""Build an editor from a method choice: the registry of ``MethodSpec``s (``spec.py``), filled by the
method modules (``methods/``), plus the preset of the model and overrides.

``make_editor("rome+sadr", bundle, overrides={"steps": 40}, sadr={"gamma": 0.1})``: the method is parsed
(``spec.parse_method``), its preset found by the bundle's model (or named), its parameters checked, SADR's
term added for ``+sadr`` choices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from attnedit.core.models import ModelBundle
from attnedit.editing import methods as _methods  # noqa: F401 (registers every method)
from attnedit.editing.losses import LossTerm
from attnedit.editing.presets import Params, PresetError
from attnedit.editing.sadr import SadrSettings, SadrTerm, sadr_settings
from attnedit.editing.spec import Editor, Method, MethodSpec, parse_method

logger = logging.getLogger(__name__)


def method_spec(method: str | Method) -> MethodSpec:
    """The spec of a method choice (``rome`` and ``rome+sadr`` both give ROME's)."""
    return parse_method(method).spec


def load_preset(method: str | Method, model_name: str, preset: str | None = None) -> dict[str, Any]:
    """The preset of ``method`` for ``model_name`` (or the named / JSON-file ``preset``)."""
    return method_spec(method).load_preset(model_name, preset)


def make_params(
    method: str | Method, preset: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> Params:
    """The checked parameters of ``method`` from a preset dict plus overrides (text values parsed)."""
    return method_spec(method).make_params(preset, overrides)


def make_editor(
    method: str | Method,
    model: ModelBundle | str,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    sadr: Mapping[str, Any] | SadrSettings | None = None,
) -> Editor:
    """The editor for ``method`` (``rome``, ``rome+sadr``... or a parsed ``Method``) with its preset and
    overrides.

    ``model``: the loaded ``ModelBundle`` (or its name): the preset is the one matching that model, unless
    ``preset`` names another (a preset name or a JSON file); a model without a preset is a
    ``PresetError``, never another model's preset. ``overrides``: fields of the method's parameters
    (``steps``, ``layers``...; strings are parsed). ``sadr``: for ``X+sadr`` methods, the regulariser's
    settings: a ``SadrSettings``, or some of its fields over the preset's ``sadr`` block
    (``{"gamma": 0.1, "layers": (20, 29)}``; see ``sadr.sadr_settings``). A method whose optional extra
    is not installed (MEMAT without scikit-learn) is a ``core.extras.MissingExtraError`` naming the
    ``pip install`` to run.
    """
    if isinstance(model, ModelBundle):
        model_name = model.name
    elif isinstance(model, str) and model:
        model_name = model
    else:
        raise TypeError(
            f"make_editor needs the model (a ModelBundle or its name) to choose a preset, not {model!r}"
        )
    choice = parse_method(method)
    spec = choice.spec
    spec.check_requirements()  # a missing optional extra: one line saying what to install
    params = dict(overrides or {})
    if sadr and not choice.sadr:
        raise choice.sadr_refused(list(sadr) if isinstance(sadr, Mapping) else ["SadrSettings"])
    if spec.params is None:
        if params or preset:
            raise PresetError(f"method {spec.name!r} takes no preset or parameters")
        return spec.build(None, [])
    data = spec.load_preset(model_name, preset)
    terms: list[LossTerm] = []
    if choice.sadr:
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
    editor = spec.build(spec.make_params(data, params), terms)
    editor.name = choice.name
    editor.preset = data["model"]
    return editor
