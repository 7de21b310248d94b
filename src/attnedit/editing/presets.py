"""Hyper-parameter dataclasses of the locate-then-edit methods, and presets as data files.

Presets live in ``resources/presets/<method>/<model>.json``::

    {"method": "rome", "model": "gpt-j-6b", "matches": ["EleutherAI/gpt-j-6b", "gpt-j-6b"],
     "source": "where the values come from", "params": {...},
     "sadr": {"gamma": 0.01, "heads": "selective", "params": {"steps": 80}}}   # optional

A preset is found by the loaded model's name; any field can be overridden (``--param key=value``).
Your own presets go in directories named by ``$ATTNEDIT_PRESETS`` (separated like ``PATH``), laid out the
same way (``DIR/<method>/<model>.json``); they are searched before the shipped ones.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from attnedit.core.layer_range import parse_layers


class PresetError(ValueError):
    """No preset for this (method, model), or a bad preset/override."""


@dataclass
class LocateParams:
    """Shared by ROME, MEMIT and PMET (names as in the reference hparams files)."""

    layers: list[int]  # edited layers (ROME: one); the target is read at the last one
    lr: float = 0.5  # v_lr
    steps: int = 20  # v_num_grad_steps
    kl_factor: float = 0.0625
    weight_decay: float = 0.5  # v_weight_decay
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05
    templates: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])  # (length, count)
    template_seed: int = 0
    stats_corpus: str = "model"  # text file path, hf:NAME, or "model" (sampled from the model)
    stats_samples: int = 1000
    stats_max_tokens: int = 128
    max_rows: int = 256  # optimisation rows per group (memory bound)
    # ours: the target optimisation's matrix products, "model" (the model's dtype) or "bfloat16"
    # (weights cast once; norms, attention, losses and the delta keep their precision)
    target_matmul: str = "model"


@dataclass
class RomeParams(LocateParams):
    # "templates": k* averaged over the context templates (ROME paper, eq. 2);
    # "prompt": the key of the plain prompt (the official ROME/EasyEdit code)
    key_mode: str = "templates"


@dataclass
class MemitParams(LocateParams):
    clamp_norm_factor: float = 0.75
    templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    mom2_update_weight: float = 15000.0  # lambda in Delta = R K^T (lambda C + K K^T)^-1


@dataclass
class PmetParams(MemitParams):
    pass


@dataclass
class MematParams(MemitParams):
    """MEMIT's parameters (step 1, from the MEMIT preset) plus the attention-head steps (MEMAT's official
    defaults; ``correction_min_steps`` is ours: one epoch of a small batch is only a few steps)."""

    heads: int = 16  # K: the heads with the best classifier accuracy get a correction
    head_language: str = "edit"  # the language of the classifiers and corrections; "edit": the edit's own
    classifier_records: str = "succeeded"  # records whose edit already succeeds in the head language; "all"
    classifier_split: float = 0.7  # share of the records that train the classifiers (the rest validate)
    classifier_seed: int = 123
    correction_lr: float = 0.2
    correction_batch: int = 32  # requests per minibatch (one Adam step each)
    correction_epochs: int = 1
    correction_min_steps: int = 10  # ours, chosen on merged CounterFact cases 0-99 (docs/benchmarks.md)
    correction_kl_factor: float = 0.0625
    correction_weight_decay: float = 0.001
    correction_clamp: float = 0.75  # times each head's mean activation norm
    bias_fold: str = "sum"  # "overwrite": the official code's last-head-wins bias (documented bug)


@dataclass
class IntAttnParams(MemitParams):
    """MEMIT's parameters (``layers``: the MLP edit layers; the target z is read after the last one) plus
    the attention output projections IntAttn-Edit also rewrites and the share ``alpha`` they get."""

    # the attention output projections W_o rewritten (the paper's 2-4), none above the last MLP layer
    attn_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    alpha: float | str = 0.3  # in [0, 1]: W_o gets alpha of its update, the MLPs 1 - alpha; or "trace"
    # lambda of the W_o least squares; None: mom2_update_weight (resolved when the params are built)
    attn_mom2_update_weight: float | None = None
    trace_cases: int = 10  # alpha="trace": the first this many requests of a batch are causally traced

    def __post_init__(self) -> None:
        if self.attn_mom2_update_weight is None:
            self.attn_mom2_update_weight = self.mom2_update_weight


@dataclass
class FTParams:
    """Constrained fine-tuning of one MLP down-projection (FT-L, the standard baseline)."""

    layers: list[int]
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float = 5e-4  # L-infinity bound on the weight change
    early_stop_loss: float = 0.01


PARAMS: dict[str, type] = {
    "rome": RomeParams,
    "memit": MemitParams,
    "pmet": PmetParams,
    "memat": MematParams,
    "intattn": IntAttnParams,
    "ft": FTParams,
}
# methods whose presets are another method's: MEMAT's first step is MEMIT with MEMIT's preset, and its own
# fields keep their defaults unless overridden. IntAttn-Edit reads its own directory (its layers and alpha
# differ from MEMIT's), named here so that every MEMIT-derived method says where its presets are
PRESET_METHOD: dict[str, str] = {"memat": "memit", "intattn": "intattn"}


@dataclass(frozen=True)
class Rule:
    """What one params field accepts: its type and, for numbers, a lower bound (``strict``: the bound
    itself is refused); for text, the allowed ``choices`` (empty: any non-empty text)."""

    kind: str  # "int" | "float" | "str" | "layers" (non-empty list of ints >= 0) | "templates" | "share"
    minimum: float | None = None
    strict: bool = False
    choices: tuple[str, ...] = ()
    below: float | None = None  # an exclusive upper bound
    maximum: float | None = None  # an inclusive upper bound

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None."""
        if self.kind == "layers":
            if not isinstance(value, list) or not value:
                return "expected a non-empty list of layer indices"
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                return "layer indices must be integers >= 0"
            return None
        if self.kind == "templates":  # [[length, count], ...]; empty: only the bare prompt
            ok = isinstance(value, list) and all(
                isinstance(t, list)
                and len(t) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in t)
                for t in value
            )
            return None if ok else "expected a list of [length, count] pairs of integers >= 1"
        if self.kind == "share":  # a number in [minimum, maximum] or one of the named choices
            if isinstance(value, str):
                if value in self.choices:
                    return None
                return f"expected a number in [{self.minimum:g}, {self.maximum:g}] or one of {self.choices}"
            return Rule("float", self.minimum, maximum=self.maximum).problem(value)
        if self.kind == "str":
            if not isinstance(value, str) or not value.strip():
                return "expected a non-empty string"
            if self.choices and value not in self.choices:
                return f"expected one of {', '.join(map(repr, self.choices))}"
            return None
        numeric = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            return f"expected {'an integer' if self.kind == 'int' else 'a number'}"
        if not math.isfinite(value):
            return "expected a finite number"
        if self.minimum is not None and (value <= self.minimum if self.strict else value < self.minimum):
            return f"must be {'>' if self.strict else '>='} {self.minimum:g}"
        if self.below is not None and value >= self.below:
            return f"must be < {self.below:g}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum:g}"
        return None


