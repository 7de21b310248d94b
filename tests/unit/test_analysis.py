"""SADR section 3 analyses and ROME's causal tracing on tiny models, against direct computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import FAMILIES, make_tiny

from attnedit.analysis.drift import (
    FACTORS,
    LastTokenAttention,
    attention_drift,
    correlate,
    drift_factors,
    pearson,
    record_last_token_attention,
)
from attnedit.analysis.engine import Restoration, window_layers
from attnedit.analysis.patching import patch_attention, patch_attention_scores, record_attention
from attnedit.analysis.specificity import specificity_prompts
from attnedit.analysis.substitution import record_outputs, substitute_outputs
from attnedit.analysis.tracing import (
    causal_trace,
    layer_effects,
    subject_last_effects,
    subject_noise,
    trace_restorations,
)
from attnedit.core.adapters import UnsupportedModelError
from attnedit.core.data import EditCase, EditRequest, Probe
from attnedit.core.interventions import attention_probabilities
from attnedit.core.models import ModelBundle
from attnedit.core.tokens import encode_prompt, encode_target, locate_subject

# short prompts: the tiny tokenizer is almost character-level, and every test runs many rows per prompt
PROMPT, SUBJECT, TARGET = "The Eiffel Tower is in", "Eiffel Tower", "Paris"
CASE = EditCase(
    case_id="0",
    request=EditRequest("{} is in", "Eiffel Tower", "Rome", "Paris"),
    rewrite=(Probe("Eiffel Tower is in", "Rome"),),
    neighborhood=(Probe("Louvre is in", "Paris"), Probe("Berlin is in", "Germany")),
    relation=(Probe("Eiffel Tower speaks", "French"),),
)
TASKS = specificity_prompts(CASE)
ATOL = 1e-8  # probabilities of the random tiny models are about 1/320: compare tightly


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models gain nothing from threads, and on a busy machine extra threads make them much slower."""


def _json(result) -> dict:
    data = result.to_json()
    json.dumps(data, allow_nan=False)
    return data


@pytest.fixture(params=FAMILIES)
def bundle(request, tiny_tokenizer) -> ModelBundle:
    return make_tiny(request.param, tiny_tokenizer)


def _probs(bundle: ModelBundle, prompts, targets) -> np.ndarray:
    """P(first target token) of each prompt by a plain, unpadded forward pass."""
    out = []
    for prompt, wanted in zip(prompts, targets, strict=True):
        ids = encode_prompt(bundle.tokenizer, prompt)
        probs = bundle.model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        out.append([float(probs[encode_target(bundle.tokenizer, prompt, t, ids)[0]]) for t in wanted])
    return np.array(out)


