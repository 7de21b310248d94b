"""Method parameters as typed, validated models, and presets as data files.

Every method's parameters are a ``Params`` model (pydantic): each field carries its type, range, default and
help, and the same checks run wherever values come from (a preset file, ``--param KEY=VALUE``, a Python
keyword, a JSON body). The field types shared by several methods are declared here once (``Layers``,
``Templates``, ``Text``); a method declares its own model in its module (``editing/methods/``).

Presets live in ``resources/presets/<directory>/<model>.json``::

    {"method": "rome", "model": "gpt-j-6b", "matches": ["EleutherAI/gpt-j-6b", "gpt-j-6b"],
     "source": "where the values come from", "params": {...},
     "sadr": {"gamma": 0.01, "heads": "selective", "params": {"steps": 80}}}   # optional

A preset is found by the loaded model's name; any field can be overridden (``--param key=value``).
Your own presets go in directories named by ``$ATTNEDIT_PRESETS`` (separated like ``PATH``), laid out the
same way (``DIR/<method>/<model>.json``); they are searched before the shipped ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from attnedit.core.layer_range import parse_layers


class PresetError(ValueError):
    """No preset for this (method, model), or a bad preset/override."""


def _layers(value: list[int]) -> list[int]:
    if not value:
        raise PydanticCustomError("layers", "expected a non-empty list of layer indices")
    if any(v < 0 for v in value):
        raise PydanticCustomError("layers", "layer indices must be integers >= 0")
    return value


def _templates(value: list[list[int]]) -> list[list[int]]:
    if not all(len(t) == 2 and all(v >= 1 for v in t) for t in value):
        raise PydanticCustomError("templates", "expected a list of [length, count] pairs of integers >= 1")
    return value


def _text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("text", "expected a non-empty string")
    return value


# layer indices, e.g. [3, 4, 5] (on the command line also 3-5 or 3,4,5)
Layers = Annotated[list[int], AfterValidator(_layers)]
# context templates: [[length, count], ...]; empty: only the bare prompt
Templates = Annotated[list[list[int]], AfterValidator(_templates)]
Text = Annotated[str, AfterValidator(_text)]  # any non-empty text


class Params(BaseModel):
    """The base of every method's parameters: strict types (an integer field refuses 2.5 and True, a number
    field refuses text), finite numbers, no unknown fields. Values given as text (``--param``) are parsed
    by ``parse_text`` first."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_default=True)


P = TypeVar("P", bound=Params)

_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _problem(error: Mapping[str, Any]) -> str:
    """One pydantic error in our words (``must be >= 1``, ``expected an integer``...)."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _BOUNDS:
        sign, key = _BOUNDS[kind]
        return f"must be {sign} {ctx[key]:g}"
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return "expected an integer"
    if kind in ("float_type", "float_parsing"):
        return "expected a number"
    if kind == "finite_number":
        return "expected a finite number"
    if kind == "literal_error":
        return "expected one of " + str(ctx.get("expected", "")).replace(" or ", ", ")
    if kind in ("string_type", "string_too_short"):
        return "expected a non-empty string"
    if kind == "list_type":
        return "expected a list"
    return str(error["msg"]).removeprefix("Value error, ")


def build_params(cls: type[P], method: str, values: Mapping[str, Any], origin: Mapping[str, str]) -> P:
    """``cls(**values)``, with the first problem as one ``PresetError`` naming the method, the field, its
    value and where the value came from (``origin[field]``, e.g. ``--param`` or ``preset 'gpt-j-6b'``)."""
    known = set(cls.model_fields)
    unknown = sorted(set(values) - known)
    if unknown:
        where = sorted({origin.get(k, "") for k in unknown})
        noun = "parameter" if len(unknown) == 1 else "parameters"
        raise PresetError(
            f"{method} has no {noun} {', '.join(map(repr, unknown))} ({', '.join(where)}); "
            f"known: {', '.join(sorted(known))}"
        )
    try:
        return cls.model_validate(dict(values))
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        if first["type"] == "missing":
            raise PresetError(f"{method}: the preset or --param must give {name!r}") from None
        source = origin.get(name, "default")
        raise PresetError(f"{method}: {name}={values.get(name)!r} ({source}): {_problem(first)}") from None


def _is_layers(hint: Any) -> bool:
    return hint == list[int] or (get_origin(hint) is Annotated and get_args(hint)[0] == list[int])


def parse_text(value: str, hint: Any, key: str) -> Any:
    """A field's value given as text (``--param KEY=VALUE``), by the field's annotation ``hint``: numbers,
    layer lists (``3-7``, ``3,4,5``, ``[3, 4, 5]``), ``number | text`` fields (``alpha=0.2``,
    ``alpha=trace``), text, and JSON for the rest (``templates=[[5, 10]]``)."""
    text = value.strip()
    try:
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str or get_origin(hint) is Literal:
            return text
        if set(get_args(hint)) == {float, str}:  # a number, else the text
            try:
                return float(text)
            except ValueError:
                return text
        if _is_layers(hint):
            layers = parse_layers(text)
            if layers is None:
                raise PresetError(f"--param {key}={value!r}: name the layers (e.g. 3-7 or 3,4,5)")
            return layers
        if set(get_args(hint)) == {float, type(None)}:
            return float(text)
        return json.loads(text)
    except PresetError:
        raise
    except ValueError as err:
        if _is_layers(hint):  # the parser says what is wrong with which item
            raise PresetError(f"--param {key}={value!r}: {err}") from None
        raise PresetError(f"--param {key}={value!r}: expected {getattr(hint, '__name__', hint)}") from None


def parse_values(cls: type[Params], values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the text ones parsed by their field's annotation (unknown fields left as they are,
    for ``build_params`` to name)."""
    fields = cls.model_fields
    return {
        k: parse_text(v, fields[k].annotation, k) if isinstance(v, str) and k in fields else v
        for k, v in values.items()
    }


