"""Weight edits as objects (core.deltas) on tiny models of every family: apply, revert bit for bit,
save and load, the context manager, the empty edit of method ``none``, and edits that create a bias."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, make_tiny
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from attnedit.core.data import EditCase, EditRequest, Probe
from attnedit.core.deltas import (
    ABSENT,
    FORMAT,
    AppliedEdit,
    EditBuilder,
    EditIntegrityError,
    EditMismatchError,
    WeightEdit,
    model_hash,
    tensor_hash,
)
from attnedit.core.interventions import row_deltas
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import generate
from attnedit.editing.registry import make_editor

REQUEST = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
PROMPT = "The Eiffel Tower is located in the city of"


def _biasless_linear(bundle: ModelBundle) -> str:
    """A Linear without a bias: the attention output projection where the family has none (Llama, Qwen2,
    Mistral, GPT-J: where MEMAT folds its corrections), else the unembedding (GPT-2 and GPT-NeoX have
    biases on every projection)."""
    name = bundle.adapter.module_name("attn_o", 1)
    module = bundle.model.get_submodule(name)
    if isinstance(module, nn.Linear) and module.bias is None:
        return name
    head = bundle.model.get_output_embeddings()
    assert isinstance(head, nn.Linear) and head.bias is None
    return next(n for n, m in bundle.model.named_modules() if m is head)


def _meta(bundle: ModelBundle) -> dict:
    return {
        "method": "test",
        "hyperparameters": {"scale": 1.0},
        "requests": [REQUEST],
        "model_fingerprint": bundle.fingerprint,
    }


def _logits(bundle: ModelBundle) -> torch.Tensor:
    ids = torch.tensor([bundle.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        return bundle.model(input_ids=ids).logits


def _state(model: nn.Module) -> tuple:
    """What must be exactly as before after a revert: hash, parameter names, state_dict keys."""
    return model_hash(model), [n for n, _ in model.named_parameters()], list(model.state_dict())


def _created_bias_edit(bundle: ModelBundle, scale: float = 1.0) -> tuple[AppliedEdit, str]:
    """An edit that creates a bias and changes an existing weight (MLP down-projection of layer 0)."""
    module_name = _biasless_linear(bundle)
    size = bundle.model.get_submodule(module_name).out_features
    down = bundle.adapter.weight_name("mlp_down", 0)
    gen = torch.Generator().manual_seed(1)
    with EditBuilder(bundle.model) as builder:
        builder.add(f"{module_name}.bias", torch.randn(size, generator=gen) * scale)
        shape = dict(bundle.model.named_parameters())[down].shape
        builder.add(down, torch.randn(shape, generator=gen) * 0.1)
    return builder.finish(_meta(bundle)), f"{module_name}.bias"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_edit_creates_a_bias_and_revert_removes_it(family, tiny_tokenizer, tmp_path):
    bundle = make_tiny(family, tiny_tokenizer, seed=1)
    before, logits_before = _state(bundle.model), _logits(bundle)
    applied, name = _created_bias_edit(bundle)
    module = bundle.model.get_submodule(name.rpartition(".")[0])

    weight = module.weight
    assert isinstance(module.bias, nn.Parameter) and name in dict(bundle.model.named_parameters())
    assert module.bias.dtype == weight.dtype and module.bias.device == weight.device
    assert torch.equal(module.bias.detach().cpu(), applied.edit.deltas[name])  # zeros + delta
    assert applied.edit.created == [name] and applied.edit.base_hashes[name] == ABSENT
    edited = _logits(bundle)
    assert not torch.equal(edited, logits_before)
    path = applied.edit.save(tmp_path / "edit.safetensors")

    applied.revert()
    assert module.bias is None and _state(bundle.model) == before
    assert torch.equal(_logits(bundle), logits_before)
    applied.revert()  # idempotent
    assert module.bias is None and _state(bundle.model) == before

    # a fresh copy of the model: the loaded edit creates the bias again, with the same logits
    fresh = make_tiny(family, tiny_tokenizer, seed=1)
    loaded = WeightEdit.load(path)
    assert loaded.created == [name] and loaded.requests == [REQUEST]
    reapplied = loaded.apply(fresh.model)
    assert torch.equal(_logits(fresh), edited)
    # the parameter exists now: an edit that creates it refuses this model
    only_bias = WeightEdit(
        {name: loaded.deltas[name]}, "test", {}, [REQUEST], {name: ABSENT}, fresh.fingerprint
    )
    with pytest.raises(EditMismatchError, match="exists in this model, but this edit creates it"):
        only_bias.apply(fresh.model)
    reapplied.revert()
    assert _state(fresh.model) == before and torch.equal(_logits(fresh), logits_before)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_a_bias_the_model_has_is_a_plain_delta(family, tiny_tokenizer):
    """Where the attention output projection has a bias (GPT-2 Conv1D, NeoX), it changes in place."""
    bundle = make_tiny(family, tiny_tokenizer)
    name = bundle.adapter.module_name("attn_o", 1) + ".bias"
    param = dict(bundle.model.named_parameters())[name]
    before, base = _state(bundle.model), tensor_hash(param)
    with EditBuilder(bundle.model) as builder:
        builder.add(name, torch.ones(param.shape))
    applied = builder.finish(_meta(bundle))
    assert applied.edit.created == [] and applied.edit.base_hashes[name] == base
    assert dict(bundle.model.named_parameters())[name] is param  # the same parameter, changed
    applied.revert()
    assert _state(bundle.model) == before


def test_created_bias_takes_the_weight_dtype(tiny_tokenizer):
    bundle = make_tiny("llama", tiny_tokenizer)
    bundle.model.to(torch.bfloat16)
    before = _state(bundle.model)
    applied, name = _created_bias_edit(bundle)
    bias = dict(bundle.model.named_parameters())[name]
    assert bias.dtype == torch.bfloat16 and applied.edit.deltas[name].dtype == torch.bfloat16
    applied.revert()
    assert _state(bundle.model) == before


def test_only_a_missing_linear_bias_can_be_created(tiny_tokenizer):
    bundle = make_tiny("llama", tiny_tokenizer)
    before = _state(bundle.model)
    with pytest.raises(EditMismatchError, match="not the missing bias of a Linear"):
        with EditBuilder(bundle.model) as builder:
            builder.add("model.layers.0.input_layernorm.bias", torch.zeros(48))  # an RMSNorm
    with pytest.raises(EditMismatchError, match=r"no parameter 'model\.layers\.9\.self_attn\.o_proj\.bias'"):
        with EditBuilder(bundle.model) as builder:
            builder.add("model.layers.9.self_attn.o_proj.bias", torch.zeros(48))
    with pytest.raises(ValueError, match="delta shape"):
        with EditBuilder(bundle.model) as builder:
            builder.add(bundle.adapter.weight_name("mlp_down", 0), torch.zeros(48, 96))  # changed first
            builder.add("model.layers.0.self_attn.o_proj.bias", torch.zeros(7))
    assert _state(bundle.model) == before  # the failed builders left nothing behind


@pytest.mark.parametrize("family", FAMILIES)
def test_row_deltas_with_a_created_bias_equal_the_edit_applied(family, tiny_tokenizer):
    """Batched generation (evaluation's fluency) runs each row with its own deltas on the unedited model;
    a row whose edit creates a bias gets it added, exactly as with the edit applied."""
    bundle = make_tiny(family, tiny_tokenizer, seed=2)
    applied, name = _created_bias_edit(bundle, scale=3.0)
    ids = torch.tensor([bundle.tokenizer(PROMPT)["input_ids"]] * 2)
    prompts = [PROMPT, "Paris is the capital of"]
    with torch.no_grad():
        edited_logits = bundle.model(input_ids=ids[:1]).logits
    edited_text = generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=6, adapter=bundle.adapter)
    edit = applied.edit
    applied.revert()
    plain_text = generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=6, adapter=bundle.adapter)
    with torch.no_grad():
        plain_logits = bundle.model(input_ids=ids[:1]).logits
        with row_deltas(bundle.model, [edit.deltas, {}], [0, 1]):
            rows = bundle.model(input_ids=ids).logits
    assert name not in dict(bundle.model.named_parameters())  # the hook adds it; the model is untouched
    # x W + b computed as (x W) + b: equal up to the rounding of the weight delta's separate product
    assert torch.allclose(rows[:1], edited_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(rows[1:], plain_logits)
    owner = [0, 1, 0, 1]
    together = generate(
        bundle.model,
        bundle.tokenizer,
        prompts * 2,
        max_new_tokens=6,
        adapter=bundle.adapter,
        row_edits=([edit.deltas, {}], owner),
    )
    assert together == [edited_text[0], plain_text[1], edited_text[0], plain_text[1]]
    assert edited_text != plain_text  # the edit matters


def test_context_manager_reverts_unless_kept(tiny_tokenizer):
    bundle = make_tiny("gpt2", tiny_tokenizer)
    original = _state(bundle.model)
    applied, _ = _created_bias_edit(bundle)
    edit = applied.edit
    applied.revert()

    with pytest.raises(RuntimeError, match="inside"):
        with edit.apply(bundle.model) as inside:
            assert _state(bundle.model) != original
            raise RuntimeError("inside the block")
    assert inside.reverted and _state(bundle.model) == original

    # sequential editing: kept edits stay after their blocks; reverted last to first, the model is back
    first = edit.apply(bundle.model)
    with first as kept:
        assert kept.keep() is kept
    after_first = _state(bundle.model)
    assert after_first != original
    down = bundle.adapter.weight_name("mlp_down", 1)
    with EditBuilder(bundle.model) as builder:
        builder.add(down, torch.full_like(dict(bundle.model.named_parameters())[down], 0.01))
    with builder.finish(_meta(bundle)).keep() as second:
        pass
    assert _state(bundle.model) not in (original, after_first)
    second.revert()
    assert _state(bundle.model) == after_first
    first.revert()
    assert _state(bundle.model) == original


def test_method_none_is_an_empty_edit(tiny_tokenizer, tmp_path):
    bundle = make_tiny("qwen2", tiny_tokenizer)
    original, logits = _state(bundle.model), _logits(bundle)
    case = EditCase("c", REQUEST, rewrite=(Probe(PROMPT, "Rome"),))
    with make_editor("none", bundle).apply(bundle, [case]) as applied:
        assert isinstance(applied, AppliedEdit) and applied.edit.method == "none"
        assert applied.edit.deltas == {} and applied.edit.created == []
        assert applied.edit.requests == [REQUEST] and applied.edit.info == {}
        assert _state(bundle.model) == original
    loaded = WeightEdit.load(applied.edit.save(tmp_path / "none.safetensors"))
    assert loaded.deltas == {} and loaded.method == "none" and loaded.requests == [REQUEST]
    with loaded.apply(bundle.model):
        assert torch.equal(_logits(bundle), logits)
    assert _state(bundle.model) == original


def test_files_written_before_created_parameters_still_load(tiny_tokenizer, tmp_path):
    """An edit file as earlier versions wrote it (no created parameters, no info) loads and applies."""
    bundle = make_tiny("llama", tiny_tokenizer)
    name = bundle.adapter.weight_name("mlp_down", 0)
    param = dict(bundle.model.named_parameters())[name]
    delta = torch.full_like(param, 0.01)
    with torch.no_grad():
        expected = param.detach() + delta
    metadata = {
        "format": FORMAT,
        "method": "rome",
        "hyperparameters": json.dumps({"layers": [0]}),
        "requests": json.dumps([asdict(REQUEST)]),
        "base_hashes": json.dumps({name: tensor_hash(param)}),
        "model_fingerprint": bundle.fingerprint,
    }
    save_file({name: delta}, str(tmp_path / "old.safetensors"), metadata)
    loaded = WeightEdit.load(tmp_path / "old.safetensors")
    assert loaded.created == [] and loaded.info == {}
    original = _state(bundle.model)
    with loaded.apply(bundle.model):
        assert torch.equal(param.detach(), expected)
    assert _state(bundle.model) == original


def _saved_edit(tmp_path: Path, delta: torch.Tensor) -> Path:
    edit = WeightEdit({"w": delta}, "test", {"scale": 1.0}, [REQUEST], {"w": "base"}, "fp", {"steps": [2]})
    return edit.save(tmp_path / "edit.safetensors")


def test_saved_edits_verify_their_tensors_and_metadata(tmp_path):
    """Flipped bytes in the tensor data, edited metadata, a swapped-in tensor, a NaN delta or a damaged
    header: each is an EditIntegrityError (a ValueError) naming the file, never a silent load."""
    delta = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    path = _saved_edit(tmp_path, delta)
    assert torch.equal(WeightEdit.load(path).deltas["w"], delta)
    good = path.read_bytes()
    assert issubclass(EditIntegrityError, ValueError)

    flipped = bytearray(good)
    flipped[-5] ^= 0x01  # the last bytes of the file are the tensor's data
    path.write_bytes(bytes(flipped))
    with pytest.raises(EditIntegrityError, match=f"{path}.*sha256"):
        WeightEdit.load(path)

    path.write_bytes(good)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    other = EditRequest("The Colosseum is located in the city of", "Colosseum", "Paris", "Rome")
    for changed in (
        {**meta, "requests": json.dumps([asdict(other)])},  # the edit passed off as another request's
        {**meta, "method": "rome"},
    ):
        save_file({"w": delta}, str(path), changed)
        with pytest.raises(EditIntegrityError, match=f"{path}.*metadata digest"):
            WeightEdit.load(path)
    save_file({"w": delta * 2}, str(path), meta)  # another tensor under intact metadata
    with pytest.raises(EditIntegrityError, match=f"{path}.*sha256"):
        WeightEdit.load(path)

    nan = delta.clone()
    nan[1, 2] = float("nan")
    path = _saved_edit(tmp_path, nan)  # digests that verify do not make a NaN delta acceptable
    with pytest.raises(EditIntegrityError, match=f"{path}.*non-finite"):
        WeightEdit.load(path)

    path.write_bytes(b"\xff" * 8 + good[8:])  # the header's length
    with pytest.raises(EditIntegrityError, match=f"{path}.*not a readable edit file"):
        WeightEdit.load(path)


def test_files_without_digests_load_but_must_be_finite(tmp_path, caplog):
    """Files saved before the digests existed load (a debug line says so); a non-finite one does not."""
    delta = torch.ones(2, 3)
    path = _saved_edit(tmp_path, delta)
    with safe_open(str(path), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k not in ("digest", "delta_hashes")}
    save_file({"w": delta}, str(path), meta)
    with caplog.at_level(logging.DEBUG, logger="attnedit.core.deltas"):
        assert WeightEdit.load(path).requests == [REQUEST]
    assert "before edit files carried digests" in caplog.text
    save_file({"w": delta * float("inf")}, str(path), meta)
    with pytest.raises(EditIntegrityError, match=f"{path}.*non-finite"):
        WeightEdit.load(path)
