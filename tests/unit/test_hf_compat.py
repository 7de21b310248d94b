"""transformers compatibility (core/hf_compat): the KV cache helpers do what the direct calls did, and the
cached paths run without transformers' deprecation warnings, so they keep working when the deprecated
names are removed. Run on the installed transformers and, in scripts/test.sh, on the lowest supported one."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import FAMILIES, make_tiny

from attnedit.analysis.substitution import record_outputs, substitute_outputs
from attnedit.core.data import EditRequest
from attnedit.core.hf_compat import (
    CacheCheckpoint,
    cache_tensors,
    forward_with_cache,
    output_cache,
    select_cache_rows,
    slice_cache,
)
from attnedit.core.scoring import generate, pad_batch, score_targets, score_targets_reference
from attnedit.editing.frozen_below import FrozenBelow
from attnedit.editing.rows import build_rows, split_rows

PROMPTS = ["The Eiffel Tower is in", "Danielle Darrieux speaks"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    return


@pytest.fixture
def deprecations():
    """Deprecation notices transformers logs (once per process, so the once-cache is cleared first);
    warnings are turned into errors by the tests' filterwarnings marks."""
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "deprecat" in record.getMessage().lower():
                seen.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


def _prompt_batch(bundle, prompts):
    ids = [bundle.tokenizer(p)["input_ids"] for p in prompts]
    ids, mask = pad_batch(ids, 0, left=True, device=bundle.device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_paths_raise_no_deprecation(family, tiny_tokenizer, deprecations):
    """Scoring with a shared prompt cache, greedy decoding, the optimisation's prefix cache and the
    analysis engine's column-skipping cache, with every FutureWarning/DeprecationWarning an error."""
    bundle = make_tiny(family, tiny_tokenizer)
    pairs = [(PROMPTS[0], " Paris in France"), (PROMPTS[0], " Rome"), (PROMPTS[1], " French and English")]
    with torch.inference_mode():
        fast = score_targets(bundle.model, bundle.tokenizer, bundle.adapter, pairs)
        slow = score_targets_reference(bundle.model, bundle.tokenizer, pairs)
    assert max(len(s.target_ids) for s in fast) > 1  # continuations run on the shared prompt cache
    for a, b in zip(fast, slow, strict=True):
        assert a.target_ids == b.target_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)

    texts = generate(bundle.model, bundle.tokenizer, PROMPTS, max_new_tokens=4, adapter=bundle.adapter)
    assert len(texts) == len(PROMPTS)

    request = EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris")
    rows = build_rows(bundle, [request], ["{}", "The city. {}", "You know that. {}"])
    batch = split_rows(rows, [0] * len(rows), 0, bundle.device)
    assert batch.prefix_width > 0  # the prefix cache is in use
    with torch.no_grad():
        frozen = FrozenBelow(bundle, batch, 1)
        first, again = frozen.forward(), frozen.forward()  # the second pass starts from the reset prefix
    assert torch.equal(first, again)

    recorded = record_outputs(bundle, PROMPTS, kinds=("mlp",))
    result = substitute_outputs(bundle, recorded, [["Paris"], ["French"]], window=1)
    assert len(result["mlp"].values) == len(PROMPTS)
    assert not deprecations, deprecations


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cache_helpers(family, tiny_tokenizer):
    """A sliced cache equals the cache of the prefix alone; selected rows are a copy; a checkpoint restores
    the cache exactly after a pass appended to it; the cache returned is the one the next pass takes."""
    bundle = make_tiny(family, tiny_tokenizer)
    base = bundle.model.base_model
    ids, mask, positions = _prompt_batch(bundle, PROMPTS)
    with torch.no_grad():
        full = output_cache(base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True))
        cut = 3
        rows = torch.tensor([1, 0, 1])
        prefix = output_cache(
            base(
                input_ids=ids[rows, :cut],
                attention_mask=mask[rows, :cut],
                position_ids=positions[rows, :cut],
                use_cache=True,
            )
        )
        for (k, v), (pk, pv) in zip(
            cache_tensors(slice_cache(bundle.model, full, rows, cut)), cache_tensors(prefix), strict=True
        ):
            assert torch.allclose(k, pk, atol=1e-6) and torch.allclose(v, pv, atol=1e-6)

        before = [(k.clone(), v.clone()) for k, v in cache_tensors(full)]
        selected = select_cache_rows(full, rows)
        assert all(k.shape[0] == 3 for k, _ in cache_tensors(selected))
        for (k, v), (bk, bv) in zip(cache_tensors(full), before, strict=True):
            assert torch.equal(k, bk) and torch.equal(v, bv)

        checkpoint = CacheCheckpoint(full)
        step = ids[:, -1:]
        extended = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = forward_with_cache(
            base, full, input_ids=step, attention_mask=extended, position_ids=positions[:, -1:] + 1
        )
        assert output_cache(out) is full  # a dynamic cache grows in place
        assert cache_tensors(full)[0][0].shape[2] == ids.shape[1] + 1
        checkpoint.restore()
        for (k, v), (bk, bv) in zip(cache_tensors(full), before, strict=True):
            assert torch.equal(k, bk) and torch.equal(v, bv)
        again = forward_with_cache(
            base, full, input_ids=step, attention_mask=extended, position_ids=positions[:, -1:] + 1
        )
    assert torch.equal(out.last_hidden_state, again.last_hidden_state)
