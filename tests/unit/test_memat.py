"""MEMAT (issue 16): head features, head classifiers, corrections folded into biases, the whole edit.

Tiny models of every family; the classifier stage on planted features; the folded bias against the
corrections added by a hook; the edit's revert, save/load and the CLI/API entry points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FAMILIES, FIXTURES, TINY_MEMAT, make_tiny, tiny_settings
from typer.testing import CliRunner

import attnedit
from attnedit.cli.main import app
from attnedit.core.data import EditCase, EditRequest, Probe, load_cases
from attnedit.core.deltas import EditBuilder, WeightEdit, model_hash
from attnedit.core.interventions import attention_probabilities, head_outputs, qkv_heads
from attnedit.editing.heads import fold_corrections, head_features, rank_heads, sentence_ids, split_records
from attnedit.editing.methods.memat import Memat, MematParams
from attnedit.editing.presets import PresetError
from attnedit.editing.registry import load_preset, make_editor, make_params
from attnedit.editing.sadr import SadrSettings, SadrTerm
from attnedit.editing.templates import LANGUAGES

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")


def _params(corpus: str, **kw) -> MematParams:
    return MematParams(**tiny_settings(corpus, **{**TINY_MEMAT, **kw}))


def _logits(bundle, text: str = "The Eiffel Tower is located in the city of") -> torch.Tensor:
    ids = bundle.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return bundle.model(input_ids=ids).logits[0].float()


# --- step 2: head features and classifiers -------------------------------------------------------------


def test_the_classifiers_find_a_planted_signal_in_one_head():
    """Noise everywhere but head (2, 1), whose features carry the label: it ranks first, validated on
    held-out records, every accuracy kept; a record's two sentences stay on one side of the split."""
    gen = torch.Generator().manual_seed(0)
    n_records, n_layers, n_heads, dim = 60, 3, 4, 8
    labels = np.tile([1, 0], n_records)
    records = np.repeat(np.arange(n_records), 2)
    features = torch.randn(2 * n_records, n_layers, n_heads, dim, generator=gen)
    features[:, 2, 1, 0] += torch.tensor(labels * 6.0 - 3.0, dtype=torch.float32)
    ranking = rank_heads(features, labels, records, train_share=0.7, seed=123)
    assert ranking.order[0] == (2, 1) and ranking.top(1) == [(2, 1)]
    assert ranking.val_accuracy[2, 1] == 1.0
    others = np.delete(ranking.val_accuracy.ravel(), 2 * n_heads + 1)
    assert others.max() < 0.85  # noise heads: near chance
    assert ranking.val_accuracy.shape == (n_layers, n_heads)
    assert (ranking.n_train, ranking.n_val, ranking.validated_on) == (42, 18, "held-out records")
    train, val = split_records(n_records, 0.7, 123)
    assert not set(train) & set(val) and len(train) + len(val) == n_records
    assert (split_records(n_records, 0.7, 123)[0] == train).all()  # seeded


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_gqa_head_features_are_the_query_heads_outputs(tiny_tokenizer, family):
    """Under grouped-query attention the feature of query head h is its attention row times the values of
    its key/value head (h // group), computed here directly from the probabilities and the value heads."""
    bundle = make_tiny(family, tiny_tokenizer)
    adapter = bundle.adapter
    assert adapter.n_kv_heads < adapter.n_heads
    ids = sentence_ids(bundle, "The Eiffel Tower is located in the city of", "Paris")
    features = head_features(bundle, [ids, ids[:-2]])
    group = adapter.kv_group_size
    layers = list(range(adapter.n_layers))
    x = torch.tensor([ids])
    with (
        attention_probabilities(bundle.model, adapter, layers) as probs,
        qkv_heads(bundle.model, adapter, "attn_v", layers) as values,
        torch.no_grad(),
    ):
        bundle.model(input_ids=x)
        for layer in layers:
            p = probs[layer][0, :, -1]  # [heads, keys]
            v = values[layer][0]  # [keys, kv heads, head_dim]
            direct = torch.stack([p[h] @ v[:, h // group] for h in range(adapter.n_heads)])
            torch.testing.assert_close(features[0, layer], direct, rtol=1e-4, atol=1e-5)
    # the shorter sentence in the same batch is read at its own last token
    assert not torch.equal(features[0], features[1])
    alone = head_features(bundle, [ids[:-2]])
    torch.testing.assert_close(features[1], alone[0], rtol=1e-4, atol=1e-5)


# --- step 3: corrections and their fold ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_folded_bias_gives_the_logits_of_the_corrections_added_at_every_position(tiny_tokenizer, family):
    bundle = make_tiny(family, tiny_tokenizer)
    d = bundle.adapter.head_dim
    heads = [(0, 1), (2, 0), (2, 3)]  # two heads in layer 2: their changes add up
    delta = torch.randn(len(heads), d, generator=torch.Generator().manual_seed(1))

    def add(x: torch.Tensor, layer: int) -> torch.Tensor:
        x = x.clone()
        for i, (lay, head) in enumerate(heads):
            if lay == layer:
                x[:, :, head] += delta[i]
        return x

    with head_outputs(bundle.model, bundle.adapter, [0, 2], replace=add):
        hooked = _logits(bundle)
    plain = _logits(bundle)
    with EditBuilder(bundle.model) as builder:
        for layer, change in fold_corrections(bundle, heads, delta).items():
            builder.add(f"{bundle.adapter.module_name('attn_o', layer)}.bias", change)
    applied = builder.finish({"method": "t", "hyperparameters": {}, "requests": []})
    folded = _logits(bundle)
    torch.testing.assert_close(folded, hooked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(folded, plain, atol=1e-3)
    applied.revert()
    torch.testing.assert_close(_logits(bundle), plain, rtol=0, atol=0)


def test_heads_of_one_layer_sum_and_overwrite_keeps_the_last(tiny_tokenizer):
    bundle = make_tiny("llama", tiny_tokenizer)
    heads = [(1, 0), (1, 4), (2, 2)]
    delta = torch.randn(3, bundle.adapter.head_dim, generator=torch.Generator().manual_seed(2))
    one = [fold_corrections(bundle, [h], delta[i : i + 1]) for i, h in enumerate(heads)]
    summed = fold_corrections(bundle, heads, delta)
    torch.testing.assert_close(summed[1], one[0][1] + one[1][1])
    torch.testing.assert_close(summed[2], one[2][2])
    overwritten = fold_corrections(bundle, heads, delta, "overwrite")
    torch.testing.assert_close(overwritten[1], one[1][1])  # the last of layer 1's heads wins
    with pytest.raises(ValueError, match="bias_fold"):
        fold_corrections(bundle, heads, delta, "max")


# --- the whole edit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_memat_edit_reverts_exactly_and_reloads(tiny_tokenizer, corpus, tmp_path, family):
    """MLP deltas plus biases (created where the family has none): one WeightEdit; revert is bit-exact with
    the created biases gone; a saved edit applied to a fresh model reproduces the edited logits."""
    bundle = make_tiny(family, tiny_tokenizer)
    original = model_hash(bundle.model)
    cases = load_cases("sample").cases[:6]
    applied = Memat(_params(corpus)).apply(bundle, cases)
    edit = applied.edit
    info = edit.info["memat"]
    o_bias = {f"{bundle.adapter.module_name('attn_o', layer)}.bias" for layer, _ in info["heads"]}
    assert o_bias <= set(edit.deltas) and len(info["heads"]) == 3
    assert any(name.endswith(".weight") for name in edit.deltas)  # MEMIT's MLP part
    assert np.array(info["head_val_accuracy"]).shape == (bundle.adapter.n_layers, bundle.adapter.n_heads)
    assert set(info["seconds"]) == {"memit", "activations", "classifiers", "corrections"}
    assert info["correction_steps"] == 4 and max(info["correction_norms"]) <= 0.75 + 1e-4
    edited = _logits(bundle)
    path = edit.save(tmp_path / "memat.safetensors")
    applied.revert()
    assert model_hash(bundle.model) == original
    if family in ("llama", "qwen2", "mistral", "gptj"):  # output projections without a bias: created
        assert edit.created and all(
            bundle.model.get_submodule(name.rpartition(".")[0]).bias is None for name in edit.created
        )
    fresh = make_tiny(family, tiny_tokenizer)
    with WeightEdit.load(path).apply(fresh.model):
        torch.testing.assert_close(_logits(fresh), edited, rtol=0, atol=0)
    assert model_hash(fresh.model) == original


def test_memat_with_sadr_regularises_both_optimisations(tiny_tokenizer, corpus):
    bundle = make_tiny("llama", tiny_tokenizer)
    term = SadrTerm(SadrSettings(gamma=0.5, heads="all"))
    applied = Memat(_params(corpus), terms=[term]).apply(bundle, load_cases("sample").cases[:4])
    assert "sadr" in applied.edit.info["loss_parts"][0]  # MEMIT's target optimisation
    assert "sadr" in applied.edit.info["memat"]["correction_loss_parts"]  # the corrections
    applied.revert()


def test_memat_with_sadr_over_several_correction_minibatches(tiny_tokenizer, corpus):
    """The corrections cycle through minibatches (here 2 of 2 requests): SADR's reference of each is its
    pass with the corrections still zero, taken before the first step; with lr 0 nothing moves, so the
    SADR term stays exactly 0 at every step of every minibatch."""
    bundle = make_tiny("llama", tiny_tokenizer)
    term = SadrTerm(SadrSettings(gamma=0.5, heads="all"))
    params = _params(corpus, correction_batch=2, correction_min_steps=4)
    params = params.model_copy(update={"correction_lr": 0.0})  # below the model's range, on purpose
    applied = Memat(params, terms=[term]).apply(bundle, load_cases("sample").cases[:4])
    memat = applied.edit.info["memat"]
    assert memat["correction_steps"] >= 4
    assert memat["correction_loss_parts"]["sadr"] == 0.0
    applied.revert()


def test_memat_settings_are_checked(tiny_tokenizer, corpus):
    bundle = make_tiny("llama", tiny_tokenizer)
    with pytest.raises(ValueError, match="heads=99"):
        Memat(_params(corpus, heads=99)).apply(bundle, load_cases("sample").cases[:2])
    preset = load_preset("memat", "smollm2-135m")
    assert preset["method"] == "memit"  # MEMAT's first step takes MEMIT's preset
    assert make_params("memat", preset).heads == 16
    for bad, needle in (
        ({"classifier_split": "1"}, "must be < 1"),
        ({"heads": "0"}, "must be >= 1"),
        ({"bias_fold": "max"}, "expected one of"),
        ({"classifier_records": "some"}, "expected one of"),
    ):
        with pytest.raises(PresetError, match=needle):
            make_params("memat", preset, bad)


def test_one_case_trains_on_its_own_records_and_says_so(tiny_tokenizer, corpus, caplog):
    """A batch of one: nothing to hold out; the accuracies are training accuracies and the edit says so."""
    bundle = make_tiny("llama", tiny_tokenizer)
    case = EditCase("e", EditRequest("{} is in", "Eiffel Tower", "Rome", "Paris"), (Probe("x", "Rome"),))
    applied = Memat(_params(corpus)).apply(bundle, [case])
    assert applied.edit.info["memat"]["validated_on"] == "training records"
    assert "training accuracies" in caplog.text
    applied.revert()


def test_memat_from_the_cli_and_the_api(tmp_path, tiny_tokenizer, tiny_dir, corpus, monkeypatch):
    root = tmp_path / "presets"
    (root / "memit").mkdir(parents=True)
    params = {k: v for k, v in vars(_params(corpus)).items() if k in ("layers", "stats_corpus", "templates")}
    preset = {"method": "memit", "model": tiny_dir.name, "source": "test", "params": {**params, "steps": 3}}
    (root / "memit" / "tiny.json").write_text(json.dumps(preset))
    monkeypatch.setenv("ATTNEDIT_PRESETS", str(root))
    out = tmp_path / "run"
    args = ["eval", "sample", "--model", str(tiny_dir), "--out", str(out), "--method", "memat"]
    args += ["--mode", "batch", "--batch-size", "4", "--limit", "4", "--no-fluency"]
    args += ["-p", "heads=2", "-p", "correction_min_steps=2", "-p", "stats_samples=40"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ES"]["n"] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "memat" and manifest["hyperparameters"]["heads"] == 2

    bundle = attnedit.load_model(str(tiny_dir))
    before = model_hash(bundle.model)
    request = EditRequest("{} is in", "Eiffel Tower", "Rome", "Paris")
    other = EditRequest("{} was born in", "Marie Curie", "Oslo", "Warsaw")
    with attnedit.edit(bundle, "memat", [request, other], heads=2, correction_min_steps=2) as applied:
        assert applied.edit.method == "memat" and model_hash(bundle.model) != before
    assert model_hash(bundle.model) == before


def test_make_editor_builds_memat_and_memat_sadr():
    editor = make_editor("memat+sadr", "smollm2-135m", overrides={"heads": "8"})
    assert isinstance(editor, Memat) and editor.params.heads == 8 and editor.terms
    assert editor.params.layers == load_preset("memit", "smollm2-135m")["params"]["layers"]


def test_cross_lingual_memat_edits_in_one_language_corrects_in_another(tiny_tokenizer, corpus):
    """BMIKE-53 records: MEMIT on the English requests, classifiers and corrections on the French prompts
    (French context-template seeds and KL prompt), the suite scored in both languages."""
    from attnedit.evaluation.evaluator import EvalConfig, Evaluator

    bundle = make_tiny("llama", tiny_tokenizer)
    cases = load_cases(FIXTURES / "bmike53_counterfact_en_fr.json").cases[:6]
    assert {c.language for c in cases} == {"en"} and all("fr" in c.translations for c in cases)
    applied = Memat(_params(corpus, head_language="fr")).apply(bundle, cases)
    info = applied.edit.info["memat"]
    assert info["head_language"] == "fr"
    assert applied.edit.requests == [c.request for c in cases]  # the edit itself is the English one
    french = [t for t in bundle.cache["context_templates"].values() if len(t) > 1]
    seeds = LANGUAGES["fr"].seed_words
    assert any(all(any(t.startswith(w) for w in seeds) for t in ts[1:]) for ts in french)
    record = Evaluator(bundle, EvalConfig(fluency=False)).score(cases[0])
    assert "ES" in record["comparisons"] and "ES@fr" in record["comparisons"]
    applied.revert()
    with pytest.raises(ValueError, match="de"):
        Memat(_params(corpus, head_language="de")).apply(bundle, cases)


def test_prepare_makes_the_templates_of_both_languages_and_the_statistics(tiny_tokenizer, corpus):
    """A Ray run's one-time work for MEMAT with French heads: English and French templates, MEMIT's
    statistics; the edit then adds nothing to those caches."""
    from attnedit.editing import covariance, templates

    bundle = make_tiny("llama", tiny_tokenizer)
    cases = load_cases(FIXTURES / "bmike53_counterfact_en_fr.json").cases[:4]
    editor = Memat(_params(corpus, head_language="fr"))
    editor.prepare(bundle, cases)
    done = set(templates.cache_entries(bundle)), set(covariance.cache_entries(bundle))
    assert {spec.seed_words for spec in done[0]} == {LANGUAGES["en"].seed_words, LANGUAGES["fr"].seed_words}
    assert {(c, layer) for c, layer, *_ in done[1]} == {("mlp_down", layer) for layer in editor.params.layers}
    editor.apply(bundle, cases).revert()
    assert (set(templates.cache_entries(bundle)), set(covariance.cache_entries(bundle))) == done


def test_sequential_memat_edits_stack_and_resume(tmp_path, tiny_dir, corpus, monkeypatch):
    """Sequential mode: the second edit adds to the bias the first one created; an interrupted run
    re-applies both saved edits (the second's base is the first's bias) and scores the same."""
    from attnedit.evaluation.evaluator import EvalConfig
    from attnedit.runs.config import RunConfig
    from attnedit.runs.rundir import RESULTS, read_results
    from attnedit.runs.runner import run

    preset = load_preset("memit", "smollm2-135m")
    preset = {**preset, "params": {**preset["params"], "layers": [0, 1]}}
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(preset))
    params = {"stats_corpus": corpus, "stats_samples": "40", "steps": "3", "templates": "[[4, 2]]"}
    # every head corrected: each layer's bias is created by the first edit and changed by the second
    params |= {"heads": "18", "correction_min_steps": "2", "classifier_records": "all"}

    def config(out):
        return RunConfig(
            data="sample",
            out=str(out),
            model=str(tiny_dir),
            method="memat",
            preset=str(path),
            params=params,
            mode="sequential",
            batch_size=2,
            limit=4,
            eval=EvalConfig(fluency=False),
        )

    first = tmp_path / "first"
    run(config(first), progress=False)
    edits = sorted((first / "edits").iterdir())
    assert [e.name for e in edits] == ["00000.safetensors", "00001.safetensors"]
    one, two = (WeightEdit.load(e) for e in edits)
    shared = set(one.created) & set(two.deltas)
    assert len(shared) == 3 and not two.created
    assert all(two.base_hashes[name] != "absent" for name in shared)  # the second adds to the first's bias
    # an interrupted run: the records gone, the saved edits re-applied, the same scores
    (first / RESULTS).write_text("")

    def no_recompute(self, bundle, cases):
        raise AssertionError("the saved sequential edits must be re-applied, not recomputed")

    with monkeypatch.context() as patch:
        patch.setattr(Memat, "apply", no_recompute)
        run(config(first), progress=False)
    again = tmp_path / "again"
    run(config(again), progress=False)
    for a, b in zip(read_results(first / RESULTS), read_results(again / RESULTS), strict=True):
        assert a["comparisons"] == b["comparisons"]


def test_corrections_cut_into_length_chunks_equal_one_padded_batch(tiny_tokenizer, monkeypatch):
    """Rows of similar length are run together (less padding); the loss, hence the corrections, are the
    same as with the whole minibatch in one padded batch."""
    from attnedit.editing import heads as heads_module

    bundle = make_tiny("llama", tiny_tokenizer)
    cases = load_cases("sample").cases[:6]
    requests = [
        heads_module.CorrectionRequest(c.request.text, c.request.target_new, c.request.subject, "{} is a")
        for c in cases
    ]
    templates = ["{}", "A short one. {}", " ".join(["a much longer context template"] * 8) + ". {}"]
    settings = heads_module.CorrectionSettings(min_steps=3, batch_requests=4, lr=0.05)
    args = (bundle, requests, templates, [(1, 0), (2, 3)], torch.ones(2), settings)
    chunked = heads_module.train_corrections(*args)
    cuts = []
    real = heads_module.length_batches
    monkeypatch.setattr(heads_module, "length_batches", lambda *a, **k: cuts.append(real(*a, **k)) or [a[1]])
    whole = heads_module.train_corrections(*args)
    assert any(len(c) > 1 for c in cuts)  # the chunked run did cut
    torch.testing.assert_close(chunked.delta, whole.delta, rtol=1e-4, atol=1e-6)
    assert chunked.final_loss == pytest.approx(whole.final_loss, rel=1e-5)