def _positive(kind: str) -> Rule:
    return Rule(kind, 0, strict=True)


def _at_least(kind: str, minimum: float) -> Rule:
    return Rule(kind, minimum)


# every field of every params dataclass, by name (the same name means the same thing in each method);
# make_params checks presets and overrides against this table before any work
RULES: dict[str, Rule] = {
    "layers": Rule("layers"),
    "lr": _positive("float"),
    "steps": _at_least("int", 1),
    "kl_factor": _at_least("float", 0),
    "weight_decay": _at_least("float", 0),
    "clamp_norm_factor": _positive("float"),
    "early_stop_loss": _at_least("float", 0),
    "templates": Rule("templates"),
    "template_seed": Rule("int"),
    "stats_corpus": Rule("str"),
    "stats_samples": _at_least("int", 1),
    "stats_max_tokens": _at_least("int", 1),
    "max_rows": _at_least("int", 1),
    "target_matmul": Rule("str", choices=("model", "bfloat16")),
    "key_mode": Rule("str", choices=("templates", "prompt")),
    "mom2_update_weight": _at_least("float", 0),
    "norm_constraint": _positive("float"),
    "heads": _at_least("int", 1),
    "head_language": Rule("str"),
    "classifier_records": Rule("str", choices=("succeeded", "all")),
    "classifier_split": Rule("float", 0, strict=True, below=1),
    "classifier_seed": Rule("int"),
    "correction_lr": _positive("float"),
    "correction_batch": _at_least("int", 1),
    "correction_epochs": _at_least("int", 1),
    "correction_min_steps": _at_least("int", 1),
    "correction_kl_factor": _at_least("float", 0),
    "correction_weight_decay": _at_least("float", 0),
    "correction_clamp": _positive("float"),
    "bias_fold": Rule("str", choices=("sum", "overwrite")),
    "attn_layers": Rule("layers"),
    "alpha": Rule("share", 0, maximum=1, choices=("trace",)),
    "attn_mom2_update_weight": _at_least("float", 0),
    "trace_cases": _at_least("int", 1),
}


