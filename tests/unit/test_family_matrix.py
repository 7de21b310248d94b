"""Feature x family matrix: every feature that touches attention internals or per-head activations, on
every tiny family (``helpers.FAMILIES``: Llama, Qwen2, Mistral with grouped-query attention; GPT-2 with
a fused Conv1D ``[q | k | v]``; GPT-J; GPT-NeoX with a fused projection interleaved per head).

The cells checked here, each against a property of the model's own computation:

* q/k/v through the adapter (``ModelAdapter.qkv``/``qkv_weight``/``qkv_bias``, ``interventions.qkv_heads``):
  the per-head weights compute the per-head outputs; writing one head's weight moves that head only;
  replacing with the recorded outputs reproduces the run exactly; a zeroed value head empties exactly the
  query heads that read it;
* attention softmax (``attention_softmax``): probabilities equal the model's own eager attention, scores
  equal ``q . k / sqrt(head_dim)`` from the adapter's q and k, head outputs equal ``probabilities @ v``;
  replacing scores or probabilities with the recorded ones reproduces the run exactly;
* head outputs (``head_outputs``): summed per head through the output projection they give the attention
  module's output.

The other cells run, on every family, in the modules that already test them:

* attention probabilities read, head outputs read/replace: ``test_interventions.py`` (``tiny`` fixture);
* SADR term against a direct computation: ``test_sadr.py::test_term_matches_direct_computation_*``;
* causal trace, substitution, drift, attention patching (probabilities and scores):
  ``test_analysis.py`` (``bundle`` fixture and ``FAMILIES`` parametrisations);
* ``row_deltas``: ``test_scoring.py`` (``tiny``); editing with rome/memit/pmet/ft:
  ``test_editing.py::test_methods_edit_every_family_and_revert_exactly`` (``tiny``).
"""

from __future__ import annotations

import pytest
import torch

from attnedit.core.adapters import QKV
from attnedit.core.interventions import (
    Trace,
    attention_probabilities,
    attention_softmax,
    head_outputs,
    qkv_heads,
)
from attnedit.core.models import ModelBundle

