"""Repeated forward passes over a ``SplitBatch`` that recompute only what the optimised parameters change.

Tokens before the fact token do not depend on a delta injected at or after it, at any layer, so their
keys and values are computed once (a KV cache, reset to the prefix after every pass); the blocks below
the lowest changed layer are skipped (``start_at_layer``) with their output on the remaining tokens
recorded once. Used by the target optimisation, fine-tuning and MEMAT's head corrections.
"""

from __future__ import annotations

import torch

from attnedit.core.hf_compat import CacheCheckpoint, forward_with_cache, map_cache_tensors, output_cache
from attnedit.core.interventions import Trace, start_at_layer
from attnedit.core.models import ModelBundle
from attnedit.editing.rows import SplitBatch


class _PrefixCache:
    """The prompt prefixes' KV cache, reset to the prefix after every pass (suffix entries dropped)."""

    def __init__(self, cache: object | None):
        self.cache = cache
        self._checkpoint: CacheCheckpoint | None = None
        if cache is not None:
            # a row with an empty prefix attends to nothing there; keep its masked entries finite
            map_cache_tensors(cache, lambda t: t.nan_to_num(0.0))
            self._checkpoint = CacheCheckpoint(cache)

    def reset(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.restore()


class FrozenBelow:
    """Repeated forward passes over a ``SplitBatch`` where nothing changes below ``first_layer``
    or before the fact token: the prefix KV cache and the lower blocks' output are computed once."""

    def __init__(self, bundle: ModelBundle, batch: SplitBatch, first_layer: int):
        self.bundle, self.batch, self.first_layer = bundle, batch, first_layer
        model, adapter = bundle.model, bundle.adapter
        self.base = model.base_model
        with torch.no_grad():
            cache = None
            if batch.prefix_width:
                cache = output_cache(
                    self.base(
                        input_ids=batch.prefix_ids,
                        attention_mask=batch.prefix_mask,
                        position_ids=(batch.prefix_mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True,
                    )
                )
            self.prefix = _PrefixCache(cache)
            self.lower_output = None
            if first_layer > 0:
                below = adapter.module_name("layer", first_layer - 1)
                with Trace(model, [below], detach=True, stop=True) as trace:
                    self._run()
                self.lower_output = trace[below].output

    def _run(self) -> torch.Tensor | None:
        b = self.batch
        try:
            out = forward_with_cache(
                self.base,
                self.prefix.cache,
                use_cache=self.prefix.cache is not None,
                input_ids=b.suffix_ids,
                attention_mask=b.attention_mask,
                position_ids=b.positions,
            )
            hidden: torch.Tensor | None = out.last_hidden_state
            return hidden
        finally:
            self.prefix.reset()

    def forward(self) -> torch.Tensor:
        """Final hidden states of the suffix tokens [B, S, H] (the lower blocks skipped)."""
        with start_at_layer(self.bundle.model, self.bundle.adapter, self.first_layer, self.lower_output):
            hidden = self._run()
        assert hidden is not None
        return hidden
