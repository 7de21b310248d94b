import math

import pytest
import torch
from helpers import SCORING_PAIRS, hf_greedy

from attnedit.core.models import ModelBundle
from attnedit.core.scoring import generate, score_targets, score_targets_reference, text_nll


def test_engine_matches_one_forward_per_pair(tiny: ModelBundle):
    fast = score_targets(tiny.model, tiny.tokenizer, tiny.adapter, SCORING_PAIRS, max_batch_tokens=64)
    slow = score_targets_reference(tiny.model, tiny.tokenizer, SCORING_PAIRS)
    for f, s in zip(fast, slow, strict=True):
        assert f.target_ids == s.target_ids
        assert f.argmax_ids == s.argmax_ids
        assert f.logprobs == pytest.approx(s.logprobs, abs=2e-5)
    assert fast[0] == fast[2]
    assert math.isclose(fast[1].prob, math.exp(-fast[1].nll))


def test_engine_with_bos_tokenizer(tiny_bos_tokenizer):
    from helpers import make_tiny

    bundle = make_tiny("llama", tiny_bos_tokenizer)
    fast = score_targets(bundle.model, bundle.tokenizer, bundle.adapter, SCORING_PAIRS)
    slow = score_targets_reference(bundle.model, bundle.tokenizer, SCORING_PAIRS)
    for f, s in zip(fast, slow, strict=True):
        assert f.logprobs == pytest.approx(s.logprobs, abs=2e-5)


def test_batching_does_not_change_scores(tiny: ModelBundle):
    one = score_targets(tiny.model, tiny.tokenizer, tiny.adapter, SCORING_PAIRS, max_batch_rows=1)
    many = score_targets(tiny.model, tiny.tokenizer, tiny.adapter, SCORING_PAIRS, max_batch_tokens=10_000)
    for a, b in zip(one, many, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=2e-5)


def test_text_nll_matches_model_loss(tiny: ModelBundle):
    texts = ["The Eiffel Tower is located in Paris.", "Rome is the capital of Italy, Berlin of Germany."]
    nll, counts = text_nll(tiny.model, tiny.tokenizer, tiny.adapter, texts)
    for text, n, c in zip(texts, nll, counts, strict=True):
        ids = torch.tensor([tiny.tokenizer(text).input_ids])
        loss = tiny.model(ids, labels=ids).loss
        assert c == ids.shape[1] - 1
        assert n / c == pytest.approx(float(loss), abs=1e-4)


def test_generation_is_greedy_and_batched(tiny: ModelBundle):
    prompts = ["The Eiffel Tower is", "What does Freddy Cole play? They play"]
    batched = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=5)
    single = [generate(tiny.model, tiny.tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    sampled = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=5, top_k=5, seed=3)
    assert sampled == generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=5, top_k=5, seed=3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_prompt_sampling_is_the_same_in_any_batch(tiny_tokenizer, family):
    from helpers import make_tiny

    bundle = make_tiny(family, tiny_tokenizer)
    prompts = ["The Eiffel Tower is", "What does Freddy Cole play? They play", "Paris is the capital of"]

    def sample(ps, seed=3, **kw):
        return generate(
            bundle.model,
            bundle.tokenizer,
            ps,
            max_new_tokens=8,
            top_k=5,
            seed=seed,
            adapter=bundle.adapter,
            sampling="prompt",
            **kw,
        )

    alone = [sample([p])[0] for p in prompts]
    assert sample(prompts) == alone
    assert sample(prompts[::-1]) == alone[::-1]  # another place in the batch
    assert sample(prompts, batch_size=2) == alone  # other batch-mates
    # the same prompt twice draws the same sample; another seed draws others
    assert sample([prompts[0], prompts[0]]) == [alone[0], alone[0]]
    assert sample(prompts, seed=4) != alone
    # one stream per batch (the default, model.generate): the same prompt twice in a batch draws two samples
    twice = generate(bundle.model, bundle.tokenizer, [prompts[0]] * 2, max_new_tokens=8, top_k=5, seed=3)
    assert twice[0] != twice[1]
    with pytest.raises(ValueError, match="sampling"):
        generate(bundle.model, bundle.tokenizer, prompts, top_k=5, sampling="case")


def test_top_k_sampler_draws_from_the_top_k_with_each_rows_generator():
    from attnedit.core.scoring import TopKSampler, prompt_generator

    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0, 4.8], [3.0, 0.0, 0.0, 0.0, 0.0]])
    top2 = [set(row.tolist()) for row in logits.topk(2).indices]
    sampler = TopKSampler(2, [prompt_generator(0, "a"), prompt_generator(0, "b")])
    draws = [sampler(logits).tolist() for _ in range(200)]
    for r in (0, 1):
        assert {d[r] for d in draws} == top2[r]  # both of its top 2, nothing else
    assert TopKSampler(1, [prompt_generator(0, "a"), prompt_generator(0, "b")])(logits).tolist() == [1, 0]
    # row 0's draws do not depend on row 1 (nor on its generator)
    solo = TopKSampler(2, [prompt_generator(0, "a")])
    pair = TopKSampler(2, [prompt_generator(0, "a"), prompt_generator(9, "z")])
    assert [int(solo(logits[:1])[0]) for _ in range(30)] == [int(pair(logits)[0]) for _ in range(30)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gptj"])
def test_fast_greedy_decoding_equals_hf_generate(tiny_tokenizer, family):
    from helpers import make_tiny

    bundle = make_tiny(family, tiny_tokenizer)
    prompts = ["The Eiffel Tower is", "What does Freddy Cole play? They play", "Rome"]
    fast = generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=12, adapter=bundle.adapter)
    assert fast == hf_greedy(bundle, prompts, 12)
    assert any(len(t) > 0 for t in fast)  # (a random model may end a text at once)


