"""The scoring engine and fast greedy decoding on the real SmolLM2-135M (the tiny-model checks are in
``tests/unit/test_scoring.py``)."""

import pytest
from helpers import SCORING_PAIRS, hf_greedy

from attnedit.core.models import ModelBundle
from attnedit.core.scoring import generate, score_targets, score_targets_reference


@pytest.mark.smollm2
def test_fast_greedy_decoding_equals_hf_generate_on_smollm2(smollm2: ModelBundle):
    prompts = ["The Eiffel Tower is located in", "Danielle Darrieux's mother tongue is", "Hi"]
    fast = generate(smollm2.model, smollm2.tokenizer, prompts, max_new_tokens=40, adapter=smollm2.adapter)
    assert fast == hf_greedy(smollm2, prompts, 40)


@pytest.mark.smollm2
def test_engine_matches_reference_on_smollm2(smollm2: ModelBundle):
    fast = score_targets(smollm2.model, smollm2.tokenizer, smollm2.adapter, SCORING_PAIRS)
    slow = score_targets_reference(smollm2.model, smollm2.tokenizer, SCORING_PAIRS)
    for f, s in zip(fast, slow, strict=True):
        assert f.argmax_ids == s.argmax_ids
        assert f.logprobs == pytest.approx(s.logprobs, abs=1e-3)
    # SmolLM2 knows the Eiffel Tower's city
    assert fast[0].nll < fast[1].nll