TEXT = "The Eiffel Tower is located in the city of Paris"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models gain nothing from threads."""


def _ids(bundle: ModelBundle) -> torch.Tensor:
    return torch.tensor([bundle.tokenizer(TEXT).input_ids])


def _kv_head(bundle: ModelBundle) -> torch.Tensor:
    """The key/value head each query head reads (grouped-query attention: consecutive groups)."""
    return torch.arange(bundle.adapter.n_heads) // bundle.adapter.kv_group_size


@torch.no_grad()
def test_qkv_weights_compute_the_per_head_outputs(tiny: ModelBundle):
    a, model, ids = tiny.adapter, tiny.model, _ids(tiny)
    layer = 1
    projections = {c: a.qkv(c, layer) for c in QKV}
    modules = sorted({p.module for p in projections.values()})
    assert len(modules) == (1 if a.table.qkv_layout else 3)  # fused families compute all three in one
    with Trace(model, modules, retain_input=True, detach=True) as inputs:
        heads = {}
        for c in QKV:
            with qkv_heads(model, a, c, [layer]) as seen:
                model(ids)
            heads[c] = seen[layer]
    for c, projection in projections.items():
        x = inputs[projection.module].input
        weight = a.qkv_weight(model, c, layer)
        n_heads = a.n_heads if c == "attn_q" else a.n_kv_heads
        assert weight.shape == (n_heads, a.head_dim, a.hidden_size)
        expected = torch.einsum("bsi,hdi->bshd", x, weight)
        bias = a.qkv_bias(model, c, layer)
        if bias is not None:
            expected = expected + bias
        torch.testing.assert_close(heads[c], expected)
        # the feature indices name the same numbers in the module's own output
        with Trace(model, [projection.module], detach=True) as out:
            model(ids)
        own = out[projection.module].hidden[..., projection.rows()]
        torch.testing.assert_close(own, heads[c].flatten(-2))
    # the three parts partition the module's output features (fused) or fill their own modules
    rows = torch.cat([projections[c].rows() for c in QKV])
    if a.table.qkv_layout:
        assert sorted(rows.tolist()) == list(range(projections["attn_q"].features))


@torch.no_grad()
def test_writing_one_heads_weight_moves_that_head_only(tiny: ModelBundle):
    a, model, ids = tiny.adapter, tiny.model, _ids(tiny)
    layer, head = 0, 1
    before = {}
    for c in QKV:
        with qkv_heads(model, a, c, [layer]) as seen:
            model(ids)
        before[c] = seen[layer]
    weight = a.qkv_weight(model, "attn_v", layer)
    saved = weight.clone()
    delta = torch.randn(a.head_dim, a.hidden_size, generator=torch.Generator().manual_seed(0))
    with Trace(model, [a.qkv("attn_v", layer).module], retain_input=True, detach=True) as inputs:
        weight[head] += delta  # a view: the model's own parameter changes
        try:
            after = {}
            for c in QKV:
                with qkv_heads(model, a, c, [layer]) as seen:
                    model(ids)
                after[c] = seen[layer]
        finally:
            weight.copy_(saved)
    x = inputs[a.qkv("attn_v", layer).module].input
    torch.testing.assert_close(after["attn_v"][:, :, head], before["attn_v"][:, :, head] + x @ delta.T)
    others = [h for h in range(a.n_kv_heads) if h != head]
    assert torch.equal(after["attn_v"][:, :, others], before["attn_v"][:, :, others])
    assert torch.equal(after["attn_q"], before["attn_q"]) and torch.equal(after["attn_k"], before["attn_k"])


def test_replacing_qkv_heads(tiny: ModelBundle):
    a, model, ids = tiny.adapter, tiny.model, _ids(tiny)
    layer = 1
    with torch.no_grad():
        clean = model(ids).logits
        for c in QKV:  # the recorded values put back: the same run, bit for bit
            with qkv_heads(model, a, c, [layer]) as seen:
                model(ids)
            recorded = seen[layer]
            with qkv_heads(model, a, c, [layer], replace=lambda h, _layer, r=recorded: r.clone()):
                assert torch.equal(model(ids).logits, clean), c

        def zero_value_head0(h: torch.Tensor, _layer: int) -> torch.Tensor:
            h = h.clone()
            h[:, :, 0] = 0
            return h

        with head_outputs(model, a, [layer]) as plain:
            model(ids)
        with (
            qkv_heads(model, a, "attn_v", [layer], replace=zero_value_head0) as seen,
            head_outputs(model, a, [layer]) as heads,
        ):
            model(ids)
        assert torch.all(seen[layer][:, :, 0] == 0)
        readers = _kv_head(tiny) == 0  # the query heads that read value head 0: their outputs vanish
        assert torch.all(heads[layer][:, :, readers] == 0)
        torch.testing.assert_close(heads[layer][:, :, ~readers], plain[layer][:, :, ~readers])
    # gradients flow through a replacement
    shift = torch.zeros(a.n_kv_heads, a.head_dim, requires_grad=True)
    with qkv_heads(model, a, "attn_v", [layer], replace=lambda h, _layer: h + shift):
        model(ids).logits[0, -1].logsumexp(-1).backward()
    assert shift.grad is not None and torch.all(shift.grad.abs().sum(-1) > 0)


@torch.no_grad()
def test_attention_softmax_equals_the_models_eager_attention(tiny: ModelBundle):
    a, model, ids = tiny.adapter, tiny.model, _ids(tiny)
    with attention_probabilities(model, a) as eager:
        eager_logits = model(ids).logits
    with attention_softmax(model, a) as record:
        logits = model(ids).logits
    torch.testing.assert_close(logits, eager_logits)
    for layer in range(a.n_layers):
        torch.testing.assert_close(record.probabilities[layer], eager[layer])
        torch.testing.assert_close(record.scores[layer].softmax(-1), record.probabilities[layer])


@torch.no_grad()
def test_scores_and_head_outputs_from_the_adapters_q_k_v(tiny: ModelBundle):
    """Scores on the diagonal are ``q_i . k_i / sqrt(head_dim)`` from the projections' own outputs (a rotary
    embedding turns q_i and k_i by the same angle, which leaves their dot product as it was); head outputs
    are ``probabilities @ v``. Both hold only if the adapter splits q, k and v where the attention does."""
    a, model, ids = tiny.adapter, tiny.model, _ids(tiny)
    n, kv = ids.shape[1], _kv_head(tiny)
    layers = range(a.n_layers)
    with (
        attention_softmax(model, a) as record,
        qkv_heads(model, a, "attn_q", layers) as q,
        qkv_heads(model, a, "attn_k", layers) as k,
        qkv_heads(model, a, "attn_v", layers) as v,
        head_outputs(model, a, layers) as heads,
    ):
        model(ids)
    for layer in layers:
        dots = (q[layer][0] * k[layer][0][:, kv]).sum(-1) * a.head_dim**-0.5  # [seq, head]
        diagonal = record.scores[layer][0].diagonal(dim1=-2, dim2=-1)  # [head, seq]
        torch.testing.assert_close(diagonal, dots.T)
        mixed = torch.einsum("hij,jhd->ihd", record.probabilities[layer][0], v[layer][0][:, kv])
        torch.testing.assert_close(heads[layer][0], mixed)
        assert record.scores[layer].shape == (1, a.n_heads, n, n)


@torch.no_grad()
def test_replacing_scores_and_probabilities(tiny: ModelBundle):
    a, model, ids = tiny.adapter, tiny.model, _ids(tiny)
    with attention_softmax(model, a) as record:
        clean = model(ids).logits
    with attention_softmax(model, a, edit_scores=lambda s, layer: record.scores[layer].clone()):
        assert torch.equal(model(ids).logits, clean)
    with attention_softmax(model, a, edit_probabilities=lambda p, layer: record.probabilities[layer].clone()):
        assert torch.equal(model(ids).logits, clean)

    # every query attends to the first token only: each head outputs that token's value
    def first_token(p: torch.Tensor, _layer: int) -> torch.Tensor:
        one_hot = torch.zeros_like(p)
        one_hot[..., 0] = 1
        return one_hot

    layer = 1
    with (
        attention_softmax(model, a, layers=[layer], edit_probabilities=first_token) as seen,
        qkv_heads(model, a, "attn_v", [layer]) as v,
        head_outputs(model, a, [layer]) as heads,
    ):
        changed = model(ids).logits
    assert torch.all(seen.probabilities[layer][..., 0] == 1)
    first_value = v[layer][0, 0, _kv_head(tiny)]  # [head, head_dim]
    torch.testing.assert_close(heads[layer][0], first_value.expand_as(heads[layer][0]))
    assert not torch.allclose(changed, clean)

    # a score pushed to the mask value removes that key from the softmax
    def mask_first_key(s: torch.Tensor, _layer: int) -> torch.Tensor:
        s = s.clone()
        s[..., 1:, 0] = torch.finfo(s.dtype).min
        return s

    with attention_softmax(model, a, layers=[layer], edit_scores=mask_first_key) as masked:
        model(ids)
    assert torch.all(masked.probabilities[layer][..., 1:, 0] == 0)
    torch.testing.assert_close(masked.probabilities[layer].sum(-1), torch.ones(1, a.n_heads, ids.shape[1]))


@torch.no_grad()
def test_head_outputs_sum_through_the_output_projection(tiny: ModelBundle):
    a, model, ids = tiny.adapter, tiny.model, _ids(tiny)
    layer = 2
    attn = a.module_name("attn", layer)
    with Trace(model, [attn], detach=True) as out, head_outputs(model, a, [layer]) as heads:
        model(ids)
    weight = a.attn_o_weight(model, layer).unflatten(1, (a.n_heads, a.head_dim))  # [hidden, head, head_dim]
    per_head = torch.einsum("bshd,ohd->bsho", heads[layer], weight)
    bias = a.module(model, "attn_o", layer).bias
    total = per_head.sum(2) + (bias if bias is not None else 0)
    torch.testing.assert_close(total, out[attn].hidden)
