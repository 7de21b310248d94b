"""What a method is, declared once: a ``MethodSpec``, registered by the method's own module.

A spec names the method, says in one line what it does, and holds its typed parameter model (a
``presets.Params``: each field's type, range, default and help), the preset directory it reads, whether
it takes SADR's term, and how to build its editor from parsed parameters. Everything that lists, parses or
validates methods reads the registry: the CLI's ``--method`` help, ``attnedit.methods()``, the
inspector's method list and JSON schema, ``make_editor``.

The method syntax ``NAME`` or ``NAME+sadr`` is parsed in one place, ``parse_method``, into a ``Method``;
keyword settings are split between the method's fields and SADR's in one place, ``Method.split``.
Adding a method = one module in ``editing/methods/`` that calls ``register`` + its presets (a package
of your own can also register through the ``attnedit.methods`` entry-point group).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from attnedit.core.data import EditCase
from attnedit.core.deltas import AppliedEdit
from attnedit.core.extras import EXTRAS, require_extra
from attnedit.core.models import ModelBundle
from attnedit.editing.presets import (
    Params,
    PresetError,
    build_params,
    find_preset,
    parse_values,
    preset_files,
)
from attnedit.editing.sadr import SadrSettings

if TYPE_CHECKING:
    from attnedit.editing.losses import LossTerm

SADR_SUFFIX = "+sadr"
SADR_PREFIX = "sadr_"  # sadr_layers=20-29: a setting of the SADR term, never of the method


class Editor(Protocol):
    """What the runner, the API and the inspector drive: edit the model for some cases, then revert.

    An editor that keeps state over a stream of edits (AlphaEdit) also defines
    ``after_group(bundle, cases)`` (``StreamEditor``): sequential mode calls it, through ``after_group``
    below, once each group's edit is in place (computed or re-applied from its saved file); for any other
    editor that call does nothing."""

    name: str
    preset: str

    def hyperparameters(self) -> dict[str, Any]:
        """Everything that determines the edit (written to the run manifest)."""
        ...

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """Edit the model in place for these cases (one for single mode, many for batch mode)."""
        ...

    def prepare(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """The one-time work of ``apply`` for such cases (context templates, second moments), done ahead
        into ``bundle``'s caches without editing (a Ray run shares it with every worker)."""
        ...