PRESETS_ENV = "ATTNEDIT_PRESETS"  # user preset directories, searched before the shipped presets


def preset_files(directory: str) -> list[Path]:
    """The preset files of a preset directory: the ``$ATTNEDIT_PRESETS`` directories first, then the
    shipped ones."""
    roots = [Path(d) / directory for d in os.environ.get(PRESETS_ENV, "").split(os.pathsep) if d]
    roots.append(Path(str(resources.files("attnedit") / "resources" / "presets" / directory)))
    return [p for root in roots if root.is_dir() for p in sorted(root.glob("*.json"))]


def _matches(preset: Mapping[str, Any], model_name: str) -> bool:
    name = model_name.lower().rstrip("/")
    candidates = {preset["model"].lower(), *(m.lower() for m in preset.get("matches", []))}
    return name in candidates or Path(name).name in candidates


def find_preset(method: str, directory: str, model_name: str, preset: str | None = None) -> dict[str, Any]:
    """The preset dict of ``method`` (whose presets are in ``directory``): the named or JSON-file
    ``preset`` if given, else the one matching the model. A preset must be for ``method`` or for the
    method that owns the directory (MEMAT reads MEMIT's)."""
    data: dict[str, Any]
    if preset and Path(preset).is_file():
        data = json.loads(Path(preset).read_text())
    else:
        found = [json.loads(p.read_text()) for p in preset_files(directory)]
        if preset:
            hits = [d for d in found if d["model"] == preset]
        else:
            hits = [d for d in found if _matches(d, model_name)]
        if not hits:
            what = f"preset {preset!r}" if preset else f"preset for model {model_name!r}"
            names = ", ".join(p.stem for p in preset_files(directory))
            raise PresetError(
                f"{method}: no {what}; available: {names} "
                "(choose one with --preset NAME or a JSON file, e.g. for a model of the same family and size)"
            )
        data = hits[0]
    if data.get("method") not in (method, directory):
        raise PresetError(
            f"preset {data.get('model')!r} is for method {data.get('method')!r}, not {method!r}"
        )
    return data


# fields added after run directories were written, with the value those runs used: at that value a field
# is left out of the manifest's hyper-parameters, so the earlier runs keep their identity and hashes
ADDED_LATER: dict[str, Any] = {"target_matmul": "model"}


def params_dict(params: BaseModel) -> dict[str, Any]:
    """The parameters as the run manifest records them (``ADDED_LATER`` fields only when not at their
    old value)."""
    return {k: v for k, v in params.model_dump().items() if k not in ADDED_LATER or ADDED_LATER[k] != v}