def _perturb(bundle: ModelBundle, component: str, layer: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """Add noise in place to one linear weight ([out, in] view; the query projection's own rows, fused or
    not, for ``attn_q``); returns what restores it."""
    a = bundle.adapter
    if component == "attn_q":
        weight = a.qkv_weight(bundle.model, component, layer)
    else:
        weight = a.weight_view(bundle.model, component, layer)
    name = a.weight_name(component, layer)
    original = {name: bundle.model.get_parameter(name).detach().clone()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight += torch.randn(weight.shape, generator=generator)
    return original


def _revert(bundle: ModelBundle, original: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in original.items():
            bundle.model.get_parameter(name).copy_(value)


# --- causal tracing ---------------------------------------------------------------------------------


@torch.inference_mode()
def test_restoring_everything_is_clean_and_nothing_is_corrupted(bundle: ModelBundle):
    a = bundle.adapter
    ids = encode_prompt(bundle.tokenizer, PROMPT)
    everything = Restoration("layer", tuple(range(a.n_layers)), tuple(range(len(ids))))
    run = trace_restorations(bundle, PROMPT, SUBJECT, TARGET, [everything, Restoration()], samples=3, seed=1)
    target = encode_target(bundle.tokenizer, PROMPT, TARGET, ids)[0]
    clean = float(bundle.model(torch.tensor([ids])).logits[0, -1].softmax(-1)[target])
    assert run.clean == pytest.approx(clean, abs=1e-6)
    assert run.values[0] == pytest.approx(clean, abs=1e-6)
    # the corrupted run by hand: the same noise on the subject's input embeddings
    span = locate_subject(bundle.tokenizer, PROMPT, SUBJECT)
    cols = list(range(span.first_token, span.last_token + 1))
    embed = a.module(bundle.model, "embed")
    corrupted = []
    for draw in subject_noise(bundle, len(cols), 3, run.noise, 1):
        embeds = embed(torch.tensor([ids])).clone()
        embeds[0, cols] += draw
        corrupted.append(float(bundle.model(inputs_embeds=embeds).logits[0, -1].softmax(-1)[target]))
    assert run.values[1] == pytest.approx(np.mean(corrupted), abs=1e-6)
    assert abs(run.values[1] / clean - 1) > 1e-3  # the noise matters
    assert run.noise == pytest.approx(3 * float(embed.weight.std()), rel=1e-6)
    _json(run)


def test_causal_trace_grid(bundle: ModelBundle):
    a = bundle.adapter
    n_tokens = len(encode_prompt(bundle.tokenizer, PROMPT))
    wide = causal_trace(bundle, PROMPT, SUBJECT, TARGET, window=2 * a.n_layers, samples=2)
    assert set(wide.restored) == {"layer", "mlp", "attn"}
    for values in wide.restored.values():
        assert values.shape == (a.n_layers, n_tokens)
    # every centre's window covers all layers: restoring the last token's block outputs restores the output
    np.testing.assert_allclose(wide.restored["layer"][:, -1], wide.clean, atol=1e-6)
    single = causal_trace(bundle, PROMPT, SUBJECT, TARGET, kinds=("layer", "mlp"), samples=2)
    assert single.restored["layer"][-1, -1] == pytest.approx(single.clean, abs=1e-6)
    assert single.corrupted == pytest.approx(wide.corrupted, abs=1e-6)  # same seed, same noise
    # tokens before the subject see no noise at all: restoring them does nothing
    np.testing.assert_allclose(single.effects["layer"][:, : single.subject_first], 0.0, atol=1e-6)
    effects = layer_effects(single)
    assert set(effects) == {"layer", "mlp"} and effects["mlp"].shape == (a.n_layers,)
    np.testing.assert_allclose(
        effects["mlp"], single.restored["mlp"][:, single.subject_last] - single.corrupted
    )
    peak = layer_effects(single, at="subject_max")["mlp"]
    assert np.all(peak >= effects["mlp"] - 1e-12)
    data = _json(single)
    assert data["tokens"] == single.tokens and len(data["effects"]["mlp"]) == a.n_layers
    assert window_layers(5, 10, 30) == tuple(range(0, 10)) and window_layers(0, 1, 3) == (0,)
    assert window_layers(2, 6, 3) == (0, 1, 2) and window_layers(4, 3, 30) == (3, 4, 5)


def test_subject_last_effects_are_the_trace_column(bundle: ModelBundle):
    """The cheap trace (only the subject's last token, only the layers asked for) gives exactly the
    subject-last column of the full causal trace, for each kind and measure."""
    n = bundle.adapter.n_layers
    for measure in ("prob", "logit"):
        full = layer_effects(
            causal_trace(bundle, PROMPT, SUBJECT, TARGET, kinds=("attn", "mlp"), samples=2, measure=measure)
        )
        picked = {"attn": [n - 1, 0], "mlp": list(range(n))}
        effects, run = subject_last_effects(
            bundle, PROMPT, SUBJECT, TARGET, picked, samples=2, measure=measure
        )
        assert len(run.values) == 1 + n + 2
        for kind, layers in picked.items():
            np.testing.assert_allclose(effects[kind], full[kind][layers], atol=1e-6)


# --- contaminating substitution ---------------------------------------------------------------------


@torch.inference_mode()
def test_substituting_nothing_or_own_outputs_changes_nothing(bundle: ModelBundle):
    assert TASKS.metrics == ("RS", "DNS", "DNS")
    recorded = record_outputs(bundle, TASKS.prompts)
    results = substitute_outputs(bundle, recorded, TASKS.targets, window=2)
    plain = _probs(bundle, TASKS.prompts, TASKS.targets)
    for kind, result in results.items():
        np.testing.assert_allclose(result.base, plain, atol=ATOL)  # substituting nothing: the unedited run
        for values, prompt_ids in zip(result.values, result.tokens, strict=True):
            assert values.shape == (bundle.adapter.n_layers, len(prompt_ids), 2)
        for effect in result.effects:
            np.testing.assert_allclose(effect, 0.0, atol=ATOL, err_msg=kind)
        _json(result)


@torch.inference_mode()
def test_substituting_edited_outputs(bundle: ModelBundle):
    unedited = _probs(bundle, TASKS.prompts, TASKS.targets)
    original = _perturb(bundle, "mlp_down", 1)
    edited = _probs(bundle, TASKS.prompts, TASKS.targets)
    recorded = record_outputs(bundle, TASKS.prompts, kinds=("layer", "mlp"))
    _revert(bundle, original)
    assert np.abs(edited / unedited - 1).max() > 1e-2
    results = substitute_outputs(bundle, recorded, TASKS.targets, window=1)
    np.testing.assert_allclose(results["mlp"].base, unedited, atol=ATOL)
    last = np.array([values[-1, -1] for values in results["layer"].values])
    np.testing.assert_allclose(last, edited, atol=ATOL)  # the last block's output at the last token
    mlp = results["mlp"].effects
    for effect in mlp:
        np.testing.assert_allclose(effect[0], 0.0, atol=ATOL)  # below the edited layer nothing differs
    assert max(np.abs(effect[1]).max() for effect in mlp) > 1e-6


# --- attention drift ----------------------------------------------------------------------------------


@torch.inference_mode()
def test_last_token_attention_and_drift(bundle: ModelBundle):
    a = bundle.adapter
    unedited = record_last_token_attention(bundle, TASKS.prompts, SUBJECT, TASKS.targets, batch_rows=2)
    np.testing.assert_allclose(unedited.target_probs, _probs(bundle, TASKS.prompts, TASKS.targets), atol=ATOL)
    for p, prompt in enumerate(TASKS.prompts):
        ids = torch.tensor([encode_prompt(bundle.tokenizer, prompt)])
        with attention_probabilities(bundle.model, a) as probs:
            out = bundle.model(ids, output_hidden_states=True)
        n = ids.shape[1]
        assert unedited.lengths[p] == n
        for layer in range(a.n_layers):
            np.testing.assert_allclose(unedited.attention[p, layer, :, :n], probs[layer][0, :, -1], atol=ATOL)
        np.testing.assert_allclose(unedited.attention[p, ..., n:], 0.0)
        np.testing.assert_allclose(unedited.hidden[p, 0], out.hidden_states[1][0, -1], atol=ATOL)
        assert unedited.subject_last[p] == locate_subject(bundle.tokenizer, prompt, SUBJECT).last_token
    np.testing.assert_allclose(attention_drift(unedited, unedited), 0.0, atol=1e-12)

    original = _perturb(bundle, "attn_q", 1)
    edited = record_last_token_attention(bundle, TASKS.prompts, SUBJECT)
    _revert(bundle, original)
    drift = attention_drift(unedited, edited)
    assert drift.shape == (len(TASKS.prompts), a.n_layers, a.n_heads)
    np.testing.assert_allclose(drift[:, 0], 0.0, atol=1e-9)  # below the perturbed layer nothing drifts
    assert np.all(drift[:, 1].sum(-1) > 1e-4)
    factors = drift_factors(unedited, edited, layers=[1, 2])
    np.testing.assert_allclose(factors.kl, drift[:, 1:].sum(axis=(1, 2)))
    _json(factors)
    _json(edited)


def _recording(attention: np.ndarray, hidden: np.ndarray, subject_last: list[int]) -> LastTokenAttention:
    n = attention.shape[0]
    return LastTokenAttention(
        prompts=[f"p{i}" for i in range(n)],
        lengths=np.full(n, attention.shape[-1]),
        subject_last=np.array(subject_last),
        attention=attention,
        hidden=hidden,
    )


def test_drift_factors_by_hand():
    # one prompt, 2 layers, 2 heads, 3 keys; the subject's last token is key 1
    w = np.array([[[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]], [[0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]])[None]
    w_edit = np.array([[[0.1, 0.8, 0.1], [0.5, 0.3, 0.2]], [[0.1, 0.2, 0.7], [0.2, 0.6, 0.2]]])[None]
    h = np.array([[[1.0, 0.0], [3.0, 4.0]]])  # [n, layers, hidden]
    h_edit = np.array([[[0.0, 1.0], [0.0, 4.0]]])
    unedited, edited = _recording(w, h, [1]), _recording(w_edit, h_edit, [1])
    kl = (w * np.log(w / w_edit)).sum(-1)
    np.testing.assert_allclose(attention_drift(unedited, edited), kl)
    f = drift_factors(unedited, edited)
    np.testing.assert_allclose(f.kl, [kl.sum()])
    # |W[s] - W*[s]|: layer 0 heads (0.3, 0.1), layer 1 heads (0.1, 0.8/3)
    np.testing.assert_allclose(f.subject_max_head, [0.3 + (0.6 - 1 / 3)])
    np.testing.assert_allclose(f.subject_all_heads, [0.3 + 0.1 + 0.1 + (0.6 - 1 / 3)])
    other = [[math.hypot(0.1, 0.2), math.hypot(0.1, 0.0)], [math.hypot(0.0, 0.1), math.hypot(2 / 15, 2 / 15)]]
    np.testing.assert_allclose(f.other_max_head, [max(other[0]) + max(other[1])])
    np.testing.assert_allclose(f.hidden_norm, [4.0])  # the last block by default
    np.testing.assert_allclose(f.hidden_distance, [3.0])
    np.testing.assert_allclose(f.hidden_cosine, [16.0 / 20.0])
    first = drift_factors(unedited, edited, layers=[0], hidden_layer=0)
    np.testing.assert_allclose(first.subject_max_head, [0.3])
    np.testing.assert_allclose(first.hidden_cosine, [0.0])
    with pytest.raises(ValueError, match="subject"):
        drift_factors(_recording(w, h, [-1]), _recording(w_edit, h_edit, [-1]))
    # over many prompts: every factor correlates with an outcome
    rng = np.random.default_rng(0)
    many_w = rng.dirichlet(np.ones(4), size=(12, 2, 3))
    many_edit = rng.dirichlet(np.ones(4), size=(12, 2, 3))
    hidden = rng.normal(size=(12, 2, 5))
    factors = drift_factors(_recording(many_w, hidden, [2] * 12), _recording(many_edit, hidden * 2, [2] * 12))
    correlations = correlate(factors, factors.kl * 2 + 1)
    assert correlations["kl"].r == pytest.approx(1.0) and correlations["kl"].p == 0.0
    assert set(correlations) == set(FACTORS) and all(c.n == 12 for c in correlations.values())
    json.dumps({k: c.to_json() for k, c in correlations.items()}, allow_nan=False)


def _with_correlation(n: int, r: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples whose sample correlation is exactly ``r``."""
    rng = np.random.default_rng(seed)
    x, z = rng.normal(size=n), rng.normal(size=n)
    x = (x - x.mean()) / np.linalg.norm(x - x.mean())
    z = z - z.mean()
    z = z - (z @ x) * x
    z /= np.linalg.norm(z)
    return x, r * x + math.sqrt(1 - r * r) * z


def test_pearson_against_formula_and_tables():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = 0.3 * x + rng.normal(size=30)
    result = pearson(x, y)
    dx, dy = x - x.mean(), y - y.mean()
    assert result.r == pytest.approx((dx @ dy) / math.sqrt((dx @ dx) * (dy @ dy)), abs=1e-12)
    reference = scipy.stats.pearsonr(x, y)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9) and result.n == 30
    # critical values of r (two-sided): df 8 at p = 0.05, df 10 at p = 0.01, df 28 at p = 0.05
    for n, r, p in [(10, 0.6319, 0.05), (12, 0.7079, 0.01), (30, 0.3610, 0.05)]:
        a, b = _with_correlation(n, r)
        result = pearson(a, b)
        assert result.r == pytest.approx(r, abs=1e-9)
        assert result.p == pytest.approx(p, abs=5e-4)
        assert pearson(a, -b).r == pytest.approx(-r) and pearson(a, -b).p == pytest.approx(result.p)
    assert pearson([1, 2, 3], [2, 4, 6]).p == 0.0
    assert math.isnan(pearson([1, 2], [3, 4]).p)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]).r)
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


# --- attention patching -----------------------------------------------------------------------------


@torch.inference_mode()
def test_patching_own_attention_changes_nothing(bundle: ModelBundle):
    before = bundle.model.config._attn_implementation
    plain = _probs(bundle, TASKS.prompts, TASKS.targets)
    recorded = record_attention(bundle, TASKS.prompts, batch_rows=2)
    n_layers = bundle.adapter.n_layers
    for window, queries in [(2 * n_layers, "all"), (1, "all"), (1, "last")]:
        result = patch_attention(
            bundle, recorded, TASKS.targets, window=window, queries=queries, batch_rows=5
        )
        np.testing.assert_allclose(result.base, plain, atol=ATOL)
        assert all(v.shape == (n_layers, 2) for v in result.values)
        np.testing.assert_allclose(np.stack(result.effects), 0.0, atol=ATOL)
    scores = patch_attention_scores(bundle, recorded, TASKS.targets, window=1)
    for effect in scores.effects:
        np.testing.assert_allclose(effect, 0.0, atol=ATOL)
    _json(scores)
    assert bundle.model.config._attn_implementation == before
    assert not any("_attnedit_softmax" in m.__dict__ for m in bundle.model.modules())
    assert not any("_attn" in m.__dict__ for m in bundle.model.modules())  # GPT-J's method is unshadowed


def test_attention_softmax_refuses_unknown_attention(tiny_tokenizer, monkeypatch):
    bundle = make_tiny("llama", tiny_tokenizer)
    monkeypatch.setattr(type(bundle.model), "_supports_attention_backend", False)
    with pytest.raises(UnsupportedModelError, match="attention_softmax supports"):
        record_attention(bundle, TASKS.prompts[:1])


@torch.inference_mode()
def test_patching_drifted_attention(bundle: ModelBundle):
    last = bundle.adapter.n_layers - 1
    unedited = _probs(bundle, TASKS.prompts, TASKS.targets)
    recorded = record_attention(bundle, TASKS.prompts)
    # queries of the last layer only: the edit reaches the output through that layer's attention alone
    original = _perturb(bundle, "attn_q", last)
    try:
        edited = _probs(bundle, TASKS.prompts, TASKS.targets)
        assert np.abs(edited / unedited - 1).max() > 1e-2
        for queries in ("all", "last"):
            result = patch_attention(bundle, recorded, TASKS.targets, window=1, queries=queries)
            np.testing.assert_allclose(result.base, edited, atol=ATOL)
            curves = np.stack(result.values)  # [prompts, centre layer, targets]
            np.testing.assert_allclose(curves[:, last], unedited, atol=ATOL)
            np.testing.assert_allclose(curves[:, :last], np.repeat(edited[:, None], last, 1), atol=ATOL)
        scores = patch_attention_scores(bundle, recorded, TASKS.targets, window=1)
        for effect in scores.effects:
            np.testing.assert_allclose(effect[:last], 0.0, atol=ATOL)
        assert max(np.abs(effect[last]).max() for effect in scores.effects) > 1e-6
    finally:
        _revert(bundle, original)
    np.testing.assert_allclose(_probs(bundle, TASKS.prompts, TASKS.targets), unedited, atol=1e-7)


def test_specificity_prompts():
    assert TASKS.subject == "Eiffel Tower"
    assert TASKS.prompts[1] == "Eiffel Tower is in Rome. Louvre is in"
    assert TASKS.targets == (("French", "Rome"), ("Paris", "Rome"), ("Germany", "Rome"))
    assert specificity_prompts(CASE, ("RS",)).prompts == ("Eiffel Tower speaks",)


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_skipping_unchanged_blocks_and_columns_equals_running_them(family, tiny_tokenizer, monkeypatch):
    """Substitution and single-entry patching rows skip the blocks below their window (start_at_layer fed
    with the plain rows' outputs) and the columns before the first one they change (the plain rows' KV
    cache): the same values as running everything, for every family (GPT-J's blocks return tuples)."""
    import contextlib

    from attnedit.analysis import engine

    bundle = make_tiny(family, tiny_tokenizer)
    prompts, targets = TASKS.prompts[:3], TASKS.targets[:3]
    unedited_attention = record_attention(bundle, prompts)
    original = _perturb(bundle, "mlp_down", 1)
    recorded = record_outputs(bundle, prompts, kinds=("attn", "mlp"))
    _revert(bundle, original)
    fast = substitute_outputs(bundle, recorded, targets, window=3)
    original = _perturb(bundle, "mlp_down", 1)
    fast_scores = patch_attention_scores(bundle, unedited_attention, targets, window=3)
    _revert(bundle, original)
    calls = []

    def run_everything(model, adapter, layer, lower_output):
        calls.append(layer)
        return contextlib.nullcontext()

    monkeypatch.setattr(engine, "start_at_layer", run_everything)
    monkeypatch.setattr(engine, "_first_column", lambda spec, batch, prompt: 0)
    slow = substitute_outputs(bundle, recorded, targets, window=3)
    original = _perturb(bundle, "mlp_down", 1)
    slow_scores = patch_attention_scores(bundle, unedited_attention, targets, window=3)
    _revert(bundle, original)
    assert calls and max(calls) > 0  # rows did ask to skip blocks (here: ran them instead)
    for kind in ("attn", "mlp"):
        np.testing.assert_allclose(fast[kind].base, slow[kind].base, atol=1e-7)
        for a, b in zip(fast[kind].values, slow[kind].values, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-7, err_msg=kind)
    for a, b in zip(fast_scores.values, slow_scores.values, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)
