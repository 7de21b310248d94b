"""SADR: the term against a direct computation from full attention matrices; gamma 0; batching; wiring."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
from helpers import CORPUS, FAMILIES, make_tiny

from attnedit.core.data import EditCase, EditRequest, Probe
from attnedit.core.interventions import Trace, attention_implementation
from attnedit.core.sites import Site
from attnedit.core.tokens import encode_target, locate_subject
from attnedit.editing.methods.ft import FineTune, FTParams
from attnedit.editing.methods.rome import Rome, RomeParams
from attnedit.editing.optimise import TargetSettings, optimise_targets
from attnedit.editing.presets import PresetError
from attnedit.editing.registry import make_editor
from attnedit.editing.rows import Row, build_rows
from attnedit.editing.sadr import SadrSettings, SadrTerm, sadr_settings

TEMPLATES = ["{}", "The city. {}", "You know that. {}"]
REQUESTS = [
    EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    EditRequest("Danielle Darrieux speaks the language", "Danielle Darrieux", "English", "French"),
]
# large steps so that attention drifts visibly on a random tiny model
SETTINGS = TargetSettings(lr=2.0, steps=3, weight_decay=0.0, clamp_norm_factor=1e3, early_stop_loss=0.0)


pytestmark = pytest.mark.usefixtures("isolated_cache")


def _direct_sadr(bundle, rows, first_changed, heads, edited):
    """Equation 2 by hand: full attention matrices from plain forward passes, loops over layers/heads.

    ``rows``: the optimisation prompts (``Row``s; ``subject`` = key index of the subject's last token);
    ``edited(row)``: a context manager under which the model runs as edited.
    """
    model, adapter = bundle.model, bundle.adapter
    total, selected = 0.0, 0
    for row, subject in rows:
        ids = torch.tensor([row.ids])
        with attention_implementation(model, "eager"), torch.no_grad():
            ref = model(input_ids=ids, output_attentions=True).attentions
            with edited(row):
                cur = model(input_ids=ids, output_attentions=True).attentions
        q = row.n_prompt - 1
        for lay in range(adapter.n_layers):
            threshold = max(float(ref[lay][0, h, q, subject]) for h in range(adapter.n_heads))
            for h in range(adapter.n_heads):
                if heads == "increased":
                    threshold = float(ref[lay][0, h, q, subject])
                p, r = ref[lay][0, h, q].double(), cur[lay][0, h, q].double()
                if lay < first_changed:  # below the change nothing drifts; the term does not record it
                    assert torch.equal(p, r)
                elif heads == "all" or float(cur[lay][0, h, q, subject]) > threshold:
                    keep = p > 0
                    total += float((p[keep] * (p[keep].log() - r[keep].log())).sum())
                    selected += 1
    return total / len(rows), selected / len(rows)


def _injected(bundle, component, layer, delta):
    name = bundle.adapter.module_name(component, layer)

    def edited(row):
        def add(y, _name):
            y = y.clone()
            y[0, row.fact] += delta
            return y

        return Trace(bundle.model, [name], retain_output=False, edit_output=add)

    return edited


def _check(parts, expected, n_selected, n_layers, gamma, nonvacuous=True):
    assert parts["sadr.heads_selected"] == pytest.approx(n_selected, abs=1e-6)
    if nonvacuous:
        assert n_selected > 0 and expected > 1e-6  # the check is not vacuous
    assert parts["sadr.unweighted"] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert parts["sadr"] == pytest.approx(gamma * expected, rel=1e-3, abs=1e-7)
    by_layer = parts["sadr.kl_by_layer"]
    assert len(by_layer) == n_layers and by_layer[0] == 0.0  # layer 0 holds the change
    assert sum(by_layer) == pytest.approx(parts["sadr.kl_all_heads"], rel=1e-5, abs=1e-9)
    assert sum(parts["sadr.selected_by_layer"]) == pytest.approx(n_selected, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)  # Llama, Qwen2, Mistral: grouped-query attention
@pytest.mark.parametrize("heads", ["selective", "increased", "all"])
def test_term_matches_direct_computation_from_full_attention(tiny_tokenizer, family, heads):
    bundle = make_tiny(family, tiny_tokenizer)
    term = SadrTerm(SadrSettings(gamma=0.5, heads=heads))
    result = optimise_targets(bundle, REQUESTS[:1], TEMPLATES, [Site("mlp", 0)], SETTINGS, [term])
    assert result.steps == [SETTINGS.steps - 1]
    delta = result.delta[Site("mlp", 0)][0]
    rows = [(row, row.fact) for row in build_rows(bundle, REQUESTS[:1], TEMPLATES) if not row.kl]
    expected, n_selected = _direct_sadr(bundle, rows, 1, heads, _injected(bundle, "mlp", 0, delta))
    # (no head of the tiny NeoX over-focuses: none is selected)
    nonvacuous = family != "gpt_neox" or heads != "selective"
    _check(result.loss_parts[0], expected, n_selected, bundle.adapter.n_layers, 0.5, nonvacuous)


# the paper's selective rule picks no head in some tiny families (GPT-J, NeoX), where it compares zeros; the
# looser "increased" rule selects heads in every family, so each family gets a cell that is not vacuous
OTHER_RULES = ("selective", "increased")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads", OTHER_RULES)
@pytest.mark.parametrize("component", ["attn", "layer"])  # PMET's and MEMIT's injections
def test_term_matches_direct_computation_for_other_injections(tiny_tokenizer, component, heads, family):
    bundle = make_tiny(family, tiny_tokenizer)
    inj = Site(component, 0)
    term = SadrTerm(SadrSettings(gamma=0.5, heads=heads))
    result = optimise_targets(bundle, REQUESTS[:1], TEMPLATES, [inj], SETTINGS, [term])
    rows = [(row, row.fact) for row in build_rows(bundle, REQUESTS[:1], TEMPLATES) if not row.kl]
    edited = _injected(bundle, component, 0, result.delta[inj][0])
    expected, n_selected = _direct_sadr(bundle, rows, 1, heads, edited)
    _check(result.loss_parts[0], expected, n_selected, bundle.adapter.n_layers, 0.5, heads != "selective")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads", OTHER_RULES)
def test_fine_tuning_term_matches_direct_computation(tiny_tokenizer, heads, family):
    """FT: the whole prompt is recomputed (no prefix cache); the subject's last token is a prompt index."""
    bundle = make_tiny(family, tiny_tokenizer)
    case = EditCase("t", REQUESTS[0], rewrite=(Probe(REQUESTS[0].prompt, "Rome"),))
    ft = FineTune(FTParams(layers=[0], lr=0.05, steps=4, norm_constraint=1.0, early_stop_loss=0.0))
    ft.terms = [SadrTerm(SadrSettings(gamma=1.0, heads=heads))]
    applied = ft.apply(bundle, [case])
    try:
        span = locate_subject(bundle.tokenizer, REQUESTS[0].prompt, REQUESTS[0].subject)
        target = encode_target(bundle.tokenizer, span.text, "Rome", span.input_ids)
        row = Row(0, tuple(span.input_ids) + tuple(target[:-1]), 0, len(span.input_ids), tuple(target), 0)
        # the reference is the unedited model: undo the edit for it, redo it for the current rows
        originals = {k: v.clone() for k, v in applied.originals.items()}
        edited_weights = {k: applied._params[k].detach().clone() for k in originals}

        @contextlib.contextmanager
        def edited(_row):
            for k in originals:
                applied._params[k].data.copy_(edited_weights[k])
            try:
                yield
            finally:
                for k in originals:
                    applied._params[k].data.copy_(originals[k])

        for k in originals:
            applied._params[k].data.copy_(originals[k])
        expected, n_selected = _direct_sadr(bundle, [(row, span.last_token)], 1, heads, edited)
        for k in originals:
            applied._params[k].data.copy_(edited_weights[k])
    finally:
        applied.revert()
    parts = applied.edit.info["loss_parts"][0]
    _check(parts, expected, n_selected, bundle.adapter.n_layers, 1.0, heads != "selective")


def test_gamma_zero_reproduces_the_plain_editor_exactly(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3))
    bundle = make_tiny("llama", tiny_tokenizer)
    bundle.model.set_attn_implementation("eager")  # the same kernel in both runs
    params = RomeParams(layers=[1], stats_corpus=str(corpus), stats_samples=50, templates=[[4, 2]], steps=6)
    case = EditCase("t", REQUESTS[0], rewrite=(Probe(REQUESTS[0].prompt, "Rome"),))
    plain = Rome(params).apply(bundle, [case])
    plain_deltas = {k: v.clone() for k, v in plain.edit.deltas.items()}
    plain.revert()
    sadr = Rome(params, terms=[SadrTerm(SadrSettings(gamma=0.0))]).apply(bundle, [case])
    sadr.revert()
    assert sadr.edit.info["loss_parts"][0]["sadr.heads_selected"] >= 0
    for name, delta in plain_deltas.items():
        assert torch.equal(delta, sadr.edit.deltas[name])
    assert sadr.edit.info["steps"] == plain.edit.info["steps"]


