"""Everything attnedit needs from transformers beyond its stable public API, in one place.

The rest of the package calls the small functions here instead of touching transformers' internals:
the KV cache (how a model's ``forward`` takes and returns it, its per-layer tensors, slicing, copying and
restoring it), the attention kernel (``config._attn_implementation`` and its switch), the registry of
attention functions, and a few private attributes of loaded models. When transformers renames or
restructures one of these, this module is the one to change; version-dependent branches live here and
nowhere else. Supported range: the ``transformers`` requirement in ``pyproject.toml`` (tested at both ends
by ``scripts/test.sh``).

Behaviour is that of the direct calls these functions replace: same tensors, same kernels, same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# ``Any`` below: KV caches (``DynamicCache`` and its layers) and model outputs are transformers objects whose
# classes and attributes change between the supported versions; this module is where they are read.

# --- the KV cache as a forward argument and output ---


@functools.cache
def _cache_keyword(forward: Callable[..., object]) -> str:
    """The name under which a module class's ``forward`` takes the KV cache.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name still works there, with a
    ``FutureWarning``, until its removal). Read from the signature rather than the version number, so a
    family that is renamed later, or never, is called the way its own ``forward`` declares.
    """
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def forward_with_cache(module: nn.Module, cache: Any | None, use_cache: bool = True, **inputs: Any) -> Any:
    """``module(**inputs)`` with the KV cache ``cache`` (None: none yet) passed the way its ``forward`` wants.

    ``use_cache`` as in transformers: whether the output carries the (updated) cache, see ``output_cache``.
    """
    return module(**inputs, **{_cache_keyword(type(module).forward): cache}, use_cache=use_cache)


def output_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (``output.cache``, formerly ``output.past_key_values``)."""
    fields = dataclasses.fields(output) if dataclasses.is_dataclass(output) else ()
    if any(f.name == "cache" for f in fields):
        return output.cache
    return output.past_key_values


# --- the KV cache's contents ---


