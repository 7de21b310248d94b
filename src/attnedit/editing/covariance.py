"""Second-moment statistics C = E[k k^T] of a rewritten matrix's input over generic text.

Sources (``StatsSpec.corpus``):
- a text file path (plain text lines, JSON list or JSON lines; several joined with ``,``),
- ``hf:NAME[:CONFIG]``, a Hugging Face dataset's ``text`` column (needs ``datasets`` and a network),
- ``model``: text sampled from the model itself (seeded top-k), for offline use without a corpus;
  sampled once and cached (``model_texts``), shipped with the package for the embedded SmolLM2.

One forward pass per memory-bounded batch collects every requested layer of every requested component
(``second_moments_of``; stopping after the highest module).
Results are cached on disk as safetensors, keyed by model fingerprint, module, layer, corpus hash,
sample count and truncation, and in memory on the ``ModelBundle``. A cache file carries the sha256 of
its tensors; one that does not load, verify or hold finite values is set aside and recomputed
(``templates.set_aside``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from attnedit.core.data import load_texts
from attnedit.core.deltas import tensors_digest
from attnedit.core.files import atomic_write, cache_dir
from attnedit.core.interventions import Trace
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import generate, length_batches, pad_batch
from attnedit.core.tokens import padding_id
from attnedit.editing.templates import SEED_WORDS, read_texts, set_aside, texts_digest, write_texts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsSpec:
    corpus: str = "model"
    samples: int = 1000  # texts (the references use 100,000 Wikipedia samples)
    max_tokens: int = 128  # each text is truncated to this many tokens
    batch_tokens: int = 8192  # padded tokens per forward pass (bounds memory)
    sample_length: int = 64  # tokens per text when sampling from the model
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the statistics."""
        kind = (
            "model-sampled text"
            if self.corpus == "model"
            else ("Hugging Face dataset" if self.corpus.startswith("hf:") else "text file")
        )
        return {**asdict(self), "source": kind}


# the memory cache's key of one module's second moments: (component, layer, corpus key, spec)
MomentsKey = tuple[str, int, str, StatsSpec]

SAMPLING_CHUNK = 64  # prompts per sampling batch; each chunk has its own seed (spec.seed + its start)


def generate_chunk(bundle: ModelBundle, spec: StatsSpec, start: int, stop: int) -> list[str]:
    """Texts ``start:stop`` of the ``model`` corpus (one sampling batch, seeded by ``spec.seed + start``)."""
    prompts = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(start, stop)]
    continuations = generate(
        bundle.model,
        bundle.tokenizer,
        prompts,
        max_new_tokens=spec.sample_length,
        top_k=50,
        seed=spec.seed + start,
        batch_size=len(prompts),
        adapter=bundle.adapter,
    )
    return [p + t for p, t in zip(prompts, continuations, strict=True)]


def _sample_texts(bundle: ModelBundle, spec: StatsSpec, progress: bool = True) -> list[str]:
    """``spec.samples`` texts sampled from the model: top-k 50 continuations of the seed words, in
    batches of ``SAMPLING_CHUNK``."""
    logger.info(
        "sampling %d texts of %d tokens from %s for statistics", spec.samples, spec.sample_length, bundle.name
    )
    texts = []
    for start in tqdm(
        range(0, spec.samples, SAMPLING_CHUNK), desc="sampling text", unit="batch", disable=not progress
    ):
        texts += generate_chunk(bundle, spec, start, min(start + SAMPLING_CHUNK, spec.samples))
    return texts


def sampled_texts_name(bundle: ModelBundle, spec: StatsSpec) -> str:
    """The file name of ``spec``'s model-sampled texts for this model (cache and shipped copies)."""
    return f"{bundle.fingerprint[:16]}-s{spec.seed}-l{spec.sample_length}-n{spec.samples}.json"


def shipped_texts_path(bundle: ModelBundle, spec: StatsSpec) -> Path:
    """Where the package ships texts sampled once from an embedded model (``bench/ship_sampled_texts.py``)."""
    root = resources.files("attnedit") / "resources" / "sampled_texts"
    return Path(str(root / (sampled_texts_name(bundle, spec) + ".gz")))


def _read_shipped(path: Path, bundle: ModelBundle, spec: StatsSpec) -> list[str] | None:
    """The shipped texts at ``path`` if they are this model's and spec's; a damaged file is a ValueError
    (a user error at the CLI's boundary: the installed package must be repaired, nothing to set aside)."""
    try:
        entry = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"the shipped sampled texts {path} do not load ({err}); reinstall attnedit"
        ) from None
    texts = entry.get("texts")
    settings = (entry.get("fingerprint"), entry.get("seed"), entry.get("sample_length"), entry.get("chunk"))
    if settings != (bundle.fingerprint, spec.seed, spec.sample_length, SAMPLING_CHUNK):
        return None  # another model or other settings under a colliding name prefix: sample instead
    count_ok = isinstance(texts, list) and len(texts) == spec.samples
    if not count_ok or entry.get("sha256") != texts_digest(texts):
        raise ValueError(
            f"the shipped sampled texts {path} do not verify against their digest; reinstall attnedit"
        )
    return cast("list[str]", texts)  # the texts written with that digest


