from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers as T

from attnedit.core.adapters import FAMILIES, UnsupportedModelError, get_adapter
from attnedit.core.models import ModelBundle


def test_adapter_names_every_component(tiny: ModelBundle):
    a, model = tiny.adapter, tiny.model
    cfg = model.config
    assert a.n_layers == 3
    assert a.n_heads * a.head_dim == a.hidden_size == 48
    assert a.n_heads % a.n_kv_heads == 0
    if a.family == "llama":
        assert (a.n_heads, a.n_kv_heads, a.kv_group_size) == (6, 2, 3)
    for layer in range(a.n_layers):
        for comp in ("layer", "attn", "attn_o", "mlp", "mlp_in", "mlp_down"):
            assert isinstance(a.module(model, comp, layer), torch.nn.Module)
    # the down-projection maps the MLP's hidden units back to the residual stream: [hidden, inner]
    w = a.mlp_down_weight(model, 0)
    assert w.shape[0] == a.hidden_size and w.shape[1] > a.hidden_size
    assert a.attn_o_weight(model, 1).shape == (a.hidden_size, a.n_heads * a.head_dim)
    assert a.unembedding(model).weight.shape[0] == cfg.vocab_size
    a.module(model, "final_norm")
    a.module(model, "embed")


def test_conv1d_view_is_transposed_storage(tiny_tokenizer):
    from helpers import make_tiny

    bundle = make_tiny("gpt2", tiny_tokenizer)
    raw = bundle.adapter.module(bundle.model, "mlp_down", 0).weight  # Conv1D: [in, out]
    view = bundle.adapter.mlp_down_weight(bundle.model, 0)
    assert view.shape == (raw.shape[1], raw.shape[0])
    assert view.data_ptr() == raw.data_ptr()  # a view, so in-place edits reach the model


def test_fused_projections_and_layer_range(tiny_tokenizer):
    """GPT-2 and GPT-NeoX compute q, k and v in one module: the table says where each part lies (the
    numbers are checked against the models' own attention in test_family_matrix.py)."""
    from helpers import make_tiny

    gpt2 = make_tiny("gpt2", tiny_tokenizer).adapter
    assert gpt2.module_name("attn_q", 0) == gpt2.module_name("attn_qkv", 0) == "transformer.h.0.attn.c_attn"
    width = gpt2.n_heads * gpt2.head_dim
    # [q | k | v]
    assert gpt2.qkv("attn_k", 0).rows().tolist() == list(range(width, 2 * width))
    neox = make_tiny("gpt_neox", tiny_tokenizer).adapter
    value = neox.qkv("attn_v", 2)
    assert value.module == "gpt_neox.layers.2.attention.query_key_value"
    # [head][q, k, v][head_dim]: head h's value is features 3hd + 2d ... 3hd + 3d
    d = neox.head_dim
    assert value.rows().tolist() == [3 * h * d + 2 * d + i for h in range(neox.n_heads) for i in range(d)]
    with pytest.raises(ValueError, match="fused"):  # a fused weight is not the query's [out, in] matrix
        gpt2.weight_view(make_tiny("gpt2", tiny_tokenizer).model, "attn_q", 0)
    llama = make_tiny("llama", tiny_tokenizer).adapter
    assert llama.qkv("attn_k", 1).layout is None and llama.qkv("attn_k", 1).n_heads == llama.n_kv_heads
    with pytest.raises(UnsupportedModelError, match="attn_qkv"):  # nothing fused in Llama
        llama.module_name("attn_qkv", 0)
    with pytest.raises(IndexError):
        gpt2.module_name("mlp_down", 3)
    with pytest.raises(ValueError, match="qkv_layout"):  # a fused family must say where q, k, v lie
        replace(next(t for t in FAMILIES if t.family == "gpt2"), qkv_layout=None)


def test_unknown_architecture_names_class_and_file():
    model = T.AutoModelForCausalLM.from_config(
        T.BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)
    )
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(model)
    assert "BloomForCausalLM" in str(err.value)
    assert str(Path("attnedit") / "core" / "adapters.py") in str(err.value)


def test_every_family_has_a_table():
    assert {t.family for t in FAMILIES} >= {"llama", "gpt2", "gptj", "gpt_neox"}
    llama = next(t for t in FAMILIES if t.family == "llama")
    assert {"qwen2", "mistral"} <= set(llama.model_types)