def test_batched_requests_keep_their_own_reference(tiny_tokenizer):
    """MEMIT batch mode: the term over two requests equals two separate optimisations."""
    bundle = make_tiny("llama", tiny_tokenizer)
    inj = [Site("layer", 0)]
    term = SadrTerm(SadrSettings(gamma=1.0))
    together = optimise_targets(bundle, REQUESTS, TEMPLATES, inj, SETTINGS, [term])
    grouped = optimise_targets(bundle, REQUESTS, TEMPLATES, inj, replace(SETTINGS, max_rows=4), [term])
    for i, request in enumerate(REQUESTS):
        alone = optimise_targets(bundle, [request], TEMPLATES, inj, SETTINGS, [term])
        torch.testing.assert_close(together.delta[inj[0]][i], alone.delta[inj[0]][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grouped.delta[inj[0]][i], alone.delta[inj[0]][0], atol=1e-4, rtol=1e-4)
        assert together.loss_parts[i]["sadr"] == pytest.approx(
            alone.loss_parts[0]["sadr"], rel=1e-3, abs=1e-6
        )


def test_sequential_edits_take_the_model_before_the_current_edit_as_reference(tiny_tokenizer):
    """Sequential editing: the same term, reused for the next edit, takes its reference from the model
    with the earlier edits in place (not from the unedited model, not from the previous edit's run)."""
    bundle = make_tiny("llama", tiny_tokenizer)
    term = SadrTerm(SadrSettings(gamma=0.5, heads="all"))
    inj = Site("mlp", 0)
    optimise_targets(bundle, REQUESTS[:1], TEMPLATES, [inj], SETTINGS, [term])
    before = term.last_reference.clone()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an earlier edit in place: every layer's attention changes
        for param in bundle.model.model.layers[0].parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    result = optimise_targets(bundle, REQUESTS[:1], TEMPLATES, [inj], SETTINGS, [term])
    assert not torch.allclose(term.last_reference, before, atol=1e-4)
    rows = [(row, row.fact) for row in build_rows(bundle, REQUESTS[:1], TEMPLATES) if not row.kl]
    edited = _injected(bundle, "mlp", 0, result.delta[inj][0])
    expected, n_selected = _direct_sadr(bundle, rows, 1, "all", edited)
    _check(result.loss_parts[0], expected, n_selected, bundle.adapter.n_layers, 0.5)


def test_sadr_pulls_the_attention_back(tiny_tokenizer):
    """A large gamma lowers the final drift against the same optimisation without the term."""
    bundle = make_tiny("llama", tiny_tokenizer)
    inj = [Site("mlp", 0)]
    settings = TargetSettings(lr=1.0, steps=8, weight_decay=0.0, clamp_norm_factor=1e3, early_stop_loss=0.0)
    weak = optimise_targets(
        bundle, REQUESTS[:1], TEMPLATES, inj, settings, [SadrTerm(SadrSettings(gamma=0.0))]
    )
    strong = optimise_targets(
        bundle, REQUESTS[:1], TEMPLATES, inj, settings, [SadrTerm(SadrSettings(gamma=100.0, heads="all"))]
    )
    assert strong.loss_parts[0]["sadr.kl_all_heads"] < weak.loss_parts[0]["sadr.kl_all_heads"]


def test_fine_tuning_accepts_the_term(tiny_tokenizer):
    bundle = make_tiny("gpt2", tiny_tokenizer)
    case = EditCase("t", REQUESTS[0], rewrite=(Probe(REQUESTS[0].prompt, "Rome"),))
    ft = FineTune(FTParams(layers=[0], lr=1e-2, steps=4, norm_constraint=1.0, early_stop_loss=0.0))
    ft.terms = [SadrTerm(SadrSettings(gamma=1.0, heads="all"))]
    applied = ft.apply(bundle, [case])
    applied.revert()
    parts = applied.edit.info["loss_parts"][0]
    assert parts["sadr.heads_selected"] == 3 * 4 - 4  # every head of layers 1-2 (layer 0 cannot drift)
    assert parts["sadr"] > 0
    assert ft.hyperparameters()["terms"][0]["name"] == "sadr"


def test_make_editor_builds_sadr_methods(tmp_path):
    editor = make_editor("rome+sadr", "smollm2-135m", sadr={"gamma": 0.5, "layers": (6, 29)})
    assert editor.name == "rome+sadr" and isinstance(editor, Rome)
    term = editor.terms[0]
    assert term.settings.gamma == 0.5 and term.settings.layers == (6, 29)
    assert editor.hyperparameters()["terms"][0] == {
        "name": "sadr",
        "gamma": 0.5,
        "heads": "selective",
        "layers": [6, 29],
        "prompt_reduction": "mean",
    }
    # command-line text takes the same path: parsed into the same settings
    from_text = make_editor("rome+sadr", "smollm2-135m", sadr={"gamma": "0.5", "layers": "6-29"})
    assert from_text.hyperparameters() == editor.hyperparameters()
    ours = make_editor("rome+sadr", "smollm2-135m").terms[0].settings  # the validated setting
    assert (ours.gamma, ours.heads, ours.layers) == (0.1, "selective", (20, 29))
    # an override replaces one field of the preset's block; layers=None (or "all") lifts its range
    for every in (None, "all"):
        lifted = make_editor("rome+sadr", "smollm2-135m", sadr={"layers": every}).terms[0].settings
        assert (lifted.gamma, lifted.layers) == (0.1, None)
    # a whole SadrSettings replaces the block's settings; the block's base-method params still apply
    given = SadrSettings(gamma=0.2, heads="all")
    paper = make_editor("rome+sadr", "EleutherAI/gpt-j-6b", sadr=given)
    assert paper.terms[0].settings == given and paper.params.steps == 80
    paper = make_editor("rome+sadr", "EleutherAI/gpt-j-6b")
    assert paper.terms[0].settings.gamma == 0.01 and paper.params.steps == 80  # the preset's sadr block
    assert make_editor("rome", "EleutherAI/gpt-j-6b").params.steps == 20
    for method in ("memit+sadr", "pmet+sadr", "ft+sadr"):
        assert make_editor(method, "smollm2-135m").terms[0].name == "sadr"
    with pytest.raises(ValueError, match="need a '\\+sadr' method"):
        make_editor("rome", "smollm2-135m", sadr={"gamma": 1.0})
    with pytest.raises(ValueError, match="need a '\\+sadr' method"):
        make_editor("rome", "smollm2-135m", sadr=SadrSettings())
    with pytest.raises(ValueError, match="unknown method"):
        make_editor("none+sadr", "smollm2-135m")
    with pytest.raises(ValueError, match="unknown method"):
        make_editor("rome+foo", "smollm2-135m")
    with pytest.raises(PresetError, match="SADR has no setting 'weight'"):
        make_editor("rome+sadr", "smollm2-135m", sadr={"weight": 1.0})
    # SADR settings are not the method's parameters
    with pytest.raises(PresetError, match="rome has no parameter 'sadr_gamma'"):
        make_editor("rome+sadr", "smollm2-135m", overrides={"sadr_gamma": "1"})
    with pytest.raises(PresetError, match=r"'sadr' block: unknown field\(s\) \['gama'\]"):
        sadr_settings({"gama": 0.1}, {})
    with pytest.raises(PresetError, match="gamma='x'"):
        make_editor("rome+sadr", "smollm2-135m", sadr={"gamma": "x"})
    with pytest.raises(PresetError, match="'6-x'"):
        make_editor("rome+sadr", "smollm2-135m", sadr={"layers": "6-x"})
    with pytest.raises(PresetError, match="contiguous"):
        make_editor("rome+sadr", "smollm2-135m", sadr={"layers": "6,8"})
    with pytest.raises(ValueError, match="heads"):
        SadrSettings(heads="some")
    with pytest.raises(ValueError, match="gamma"):
        SadrSettings(gamma=-1)


def test_the_preset_is_the_bundles_models(tiny_tokenizer):
    """make_editor needs the model: a model without a preset is a PresetError naming it, never SmolLM2's."""
    bundle = make_tiny("llama", tiny_tokenizer)
    for method in ("rome", "memit+sadr", "ft"):
        with pytest.raises(PresetError, match=r"no preset for model 'tiny-llama'"):
            make_editor(method, bundle)
    assert make_editor("rome", bundle, preset="smollm2-135m").preset == "smollm2-135m"  # chosen explicitly
    assert make_editor("none", bundle).name == "none"
    with pytest.raises(TypeError):
        make_editor("rome")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="needs the model"):
        make_editor("rome", None)  # type: ignore[arg-type]
