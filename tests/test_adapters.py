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
    from conftest import make_tiny

    bundle = make_tiny("gpt2", tiny_tokenizer)
    raw = bundle.adapter.module(bundle.model, "mlp_down", 0).weight  # Conv1D: [in, out]
    view = bundle.adapter.mlp_down_weight(bundle.model, 0)
    assert view.shape == (raw.shape[1], raw.shape[0])
    assert view.data_ptr() == raw.data_ptr()  # a view, so in-place edits reach the model


def test_fused_projection_error_and_layer_range(tiny_tokenizer):
    from conftest import make_tiny

    bundle = make_tiny("gpt2", tiny_tokenizer)
    with pytest.raises(UnsupportedModelError, match="attn_q"):
        bundle.adapter.module_name("attn_q", 0)
    with pytest.raises(IndexError):
        bundle.adapter.module_name("mlp_down", 3)
    assert bundle.adapter.module_name("attn_qkv", 0) == "transformer.h.0.attn.c_attn"


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