@runtime_checkable
class StreamEditor(Protocol):
    """An editor with state over a stream of edits: told of every group whose edit is in place."""

    def after_group(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """Update the stream's state after ``cases``' edit was applied to ``bundle``'s model (freshly
        computed or re-applied from a saved file: the state must depend on the model only)."""
        ...


@runtime_checkable
class StatefulEditor(Protocol):
    """A stream editor whose state a resumed stream takes back from a file instead of recomputing it."""

    def save_state(self, path: str | Path) -> Path:
        """Write the stream's state to ``path`` atomically (with a digest)."""
        ...

    def load_state(self, path: str | Path) -> None:
        """Take back a state ``save_state`` wrote; a file that does not verify is an error."""
        ...

    def reset_state(self) -> None:
        """Forget the stream."""
        ...


def after_group(editor: Editor, bundle: ModelBundle, cases: list[EditCase]) -> None:
    """Tell ``editor`` that ``cases``' edit is in place (sequential mode, after each group); the default for
    an editor without ``after_group`` (every method but AlphaEdit) is to do nothing."""
    if isinstance(editor, StreamEditor):
        editor.after_group(bundle, cases)


@dataclass(frozen=True)
class MethodSpec:
    """One editing method: its name, a one-line summary, its parameter model (None: takes none), the
    preset directory it reads (default: its name; MEMAT reads MEMIT's), whether ``NAME+sadr`` exists,
    ``build(params, terms)`` -> its editor (an editor dataclass whose first fields are ``params`` and
    ``terms`` is such a callable itself: ``build=Rome``), and the optional extras of attnedit it needs
    (``requires``: names in ``core.extras.EXTRAS``; MEMAT: ``("memat",)``, for scikit-learn)."""

    name: str
    summary: str
    build: Callable[[Any, list[LossTerm]], Editor]
    params: type[Params] | None = None
    presets: str | None = None
    sadr: bool = True
    requires: tuple[str, ...] = ()

    @property
    def preset_directory(self) -> str:
        return self.presets or self.name

    def check_requirements(self) -> None:
        """Raise ``core.extras.MissingExtraError`` (one line: the ``pip install`` to run) when an extra in
        ``requires`` is not installed. Checked wherever a method is resolved for use: the command line's
        ``--method`` (before the model loads) and ``make_editor`` (so ``attnedit.editor``/``edit``)."""
        for extra in self.requires:
            require_extra(extra, f"method {self.name!r}")

    def load_preset(self, model_name: str, preset: str | None = None) -> dict[str, Any]:
        """The preset for ``model_name`` (or the named / JSON-file ``preset``); ``PresetError`` if none."""
        if self.params is None:
            raise PresetError(f"method {self.name!r} has no presets")
        return find_preset(self.name, self.preset_directory, model_name, preset)

    def available_presets(self) -> list[str]:
        return [] if self.params is None else [p.stem for p in preset_files(self.preset_directory)]

    def make_params(self, preset: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Params:
        """The parameters from a preset's ``params`` plus ``overrides`` (text values are parsed), checked
        field by field; a problem is one ``PresetError`` naming field, value and origin."""
        if self.params is None:
            raise PresetError(f"method {self.name!r} takes no parameters")
        overrides = parse_values(self.params, overrides or {})
        base = dict(preset.get("params", {}))
        origin = {k: f"preset {preset.get('model')!r}" for k in base} | {k: "--param" for k in overrides}
        return build_params(self.params, self.name, {**base, **overrides}, origin)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a method module calls this once); a name is registered once."""
    if not spec.name or "+" in spec.name or spec.name.startswith(SADR_PREFIX):
        raise ValueError(f"method name {spec.name!r}: expected a plain name (no '+', not 'sadr_...')")
    unknown = [extra for extra in spec.requires if extra not in EXTRAS]
    if unknown:
        raise ValueError(
            f"method {spec.name!r}: requires={unknown}: not extras of attnedit ({', '.join(EXTRAS)})"
        )
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"method {spec.name!r} is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def registered() -> list[MethodSpec]:
    """Every registered spec, by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


@dataclass(frozen=True)
class Method:
    """A parsed method choice: the spec, and whether SADR's term joins it (``NAME+sadr``)."""

    spec: MethodSpec
    sadr: bool = False

    @property
    def name(self) -> str:
        return self.spec.name + (SADR_SUFFIX if self.sadr else "")

    def fields(self) -> list[str]:
        """Every setting this choice takes by keyword: the method's fields, then SADR's as ``sadr_KEY``."""
        own = list(self.spec.params.model_fields) if self.spec.params else []
        return own + ([SADR_PREFIX + k for k in SadrSettings.model_fields] if self.sadr else [])

    def split(self, settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Keyword settings -> (the method's fields, SADR's settings). ``sadr_KEY`` is always SADR's
        setting KEY; another key is the method's field when the method has it (``layers`` of ``rome+sadr``
        is ROME's edit layer), else SADR's (``gamma``, ``prompt_reduction``) on a ``+sadr`` method. A SADR
        setting on a method without ``+sadr`` is an error saying so; unknown keys are left to the method,
        whose parameters name them."""
        own = set(self.spec.params.model_fields) if self.spec.params else set()
        sadr_keys = set(SadrSettings.model_fields)
        params: dict[str, Any] = {}
        sadr: dict[str, Any] = {}
        misplaced = []
        for key, value in settings.items():
            bare = key.removeprefix(SADR_PREFIX)
            if key.startswith(SADR_PREFIX) and bare in sadr_keys:
                if self.sadr:
                    sadr[bare] = value
                else:
                    misplaced.append(key)
            elif key in own or key not in sadr_keys:
                params[key] = value
            elif self.sadr:
                sadr[key] = value
            else:
                misplaced.append(key)
        if misplaced:
            raise self.sadr_refused(misplaced)
        return params, sadr

    def sadr_refused(self, names: Sequence[str]) -> PresetError:
        """The error for SADR settings given to a choice without ``+sadr``."""
        example = f"{self.spec.name}{SADR_SUFFIX}" if self.spec.sadr else f"rome{SADR_SUFFIX}"
        return PresetError(f"SADR settings {sorted(names)} need a '+sadr' method (e.g. {example})")

    def preset_view(self, preset: Mapping[str, Any]) -> dict[str, Any]:
        """The settings a preset gives this choice, named as ``split`` takes them: the method's fields
        (with the preset's ``sadr`` block's changes for ``+sadr``) and SADR's as ``sadr_KEY``."""
        view = dict(preset.get("params", {}))
        if self.sadr:
            block = preset.get("sadr") or {}
            view.update(block.get("params", {}))
            view.update({SADR_PREFIX + k: v for k, v in block.items() if k in SadrSettings.model_fields})
        return view

    def schema(self) -> dict[str, Any]:
        """The JSON schema of every setting (types, ranges, defaults, help), SADR's as ``sadr_KEY``."""
        schema: dict[str, Any] = {"title": self.name, "type": "object", "properties": {}}
        if self.spec.params is not None:
            schema = {**self.spec.params.model_json_schema(), "title": self.name}
        if self.sadr:
            sadr = SadrSettings.model_json_schema()
            props = {SADR_PREFIX + k: v for k, v in sadr.get("properties", {}).items()}
            schema["properties"] = {**schema.get("properties", {}), **props}
            if "$defs" in sadr:
                schema["$defs"] = {**schema.get("$defs", {}), **sadr["$defs"]}
        return schema


def parse_method(method: str | Method) -> Method:
    """THE parser of the method syntax: ``NAME`` or ``NAME+sadr`` for a registered NAME -> ``Method``."""
    if isinstance(method, Method):
        return method
    text = method.strip() if isinstance(method, str) else ""
    base, plus, extra = text.partition("+")
    spec = _REGISTRY.get(base)
    if spec is None or (plus and (extra != SADR_SUFFIX[1:] or not spec.sadr)):
        raise ValueError(f"unknown method {method!r}; available: {', '.join(method_names())}")
    return Method(spec, bool(plus))


def choices() -> Iterator[Method]:
    """Every method choice: each registered method, then each ``+sadr`` variant."""
    specs = registered()
    yield from (Method(s) for s in specs)
    yield from (Method(s, True) for s in specs if s.sadr)


def method_names() -> list[str]:
    """Every method choice by name (``rome``, ..., ``rome+sadr``, ...)."""
    return [m.name for m in choices()]


def methods_help(names: Sequence[str] | None = None) -> str:
    """One line for a ``--method`` flag: the registered methods, and the ``+sadr`` syntax."""
    names = list(names) if names is not None else [s.name for s in registered() if s.params is not None]
    return " | ".join(names) + ", optionally +sadr (rome+sadr)"