def test_too_long_sequence_is_a_clear_error(tiny_tokenizer):
    from helpers import make_tiny

    bundle = make_tiny("gpt2", tiny_tokenizer)
    long_prompt = "The Eiffel Tower is in Paris. " * 60
    with pytest.raises(ValueError, match="exceed the model's 512 positions"):
        score_targets(bundle.model, bundle.tokenizer, bundle.adapter, [(long_prompt, "Rome")])


def test_generation_with_row_deltas_equals_each_edit_applied(tiny: ModelBundle):
    """Cases with different weight edits generate in one batch (interventions.row_deltas) exactly as
    each would with its edit applied: an MLP down-projection in one layer (Linear, or GPT-2 Conv1D),
    an attention output projection in another, a bias where the family has one, and no edit at all."""
    model, adapter = tiny.model, tiny.adapter
    params = dict(model.named_parameters())
    down = adapter.weight_name("mlp_down", 0)
    o_proj = adapter.weight_name("attn_o", 1)
    gen = torch.Generator().manual_seed(0)

    def noise(name: str, scale: float) -> torch.Tensor:
        return torch.randn(params[name].shape, generator=gen) * scale

    edits = [
        {down: noise(down, 0.5)},
        {o_proj: noise(o_proj, 0.5), down: noise(down, 0.3)},
        {},
    ]
    bias = down.rsplit(".", 1)[0] + ".bias"
    if bias in params:
        edits[1][bias] = noise(bias, 1.0)
    prompts = ["The Eiffel Tower is", "What does Freddy Cole play? They play", "Paris is the capital of"]
    owner = [0, 1, 1, 2, 0, 2]
    rows = [prompts[i % 3] for i in range(len(owner))]
    together = generate(
        model, tiny.tokenizer, rows, max_new_tokens=6, adapter=adapter, batch_size=4, row_edits=(edits, owner)
    )
    expected = []
    for prompt, k in zip(rows, owner, strict=True):
        originals = {name: params[name].detach().clone() for name in edits[k]}
        with torch.no_grad():
            for name, delta in edits[k].items():
                params[name].add_(delta)
        try:
            expected += generate(model, tiny.tokenizer, [prompt], max_new_tokens=6, adapter=adapter)
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    params[name].copy_(original)
    assert together == expected
    plain = generate(model, tiny.tokenizer, rows, max_new_tokens=6, adapter=adapter)
    assert any(t != p for t, p, k in zip(together, plain, owner, strict=True) if edits[k])  # edits matter


def test_row_deltas_refuse_what_they_cannot_add(tiny: ModelBundle):
    from attnedit.core.interventions import row_deltas

    embedding = next(n for n, p in tiny.model.named_parameters() if p.ndim == 2)
    prompts = ["The Eiffel Tower is"]
    with pytest.raises((TypeError, ValueError), match="per-row"):
        generate(
            tiny.model,
            tiny.tokenizer,
            prompts,
            max_new_tokens=2,
            adapter=tiny.adapter,
            row_edits=([{embedding: torch.zeros_like(dict(tiny.model.named_parameters())[embedding])}], [0]),
        )
    with pytest.raises(KeyError, match="no parameter"):
        with row_deltas(tiny.model, [{"nope.weight": torch.zeros(1)}], [0]):
            pass


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_the_per_prompt_sampler_draws_from_generates_distribution(temperature, top_p):
    """The distribution a row is drawn from equals the one ``model.generate`` samples from with top-k 5
    and the generation config's temperature and top-p (its warpers, in its order)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from attnedit.core.scoring import TopKSampler

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    warped = TopKLogitsWarper(5)(None, warped)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = warped.softmax(-1)
    indices, probs = TopKSampler(5, [], temperature, top_p).distribution(logits)
    ours = torch.zeros_like(expected).scatter(-1, indices, probs / probs.sum(-1, keepdim=True))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_the_sampler_takes_temperature_and_top_p_from_the_generation_config(tiny: ModelBundle):
    from attnedit.core.scoring import _sampling_config

    assert _sampling_config(tiny.model) == {"temperature": 1.0, "top_p": 1.0}
    tiny.model.generation_config.temperature, tiny.model.generation_config.top_p = 0.6, 0.9
    assert _sampling_config(tiny.model) == {"temperature": 0.6, "top_p": 0.9}