def model_texts(bundle: ModelBundle, spec: StatsSpec, progress: bool = True) -> list[str]:
    """The texts of the ``model`` corpus: sampled once per (model, seed, length, count), then cached in
    memory and under ``$ATTNEDIT_CACHE/texts`` (statistics of other layers reuse them). For the embedded
    SmolLM2 the package ships the texts of its preset's spec, sampled on our machine with this same
    function; they are used only when the model's full fingerprint and the spec match."""
    memo: dict[tuple[int, int, int], list[str]] = bundle.cache.setdefault("sampled_texts", {})
    key = (spec.seed, spec.sample_length, spec.samples)
    if key in memo:
        return memo[key]
    path = cache_dir() / "texts" / sampled_texts_name(bundle, spec)
    texts = read_texts(path, "texts") if path.is_file() else None
    if texts is None:
        shipped = shipped_texts_path(bundle, spec)
        texts = _read_shipped(shipped, bundle, spec) if shipped.is_file() else None
        if texts is not None:
            logger.info("using the %d texts shipped for %s (%s)", len(texts), bundle.name, shipped.name)
        else:
            texts = _sample_texts(bundle, spec, progress)
            write_texts(path, "texts", texts, fingerprint=bundle.fingerprint, spec=asdict(spec))
    memo[key] = texts
    return texts


def corpus_texts(bundle: ModelBundle, spec: StatsSpec, progress: bool = True) -> list[str]:
    """The statistics texts (at most ``spec.samples``)."""
    if spec.corpus == "model":
        return model_texts(bundle, spec, progress)
    if spec.corpus.startswith("hf:"):
        name, _, config = spec.corpus[3:].partition(":")
        try:
            import datasets
        except ImportError:
            raise RuntimeError(f"statistics corpus {spec.corpus!r} needs the 'datasets' package") from None
        try:
            ds = datasets.load_dataset(name, config or None, split="train")
        except Exception as err:  # offline, unknown name, ...
            raise RuntimeError(f"cannot load Hugging Face dataset {name!r}: {err}") from None
        return [t for t in ds["text"][: spec.samples * 2] if t and t.strip()][: spec.samples]
    texts: list[str] = []
    for part in spec.corpus.split(","):
        texts += load_texts(part)
    return texts[: spec.samples]


def _cache_path(bundle: ModelBundle, component: str, layer: int, key: str, spec: StatsSpec) -> Path:
    name = f"{component}.{layer}-{key}-n{spec.samples}-t{spec.max_tokens}.safetensors"
    return cache_dir() / "stats" / bundle.fingerprint[:16] / name


