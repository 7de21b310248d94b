"""IntAttn-Edit (issue 17): MEMIT's updates of the MLPs and of the attention output projections W_o,
mixed by alpha; statistics of several components in one corpus pass.

Tiny models of every family: alpha = 0 is MEMIT bit for bit, alpha = 1 touches only W_o, the W_o least
squares hits its target when its lambda vanishes, the edit reverts and reloads, alpha="trace" is
recorded; the CLI/API entry points and +sadr."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, make_tiny, tiny_settings
from typer.testing import CliRunner

import attnedit
from attnedit.cli.main import app
from attnedit.core.data import EditRequest, load_cases
from attnedit.core.deltas import WeightEdit, model_hash
from attnedit.core.sites import Site
from attnedit.editing import covariance
from attnedit.editing.base import EditRequestError
from attnedit.editing.covariance import StatsSpec, second_moments, second_moments_of
from attnedit.editing.methods.intattn import IntAttn, IntAttnParams
from attnedit.editing.methods.memit import Memit, MemitParams
from attnedit.editing.presets import PresetError
from attnedit.editing.registry import load_preset, make_editor, make_params
from attnedit.editing.sadr import SadrSettings, SadrTerm
from attnedit.editing.solvers import read_at_fact_token

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")


# MEMIT's settings of these tests (IntAttn-Edit's MLP side is MEMIT's)
MEMIT_SIDE = {"layers": [1, 2], "mom2_update_weight": 10.0}


def _params(corpus: str, **kw) -> IntAttnParams:
    return IntAttnParams(**tiny_settings(corpus, **{**MEMIT_SIDE, "attn_layers": [0, 1], "alpha": 0.4, **kw}))


def _logits(bundle, text: str = "The Eiffel Tower is located in the city of") -> torch.Tensor:
    ids = bundle.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return bundle.model(input_ids=ids).logits[0].float()


def _cases(n: int = 3):
    return load_cases("sample").cases[:n]


# --- statistics of several components in one pass ------------------------------------------------------


def test_two_missing_components_take_one_corpus_pass_with_the_separate_values(
    tiny_tokenizer, corpus, monkeypatch
):
    bundle = make_tiny("llama", tiny_tokenizer)
    spec = StatsSpec(corpus=corpus, samples=40)
    texts_read, forwards = [], []
    real_texts = covariance.corpus_texts

    def counted_texts(*args, **kwargs):
        texts_read.append(args)
        return real_texts(*args, **kwargs)

    monkeypatch.setattr(covariance, "corpus_texts", counted_texts)
    embed = bundle.adapter.module(bundle.model, "embed")
    hook = embed.register_forward_hook(lambda *a: forwards.append(1))
    both = second_moments_of(bundle, {"mlp_down": [1, 2], "attn_o": [0, 1]}, spec, progress=False)
    one_pass = len(forwards)
    assert len(texts_read) == 1 and one_pass > 0
    # the same statistics apart, from scratch (memory and disk caches gone)
    bundle.cache.clear()
    monkeypatch.setenv("ATTNEDIT_CACHE", str(covariance.cache_dir().parent / "apart"))
    forwards.clear()
    mlp = second_moments(bundle, "mlp_down", [1, 2], spec, progress=False)
    attn = second_moments(bundle, "attn_o", [0, 1], spec, progress=False)
    hook.remove()
    assert len(forwards) == 2 * one_pass and len(texts_read) == 3
    for layer in (1, 2):
        assert torch.equal(both["mlp_down"][layer], mlp[layer])  # bit-identical
    for layer in (0, 1):
        assert torch.equal(both["attn_o"][layer], attn[layer])
        width = bundle.adapter.n_heads * bundle.adapter.head_dim  # W_o's input: the heads concatenated
        assert attn[layer].shape == (width, width)
    # cached per (component, layer) as before: a later request of one of them reads the cache
    monkeypatch.setattr(covariance, "_accumulate", lambda *a, **k: pytest.fail("recomputed"))
    bundle.cache.clear()
    assert torch.equal(second_moments(bundle, "attn_o", [1], spec, progress=False)[1], attn[1])


# --- the edit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_is_memit_bit_for_bit(tiny_tokenizer, corpus, family):
    memit_bundle = make_tiny(family, tiny_tokenizer)
    memit = Memit(MemitParams(**tiny_settings(corpus, **MEMIT_SIDE))).apply(memit_bundle, _cases())
    bundle = make_tiny(family, tiny_tokenizer)
    applied = IntAttn(_params(corpus, alpha=0.0)).apply(bundle, _cases())
    assert set(applied.edit.deltas) == set(memit.edit.deltas)
    for name, delta in memit.edit.deltas.items():
        assert torch.equal(applied.edit.deltas[name], delta), name
    assert model_hash(bundle.model) == model_hash(memit_bundle.model)
    assert torch.equal(_logits(bundle), _logits(memit_bundle))
    info = applied.edit.info["intattn"]
    assert info["alpha"] == 0.0 and info["alpha_source"] == "fixed" and "attn_loop" not in info["seconds"]
    assert applied.edit.info["final_loss"] == memit.edit.info["final_loss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_one_changes_only_the_attention_output_weights(tiny_tokenizer, corpus, family):
    bundle = make_tiny(family, tiny_tokenizer)
    before = {name: p.detach().clone() for name, p in bundle.model.named_parameters()}
    applied = IntAttn(_params(corpus, alpha=1.0)).apply(bundle, _cases())
    w_o = {bundle.adapter.weight_name("attn_o", layer) for layer in (0, 1)}
    assert set(applied.edit.deltas) == w_o
    for name, param in bundle.model.named_parameters():
        assert torch.equal(param, before[name]) != (name in w_o), name
    info = applied.edit.info["intattn"]
    assert set(info["update_norms"]) == {"attn"} and "mlp_loop" not in info["seconds"]
    applied.revert()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_without_regularisation_w_o_moves_the_fact_token_value_by_the_residual(
    tiny_tokenizer, corpus, monkeypatch, family
):
    """One request, one attention layer, all of the update on W_o and lambda -> 0: the least squares
    solution hits its target, i.e. W_o's output at the fact token (mean over the templates, whose mean
    key is the key) moves by exactly z - current, the residual MEMIT asks of one layer."""
    bundle = make_tiny(family, tiny_tokenizer)
    seen = {}
    real = IntAttn.update_layers

    def spy(self, builder, bundle, requests, templates, targets, *rest):
        seen.update(templates=templates, targets=targets)
        return real(self, builder, bundle, requests, templates, targets, *rest)

    monkeypatch.setattr(IntAttn, "update_layers", spy)
    params = _params(corpus, layers=[2], attn_layers=[1], alpha=1.0, attn_mom2_update_weight=1e-4)
    case = _cases(1)
    read = [Site("attn_o", 1, "output"), Site("layer", 2, "output")]
    editor = IntAttn(params)
    # the templates are chosen inside apply: run once to learn them, then measure around a second run
    editor.apply(bundle, case).revert()
    request = case[0].request
    before = read_at_fact_token(bundle, [request], seen["templates"], read)
    applied = editor.apply(bundle, case)
    after = read_at_fact_token(bundle, [request], seen["templates"], read)
    moved = (after[read[0]] - before[read[0]]).mean(1)[0]
    wanted = seen["targets"][0] - before[read[1]][0, 0]
    assert wanted.norm() > 1e-3  # a real residual
    torch.testing.assert_close(moved, wanted, rtol=1e-3, atol=1e-4 * float(wanted.norm()))
    applied.revert()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_edit_reverts_exactly_and_reloads(tiny_tokenizer, corpus, tmp_path, family):
    bundle = make_tiny(family, tiny_tokenizer)
    original = model_hash(bundle.model)
    plain = _logits(bundle)
    applied = IntAttn(_params(corpus)).apply(bundle, _cases())
    edit = applied.edit
    names = {bundle.adapter.weight_name("mlp_down", layer) for layer in (1, 2)}
    names |= {bundle.adapter.weight_name("attn_o", layer) for layer in (0, 1)}
    assert set(edit.deltas) == names
    info = edit.info["intattn"]
    assert info["mlp_layers"] == [1, 2] and info["attn_layers"] == [0, 1]
    assert set(info["seconds"]) == {"stats", "targets", "mlp_loop", "attn_loop"}
    for family_norms, share in ((info["update_norms"]["mlp"], 0.6), (info["update_norms"]["attn"], 0.4)):
        assert family_norms["applied"] == pytest.approx(share * family_norms["computed"])
        assert family_norms["computed"] > 0
    edited = _logits(bundle)
    assert not torch.allclose(edited, plain)
    path = edit.save(tmp_path / "intattn.safetensors")
    applied.revert()
    assert model_hash(bundle.model) == original
    fresh = make_tiny(family, tiny_tokenizer)
    with WeightEdit.load(path).apply(fresh.model):
        torch.testing.assert_close(_logits(fresh), edited, rtol=0, atol=0)
    assert model_hash(fresh.model) == original


def test_the_edit_is_the_scaled_sum_of_the_two_independent_families(tiny_tokenizer, corpus):
    """Each family is computed from the unedited model: alpha = 0 gives D_mlp, alpha = 1 gives D_attn,
    and alpha = 0.25 gives 0.75 D_mlp and 0.25 D_attn of the very same updates."""
    bundle = make_tiny("qwen2", tiny_tokenizer)
    deltas = {}
    for alpha in (0.0, 1.0, 0.25):
        with IntAttn(_params(corpus, alpha=alpha)).apply(bundle, _cases()) as applied:
            deltas[alpha] = applied.edit.deltas
    for name, mixed in deltas[0.25].items():
        whole = deltas[0.0][name] if name in deltas[0.0] else deltas[1.0][name]
        share = 0.75 if name in deltas[0.0] else 0.25
        torch.testing.assert_close(mixed, share * whole, rtol=1e-5, atol=1e-7)


def test_traced_alpha_is_a_share_recorded_with_its_effects(tiny_tokenizer, corpus):
    bundle = make_tiny("llama", tiny_tokenizer)
    applied = IntAttn(_params(corpus, alpha="trace", trace_cases=2)).apply(bundle, _cases(3))
    info = applied.edit.info["intattn"]
    assert info["alpha_source"] == "trace" and 0.0 <= info["alpha"] <= 1.0
    trace = info["trace"]
    assert trace["cases"] == 2 and len(trace["attn_effects"]) == 2 and len(trace["mlp_effects"]) == 2
    attn, mlp = trace["attn_total"], trace["mlp_total"]
    assert attn >= 0 and mlp >= 0
    assert info["alpha"] == pytest.approx(attn / (attn + mlp) if attn + mlp else 0.0)
    assert info["seconds"]["trace"] > 0
    applied.revert()


@pytest.mark.parametrize(
    ("alpha", "families"),
    [
        (0.0, {"mlp_down"}),
        (0.4, {"mlp_down", "attn_o"}),
        (1.0, {"attn_o"}),
        ("trace", {"mlp_down", "attn_o"}),
    ],
)
def test_prepare_computes_the_statistics_the_edits_read(tiny_tokenizer, corpus, alpha, families, monkeypatch):
    bundle = make_tiny("llama", tiny_tokenizer)
    editor = IntAttn(_params(corpus, alpha=alpha, trace_cases=1))
    editor.prepare(bundle, _cases(2))
    # alpha=trace is known per batch only: both families are prepared
    assert {component for component, *_ in covariance.cache_entries(bundle)} == families
    monkeypatch.setattr(covariance, "_accumulate", lambda *a, **k: pytest.fail("statistics recomputed"))
    editor.apply(bundle, _cases(2)).revert()


def test_settings_are_checked(tiny_tokenizer, corpus):
    bundle = make_tiny("llama", tiny_tokenizer)
    with pytest.raises(EditRequestError, match="above the last MLP layer"):
        IntAttn(_params(corpus, layers=[0, 1], attn_layers=[2])).apply(bundle, _cases(1))
    preset = load_preset("intattn", "smollm2-135m")
    assert preset["method"] == "intattn" and "bench/intattn_trace.py" in preset["source"]
    params = make_params("intattn", preset, {"alpha": "trace", "attn_layers": "1-2"})
    assert params.alpha == "trace" and params.attn_layers == [1, 2]
    assert make_params("intattn", preset, {"alpha": "0.5"}).alpha == 0.5
    # W_o's lambda defaults to the MLP's (the provisional SmolLM2 preset leaves it to the MLP's)
    assert make_params("intattn", preset, {"mom2_update_weight": "7"}).attn_mom2_update_weight == 7.0
    lam = preset["params"]["mom2_update_weight"]
    assert make_params("intattn", preset).attn_mom2_update_weight == lam
    for bad, needle in (
        ({"alpha": "1.5"}, "must be <= 1"),
        ({"alpha": "-0.1"}, "must be >= 0"),
        ({"alpha": "traced"}, "or one of"),
        ({"trace_cases": "0"}, "must be >= 1"),
        ({"attn_layers": []}, "non-empty"),
        ({"alpha": True}, "expected a number"),
        ({"attn_mom2_update_weight": "-1"}, "must be >= 0"),
    ):
        with pytest.raises(PresetError, match=needle):
            make_params("intattn", preset, bad)
    for model, alpha in (("qwen2.5-7b", 0.3), ("mistral-7b", 0.1), ("Qwen/Qwen2.5-7B-Instruct", 0.3)):
        p = make_params("intattn", load_preset("intattn", model))
        assert (p.alpha, p.layers, p.attn_layers) == (alpha, [4, 5, 6, 7, 8], [2, 3, 4])
        assert p.mom2_update_weight == p.attn_mom2_update_weight == 15000.0


# --- entry points ---------------------------------------------------------------------------------------


def test_intattn_with_sadr_regularises_the_target(tiny_tokenizer, corpus):
    bundle = make_tiny("llama", tiny_tokenizer)
    term = SadrTerm(SadrSettings(gamma=0.5, heads="all"))
    applied = IntAttn(_params(corpus), terms=[term]).apply(bundle, _cases(2))
    assert "sadr" in applied.edit.info["loss_parts"][0]
    applied.revert()
    editor = make_editor("intattn+sadr", "smollm2-135m", overrides={"alpha": "0.3"})
    assert isinstance(editor, IntAttn) and editor.terms and editor.params.alpha == 0.3
    assert editor.name == "intattn+sadr" and editor.params.attn_layers == [1, 2, 3]


def test_intattn_from_the_api_and_the_cli(tmp_path, tiny_dir, corpus, monkeypatch):
    root = tmp_path / "presets"
    (root / "intattn").mkdir(parents=True)
    params = {"layers": [1, 2], "attn_layers": [1], "alpha": 0.5, "stats_corpus": corpus, "stats_samples": 40}
    params |= {"templates": [[4, 2]], "steps": 3}
    preset = {"method": "intattn", "model": tiny_dir.name, "source": "test", "params": params}
    (root / "intattn" / "tiny.json").write_text(json.dumps(preset))
    monkeypatch.setenv("ATTNEDIT_PRESETS", str(root))

    bundle = attnedit.load_model(str(tiny_dir))
    before = model_hash(bundle.model)
    request = EditRequest("{} is in", "Eiffel Tower", "Rome", "Paris")
    other = EditRequest("{} was born in", "Marie Curie", "Oslo", "Warsaw")
    with attnedit.edit(bundle, "intattn", [request, other], alpha=0.2) as applied:
        assert applied.edit.method == "intattn" and applied.edit.info["intattn"]["alpha"] == 0.2
        assert model_hash(bundle.model) != before
    assert model_hash(bundle.model) == before

    # the statistics of both families precomputed in one command
    result = CliRunner().invoke(app, ["stats", "--method", "intattn", "--model", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    assert "layer 2: E[kk^T]" in result.output and "attn_o layer 1: E[kk^T]" in result.output

    out = tmp_path / "run"
    args = ["eval", "sample", "--model", str(tiny_dir), "--out", str(out), "--method", "intattn"]
    args += ["--mode", "batch", "--batch-size", "2", "--limit", "2", "--no-fluency", "--save-edits"]
    args += ["-p", "alpha=trace", "-p", "trace_cases=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "intattn" and manifest["hyperparameters"]["alpha"] == "trace"
    (path,) = (out / "edits").glob("*.safetensors")  # one batch of two cases, one edit
    info = WeightEdit.load(path).info["intattn"]
    assert info["alpha_source"] == "trace" and info["trace"]["cases"] == 1 and 0 <= info["alpha"] <= 1