PRESETS_ENV = "ATTNEDIT_PRESETS"  # user preset directories, searched before the shipped presets


def _preset_files(method: str) -> list[Path]:
    """The preset files of ``method``: the ``$ATTNEDIT_PRESETS`` directories first, then the shipped ones."""
    roots = [Path(d) / method for d in os.environ.get(PRESETS_ENV, "").split(os.pathsep) if d]
    roots.append(Path(str(resources.files("attnedit") / "resources" / "presets" / method)))
    return [p for root in roots if root.is_dir() for p in sorted(root.glob("*.json"))]


def available_presets(method: str) -> list[str]:
    return [p.stem for p in _preset_files(PRESET_METHOD.get(method, method))]


def _matches(preset: dict, model_name: str) -> bool:
    name = model_name.lower().rstrip("/")
    candidates = {preset["model"].lower(), *(m.lower() for m in preset.get("matches", []))}
    return name in candidates or Path(name).name in candidates


def load_preset(method: str, model_name: str, preset: str | None = None) -> dict:
    """The preset dict for ``method``: named/path ``preset`` if given, else the one matching the model."""
    if method not in PARAMS:
        raise PresetError(f"method {method!r} has no presets")
    owner = PRESET_METHOD.get(method, method)
    if preset and Path(preset).is_file():
        data = json.loads(Path(preset).read_text())
    else:
        found = [json.loads(p.read_text()) for p in _preset_files(owner)]
        if preset:
            hits = [d for d in found if d["model"] == preset]
        else:
            hits = [d for d in found if _matches(d, model_name)]
        if not hits:
            what = f"preset {preset!r}" if preset else f"preset for model {model_name!r}"
            raise PresetError(
                f"{method}: no {what}; available: {', '.join(available_presets(method))} "
                "(choose one with --preset NAME or a JSON file, e.g. for a model of the same family and size)"
            )
        data = hits[0]
    if data.get("method") not in (method, owner):
        raise PresetError(
            f"preset {data.get('model')!r} is for method {data.get('method')!r}, not {method!r}"
        )
    return data


def _convert(value: str, hint: Any, key: str) -> Any:
    text = value.strip()
    try:
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        if hint == float | str:  # a number, else the text (alpha=0.2, alpha=trace)
            try:
                return float(text)
            except ValueError:
                return text
        if hint == list[int]:  # layer lists: 3-7, 3,4,5, [3, 4, 5]
            layers = parse_layers(text)
            if layers is None:
                raise PresetError(f"--param {key}={value!r}: name the layers (e.g. 3-7 or 3,4,5)")
            return layers
        return json.loads(text)
    except PresetError:
        raise
    except ValueError as err:
        if hint == list[int]:  # the parser says what is wrong with which item
            raise PresetError(f"--param {key}={value!r}: {err}") from None
        raise PresetError(f"--param {key}={value!r}: expected {getattr(hint, '__name__', hint)}") from None


def make_params(method: str, preset: dict, overrides: dict[str, Any] | None = None):
    """The method's params dataclass from a preset plus overrides (strings from the CLI are parsed)."""
    cls = PARAMS[method]
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    values = dict(preset.get("params", {}))
    for key, value in (overrides or {}).items():
        if key not in known:
            raise PresetError(f"{method} has no parameter {key!r}; known: {', '.join(sorted(known))}")
        values[key] = _convert(value, hints[key], key) if isinstance(value, str) else value
    unknown = set(values) - known
    if unknown:
        raise PresetError(
            f"preset {preset.get('model')!r} sets unknown {method} parameter(s) {sorted(unknown)}"
        )
    if "layers" not in values:
        raise PresetError(f"{method}: the preset or --param must give 'layers'")
    params = cls(**values)
    for f in fields(params):
        problem = RULES[f.name].problem(getattr(params, f.name))
        if problem:
            origin = "--param" if f.name in (overrides or {}) else f"preset {preset.get('model')!r}"
            raise PresetError(f"{method}: {f.name}={getattr(params, f.name)!r} ({origin}): {problem}")
    return params


# fields added after run directories were written, with the value those runs used: at that value a field
# is left out of the manifest's hyper-parameters, so the earlier runs keep their identity and hashes
ADDED_LATER: dict[str, Any] = {"target_matmul": "model"}


def params_dict(params: Any) -> dict:
    """The parameters as the run manifest records them (``ADDED_LATER`` fields only when not at their
    old value)."""
    return {k: v for k, v in asdict(params).items() if k not in ADDED_LATER or ADDED_LATER[k] != v}