def read_tensor_file(
    path: Path, name: str, shape: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, dict[str, str]] | None:
    """Tensor ``name`` of the cache file at ``path`` and the file's metadata, when the file loads, verifies
    against its digest, holds ``name`` (of ``shape`` where given; 2-d otherwise) and only finite values;
    None otherwise (a damaged file is set aside, one written before digests existed is left to be
    replaced). The one reader of the statistics' and projections' cache files."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors: dict[str, torch.Tensor] = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as err:
        set_aside(path, f"does not load ({err})")
        return None
    if "sha256" not in meta:
        logger.info("cache file %s has no digest (an older version wrote it); recomputing it", path)
        return None
    tensor = tensors.get(name)
    right_shape = tensor is not None and (tuple(tensor.shape) == shape if shape else tensor.ndim == 2)
    if meta["sha256"] != tensors_digest(tensors) or tensor is None or not right_shape:
        set_aside(path, "does not verify against its digest")
        return None
    if not torch.isfinite(tensor).all():
        set_aside(path, "holds non-finite values")
        return None
    return tensor, meta


def write_tensor_file(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None
) -> None:
    """Cache ``tensors`` at ``path`` with their digest (and ``meta``), atomically."""
    full = {"sha256": tensors_digest(tensors), **(meta or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), full))


def _read_stats(path: Path) -> torch.Tensor | None:
    """The cached second moments at ``path`` when the file verifies; None (set aside or stale) otherwise."""
    found = read_tensor_file(path, "mom2")
    return None if found is None else found[0]


def corpus_key(spec: StatsSpec) -> str:
    """The cache key of a corpus known without loading it (files hashed; sampled text by its settings)."""
    if spec.corpus == "model":
        return f"model-{spec.seed}-{spec.sample_length}"
    if spec.corpus.startswith("hf:"):
        return hashlib.sha256(spec.corpus.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for part in spec.corpus.split(","):
        path = Path(part)
        if not path.is_file():
            raise FileNotFoundError(f"statistics corpus {path} does not exist")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def second_moments(
    bundle: ModelBundle, component: str, layers: Sequence[int], spec: StatsSpec, progress: bool = True
) -> dict[int, torch.Tensor]:
    """``{layer: E[k k^T]}`` (float32, [in, in]) of the input of ``component`` at each layer."""
    return second_moments_of(bundle, {component: layers}, spec, progress)[component]


def second_moments_of(
    bundle: ModelBundle, wanted: Mapping[str, Sequence[int]], spec: StatsSpec, progress: bool = True
) -> dict[str, dict[int, torch.Tensor]]:
    """``{component: {layer: E[k k^T]}}`` for several components: whatever is neither in memory nor on
    disk is computed in ONE pass over the corpus (one forward per batch traces every missing module)."""
    memo: dict[MomentsKey, torch.Tensor] = bundle.cache.setdefault("second_moments", {})
    key = corpus_key(spec)
    result: dict[str, dict[int, torch.Tensor]] = {component: {} for component in wanted}
    missing: dict[str, list[int]] = {}
    for component, layers in wanted.items():
        for layer in layers:
            if (component, layer, key, spec) in memo:
                result[component][layer] = memo[(component, layer, key, spec)]
                continue
            path = _cache_path(bundle, component, layer, key, spec)
            cached = _read_stats(path) if path.is_file() else None
            if cached is not None:
                result[component][layer] = memo[(component, layer, key, spec)] = cached
            else:
                missing.setdefault(component, []).append(layer)
    if missing:
        texts = corpus_texts(bundle, spec, progress)
        computed = _accumulate(bundle, missing, texts, spec, progress)
        for (component, layer), (mom2, count) in computed.items():
            path = _cache_path(bundle, component, layer, key, spec)
            _write_stats(path, mom2, count)
            result[component][layer] = memo[(component, layer, key, spec)] = mom2
        done = ", ".join(f"{component} at layers {layers}" for component, layers in missing.items())
        logger.info("statistics of %s cached under %s", done, path.parent)
    return result


def _write_stats(path: Path, mom2: torch.Tensor, count: int) -> None:
    """Cache one module's second moments at ``path`` with their token count and digest (atomically)."""
    write_tensor_file(path, {"mom2": mom2, "count": torch.tensor([count])})


def cache_entries(bundle: ModelBundle) -> dict[MomentsKey, torch.Tensor]:
    """The second moments in ``bundle``'s memory cache, under the keys ``second_moments_of`` uses
    (component, layer, corpus key, spec): what an executor ships to other workers
    (``install_cache_entries``) so that none recomputes them."""
    return dict(bundle.cache.get("second_moments", {}))


def install_cache_entries(bundle: ModelBundle, entries: dict[MomentsKey, torch.Tensor]) -> None:
    """Put second moments computed elsewhere (``cache_entries`` of the same model) in ``bundle``'s memory
    cache."""
    bundle.cache.setdefault("second_moments", {}).update(entries)


@torch.no_grad()
def _accumulate(
    bundle: ModelBundle, wanted: Mapping[str, list[int]], texts: list[str], spec: StatsSpec, progress: bool
) -> dict[tuple[str, int], tuple[torch.Tensor, int]]:
    """``{(component, layer): (E[k k^T], token count)}``: every requested module traced in the same
    forward passes (the sums of each module are exactly those of a pass for it alone)."""
    model, adapter, tok, device = bundle.model, bundle.adapter, bundle.tokenizer, bundle.device
    if not texts:
        raise ValueError(f"statistics corpus {spec.corpus!r} has no texts")
    limit = min(spec.max_tokens, adapter.max_positions or spec.max_tokens)
    encoded = [ids[:limit] for ids in tok(texts, add_special_tokens=True)["input_ids"] if ids]
    pad_id = padding_id(tok)
    names = {
        adapter.module_name(component, layer): (component, layer)
        for component, layers in wanted.items()
        for layer in layers
    }
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = length_batches([len(e) for e in encoded], order, spec.batch_tokens, 512)
    sums: dict[tuple[str, int], torch.Tensor] = {}
    count = 0
    what = "; ".join(f"{component} {layers}" for component, layers in wanted.items())
    for batch in tqdm(batches, desc=f"statistics {what}", unit="batch", disable=not progress):
        ids, mask = pad_batch([encoded[i] for i in batch], pad_id, left=False, device=device)
        with Trace(
            model, list(names), retain_input=True, retain_output=False, detach=True, stop=True
        ) as trace:
            model.base_model(input_ids=ids, attention_mask=mask)
        keep = mask.bool()
        count += int(keep.sum())
        for name, site in names.items():
            inputs = trace[name].input
            assert inputs is not None  # retain_input=True
            keys = inputs[keep].float()
            part = (keys.T @ keys).double()
            sums[site] = part if site not in sums else sums[site] + part
    return {site: ((total / count).float().cpu(), count) for site, total in sums.items()}