def new_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` laid out for ``model`` (per-layer types such as sliding windows)."""
    from transformers import DynamicCache

    return DynamicCache(config=model_config(model))


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values ``[batch, kv_head, position, head_dim]`` of every layer of a filled cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def map_cache_tensors(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every layer's keys and values ``t`` by ``fn(t)`` (in place on the cache object)."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            value = getattr(layer, name, None)
            if isinstance(value, torch.Tensor):
                setattr(layer, name, fn(value))


def slice_cache(model: nn.Module, cache: Any, rows: torch.Tensor, columns: int) -> Any:
    """A new cache for ``model`` holding positions ``0..columns-1`` of ``cache``, re-indexed to ``rows``."""
    sliced = new_cache(model)
    for layer, (keys, values) in enumerate(cache_tensors(cache)):
        sliced.update(keys[rows, :, :columns], values[rows, :, :columns], layer)
    return sliced


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A copy of ``cache`` whose batch row ``i`` is row ``rows[i]`` of ``cache`` (``cache`` is unchanged)."""
    selected = copy.deepcopy(cache)
    selected.reorder_cache(rows)
    return selected


class CacheCheckpoint:
    """The state of a cache at one point, to return to after forward passes have appended to it.

    Cache layers replace (never mutate) their tensors on update, so restoring each layer's attributes
    (tensors and counters such as a sliding window's cumulative length) restores the cache exactly,
    without copying any tensor.
    """

    def __init__(self, cache: Any):
        self.cache = cache
        self._saved = [dict(vars(layer)) for layer in cache.layers]

    def restore(self) -> None:
        """Put every layer back as it was when the checkpoint was taken."""
        for layer, saved in zip(self.cache.layers, self._saved, strict=True):
            vars(layer).clear()
            vars(layer).update(saved)


# --- attention kernels ---


def attention_kernel(model: nn.Module) -> str | None:
    """The attention implementation ``model`` runs now (``eager``, ``sdpa``, ``flash_attention_2``, ...)."""
    kernel: str | None = model_config(model)._attn_implementation
    return kernel


def set_attention_kernel(model: nn.Module, kernel: str | None) -> None:
    """Switch ``model`` (all its sub-models) to the attention implementation ``kernel``."""
    # transformers annotates str | dict, but takes None too: its own default choice, what loading picks
    causal_lm(model).set_attn_implementation(kernel)  # type: ignore[arg-type]  # None: see above


def uses_attention_interface(model: nn.Module) -> bool:
    """Whether ``model``'s attention layers dispatch through transformers' ``AttentionInterface``
    (so a function registered with ``register_attention`` can be switched in)."""
    return bool(getattr(type(model), "_supports_attention_backend", False))


def register_attention(name: str, function: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Register ``function`` as attention implementation ``name``, with the mask eager attention uses
    (an additive float mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, eager_mask)


AttendFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]


def own_attn_method(attend: AttendFn) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``attend(query, key, value, attention_mask) -> (output, probabilities)`` as a stand-in for the eager
    ``_attn`` method of an attention module that does not go through the ``AttentionInterface`` (GPT-J on
    transformers 4.x). transformers 4.x calls it with a fifth argument, ``head_mask`` (None unless a caller
    of the model passes one: attnedit never does); later versions without it."""

    def _attn(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if head_mask is not None:
            raise ValueError("attention with a head_mask is not supported here")
        if attention_mask is not None:  # 4.x may pass a mask wider than the keys; its _attn cuts it too
            attention_mask = attention_mask[..., : key.shape[-2]]
        return attend(query, key, value, attention_mask)

    return _attn


# --- loaded models ---


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """``model`` as the transformers model it is: attnedit passes models around as ``nn.Module`` (tests build
    them directly), and every one it edits is a ``PreTrainedModel``; typing only, nothing is checked."""
    return cast("PreTrainedModel", model)


def model_config(model: nn.Module) -> PretrainedConfig:
    """``model.config``, the model's transformers configuration."""
    return causal_lm(model).config


def output_embeddings(model: nn.Module) -> nn.Module:
    """``model.get_output_embeddings()``: the projection to the vocabulary (``lm_head``/``embed_out``)."""
    head: nn.Module = causal_lm(model).get_output_embeddings()
    return head


def commit_hash(model: nn.Module) -> str | None:
    """The hub commit a model was downloaded at (None or '' where transformers knows none)."""
    commit: str | None = getattr(model_config(model), "_commit_hash", "")
    return commit


def drop_quantizer(model: nn.Module) -> None:
    """Forget how the weights were quantised on disk (GGUF dequantised to plain floats on load), so that
    ``save_pretrained`` writes them as ordinary tensors."""
    # from_pretrained sets hf_quantizer on the instance; PreTrainedModel declares no such attribute
    causal_lm(model).hf_quantizer = None  # type: ignore[assignment]  # undeclared attribute: see above
    config = model_config(model)
    if hasattr(config, "quantization_config"):
        del config.quantization_config


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Inside the block, transformers parses a GGUF file once, not once per loader. Its GGUF loading reads
    the file again for the config, the weights and the tokenizer (each a ``gguf.GGUFReader`` of the whole
    file, the tokenizer's 49,152 strings parsed field by field), and builds ``gguf.get_tensor_name_map``
    again for every submodule: 20-26 s of the embedded SmolLM2's 2-thread conversion, against 7-9 s with
    both memoised (``docs/benchmarks.md``, model loading). transformers imports both from ``gguf`` at call
    time, so memoising the module's attributes for the block is enough; the readers only read (a memory
    map), and the same files come out (tested)."""
    import gguf

    with (
        _replaced(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader)),
        _replaced(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)),
    ):
        yield


@contextlib.contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    """Inside the block, ``owner.name`` is ``value``; restored on exit."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)
