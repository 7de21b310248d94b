"""The locate-then-edit blocks and methods on tiny random models of every family."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, make_tiny, tiny_settings

from attnedit.core.data import EditCase, EditRequest, Probe, load_cases
from attnedit.core.deltas import EditMismatchError, WeightEdit, model_hash
from attnedit.core.interventions import Trace
from attnedit.core.scoring import score_targets
from attnedit.core.sites import Site
from attnedit.editing.adam import NonFiniteLossError, adam_loop
from attnedit.editing.base import EditRequestError
from attnedit.editing.covariance import StatsSpec, second_moments
from attnedit.editing.covariance import cache_entries as moment_entries
from attnedit.editing.frozen_below import FrozenBelow
from attnedit.editing.methods.ft import FineTune, FTParams
from attnedit.editing.methods.memit import Memit, MemitParams
from attnedit.editing.methods.pmet import Pmet, PmetParams
from attnedit.editing.methods.rome import Rome, RomeParams
from attnedit.editing.optimise import TargetSettings, optimise_targets
from attnedit.editing.presets import PresetError
from attnedit.editing.registry import load_preset, make_params
from attnedit.editing.rows import build_rows, split_rows
from attnedit.editing.solvers import least_squares_update, rank_one_update, solve_spd
from attnedit.editing.templates import cache_entries as template_entries

TEMPLATES = ["{}", "The city. {}", "You know that. {}"]


pytestmark = pytest.mark.usefixtures("isolated_cache")


def _case(
    prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", new="Rome", true="Paris"
):
    return EditCase(
        case_id="t", request=EditRequest(prompt, subject, new, true), rewrite=(Probe(prompt, new),)
    )


def _p_new(bundle, case) -> float:
    req = case.request
    return score_targets(bundle.model, bundle.tokenizer, bundle.adapter, [(req.text, req.target_new)])[0].prob


def _editors(corpus: str) -> dict:
    # random tiny models have tiny MLP outputs: relax the decay and clamp that are relative to them
    common = tiny_settings(corpus, stats_samples=50, steps=8)
    return {
        "rome": Rome(RomeParams(layers=[1], **common)),
        "memit": Memit(MemitParams(layers=[0, 1], **common)),
        "pmet": Pmet(PmetParams(layers=[0, 1], **common)),
        "ft": FineTune(FTParams(layers=[1], lr=1e-2, steps=8, norm_constraint=1e-2)),
    }


def test_frozen_below_is_exact(tiny):
    """Skipping the lower blocks and reusing the prefix cache gives the full forward's hidden states."""
    req = _case().request
    rows = build_rows(tiny, [req], TEMPLATES)
    batch = split_rows(rows, [0] * len(rows), 0, tiny.device)
    delta = torch.randn(tiny.adapter.hidden_size) * 0.5
    name = tiny.adapter.module_name("mlp", 1)
    with torch.no_grad():
        frozen = FrozenBelow(tiny, batch, 1)
        with Trace(tiny.model, [name], retain_output=False, edit_output=lambda y, _: _add(y, 0, delta)):
            fast = frozen.forward()
        for b, row in enumerate(rows):
            full_ids = torch.tensor([row.ids])
            with Trace(
                tiny.model,
                [name],
                retain_output=False,
                edit_output=lambda y, _, f=row.fact: _add(y, f, delta),
            ):
                full = tiny.model.base_model(input_ids=full_ids).last_hidden_state[0, row.fact :]
            assert torch.allclose(fast[b, : len(row.ids) - row.fact], full, atol=1e-5), (b, row)


def _add(y: torch.Tensor, column: int, delta: torch.Tensor) -> torch.Tensor:
    y = y.clone()
    y[:, column] += delta
    return y


@pytest.mark.parametrize("max_rows", [256, 4])  # one group, or one request per group
def test_batched_optimisation_equals_separate(tiny_tokenizer, max_rows):
    bundle = make_tiny("llama", tiny_tokenizer)
    reqs = [
        _case().request,
        _case("Danielle Darrieux speaks", "Danielle Darrieux", "English", "French").request,
    ]
    settings = TargetSettings(steps=6, early_stop_loss=0.0, max_rows=max_rows)
    inj = Site("layer", 1)
    joint = optimise_targets(bundle, reqs, TEMPLATES, [inj], settings)
    for i, req in enumerate(reqs):
        alone = optimise_targets(bundle, [req], TEMPLATES, [inj], settings)
        assert torch.allclose(joint.delta[inj][i], alone.delta[inj][0], atol=1e-4)
        assert torch.allclose(joint.init[inj][i], alone.init[inj][0], atol=1e-5)


def test_an_interrupted_batch_optimisation_resumes_its_finished_groups(tiny_tokenizer, tmp_path):
    """With ``target_cache``, each finished group's targets are kept; a run stopped during the
    second group resumes with the first group's targets from the cache (not optimised again) and ends
    with the targets of an uninterrupted run. Other settings do not reuse them; a damaged file is not
    trusted; a second optimisation of the same requests optimises nothing."""
    from attnedit.editing.adam import on_step
    from attnedit.editing.target_cache import target_cache

    bundle = make_tiny("llama", tiny_tokenizer)
    reqs = [
        _case().request,
        _case("Danielle Darrieux speaks", "Danielle Darrieux", "English", "French").request,
        _case("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar").request,
    ]
    settings = TargetSettings(steps=4, early_stop_loss=0.0, max_rows=4)  # one request per group
    inj = [Site("mlp", 1), Site("layer", 1)]
    reference = optimise_targets(bundle, reqs, TEMPLATES, inj, settings)
    cache = tmp_path / "edits" / "group.targets"
    starts: list[int] = []

    def stop_in_second_group(what: str, step: int, losses: list, parts: dict) -> None:
        if step == 0:
            starts.append(step)
            if len(starts) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), target_cache(cache), on_step(stop_in_second_group):
        optimise_targets(bundle, reqs, TEMPLATES, inj, settings)
    assert len(list(cache.glob("*.safetensors"))) == 1
    starts.clear()
    with target_cache(cache), on_step(lambda what, step, *_: starts.append(step) if step == 0 else None):
        resumed = optimise_targets(bundle, reqs, TEMPLATES, inj, settings)
    assert len(starts) == 2  # the first group came from the file
    for site in inj:
        assert torch.equal(resumed.delta[site], reference.delta[site])
        assert torch.equal(resumed.init[site], reference.init[site])
    assert resumed.steps == reference.steps and resumed.final_loss == reference.final_loss
    starts.clear()
    with target_cache(cache), on_step(lambda what, step, *_: starts.append(step) if step == 0 else None):
        optimise_targets(bundle, reqs, TEMPLATES, inj, replace(settings, lr=0.1))
    assert len(starts) == 3  # other settings: nothing reused
    assert len(list(cache.glob("*.safetensors"))) == 6
    starts.clear()
    with target_cache(cache), on_step(lambda what, step, *_: starts.append(step) if step == 0 else None):
        cached = optimise_targets(bundle, reqs, TEMPLATES, inj, replace(settings, lr=0.1))
    assert starts == []  # every group from the cache
    for path in cache.glob("*.safetensors"):  # a flipped byte in the tensors: the file is not trusted
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    starts.clear()
    with target_cache(cache), on_step(lambda what, step, *_: starts.append(step) if step == 0 else None):
        again = optimise_targets(bundle, reqs, TEMPLATES, inj, replace(settings, lr=0.1))
    assert len(starts) == 3
    for site in inj:
        assert torch.equal(again.delta[site], cached.delta[site])


def test_early_stop_and_clamp(tiny_tokenizer):
    bundle = make_tiny("llama", tiny_tokenizer)
    inj = Site("mlp", 1)
    result = optimise_targets(
        bundle, [_case().request], TEMPLATES, [inj], TargetSettings(steps=5, early_stop_loss=1e9)
    )
    assert result.steps == [0] and float(result.delta[inj].abs().max()) == 0.0  # stopped before any update
    result = optimise_targets(
        bundle, [_case().request], TEMPLATES, [inj], TargetSettings(steps=10, clamp_norm_factor=0.1, lr=5.0)
    )
    assert float(result.delta[inj].norm()) <= 0.1 * float(result.init[inj].norm()) * (1 + 1e-5)


def test_sites_resolve_through_the_adapter(tiny):
    """A site names an adapter component; its module is the adapter's, whatever the family."""
    adapter = tiny.adapter
    key = Site("mlp_down", 1, "input")
    assert key.module_name(adapter) == adapter.module_name("mlp_down", 1)
    assert tiny.model.get_submodule(Site("attn", 2).module_name(adapter)) is adapter.module(
        tiny.model, "attn", 2
    )
    assert Site("layer", 0).hidden_state and not key.hidden_state and not Site("mlp", 0, "input").hidden_state
    assert Site("mlp", 1) == Site("mlp", 1, "output") and len({Site("mlp", 1), Site("mlp", 1, "output")}) == 1
    for bad in (dict(component="mlp_up", layer=0), dict(component="embed", layer=0)):
        with pytest.raises(ValueError, match="unknown site component"):
            Site(**bad)
    with pytest.raises(ValueError, match="side"):
        Site("mlp", 0, "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer"):
        Site("mlp", -1)
    with pytest.raises(IndexError):
        Site("mlp", adapter.n_layers).module_name(adapter)


def test_adam_loop_contract():
    """The loop every target optimisation runs: a unit that met the stop rule is frozen from then on, the
    projection holds after every step, the last forward pass only measures, and a non-finite loss of an
    active unit stops everything, naming the unit."""
    targets = torch.tensor([[1.0, 0.0], [3.0, 4.0], [-6.0, 8.0]])  # the last two lie outside the clamp
    x = torch.zeros(3, 2, requires_grad=True)
    seen: list[torch.Tensor] = []

    def losses(step: int) -> torch.Tensor:
        seen.append(x.detach().clone())
        return ((x - targets) ** 2).sum(-1)

    def clamp() -> None:
        x.mul_((2.0 / x.norm(dim=-1).clamp_min(2.0))[:, None])

    result = adam_loop(
        [x], losses, lr=0.5, steps=12, early_stop_loss=0.05, project=clamp, units=["a", "b", "c"]
    )
    stop = result.steps[0]
    assert 0 < stop < 11 and result.steps[1:] == [11, 11] and len(seen) == 12
    assert result.final_loss[0] < 0.05 <= float(((seen[stop - 1][0] - targets[0]) ** 2).sum())
    for later in seen[stop:]:
        assert torch.equal(later[0], seen[stop][0])  # Adam's momentum would have moved it
    assert torch.equal(x.detach(), seen[-1])  # no update after the last measuring pass
    assert all(float(v.norm(dim=-1).max()) <= 2.0 * (1 + 1e-6) for v in seen)
    for i in (1, 2):
        assert result.final_loss[i] == float(((seen[-1][i] - targets[i]) ** 2).sum())

    def nan_for_b(step: int) -> torch.Tensor:
        return losses(step) * torch.tensor([1.0, math.nan, 1.0])

    before = x.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"at step 0 for request\(s\) \['b'\]"):
        adam_loop([x], nan_for_b, lr=0.5, steps=3, early_stop_loss=0.0, units=["a", "b", "c"])
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "ft"])
def test_methods_edit_every_family_and_revert_exactly(tiny, method, corpus):
    editor = _editors(corpus)[method]
    case = _case()
    before_hash, before_p = model_hash(tiny.model), _p_new(tiny, case)
    applied = editor.apply(tiny, [case])
    # efficacy is asserted on the real model (test_smollm2_editing.py): random tiny models barely
    # respond to any edit; here the mechanics: the right weights change, finitely, and revert exactly
    assert _p_new(tiny, case) != before_p
    expected = {tiny.adapter.weight_name("mlp_down", layer) for layer in editor.params.layers}
    assert set(applied.edit.deltas) == expected
    for name, delta in applied.edit.deltas.items():
        param = dict(tiny.model.named_parameters())[name]
        assert delta.shape == param.shape and torch.isfinite(delta).all() and delta.abs().max() > 0
    assert model_hash(tiny.model) != before_hash
    applied.revert()
    assert model_hash(tiny.model) == before_hash


def _one_time_keys(bundle) -> set:
    """The keys of the one-time work in ``bundle``'s memory caches (context templates, second moments)."""
    return set(template_entries(bundle)) | set(moment_entries(bundle))


@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "ft"])
def test_prepare_does_the_one_time_work_ahead_and_changes_no_edit(
    tiny_tokenizer, method, corpus, tmp_path, monkeypatch
):
    cases = [_case()]
    unprepared = make_tiny("llama", tiny_tokenizer)
    expected = _editors(corpus)[method].apply(unprepared, cases).edit.deltas
    # a fresh disk cache, so that prepare computes rather than reads
    monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / "fresh-cache"))
    bundle = make_tiny("llama", tiny_tokenizer)
    editor = _editors(corpus)[method]
    editor.prepare(bundle, cases)
    prepared = _one_time_keys(bundle)
    assert bool(prepared) == (method != "ft")  # FT needs neither templates nor statistics
    deltas = editor.apply(bundle, cases).edit.deltas
    assert _one_time_keys(bundle) == prepared  # apply found everything done
    assert deltas.keys() == expected.keys()
    assert all(torch.equal(deltas[k], expected[k]) for k in deltas)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_edit_reproduces_logits_on_a_fresh_model(family, tiny_tokenizer, corpus, tmp_path):
    bundle = make_tiny(family, tiny_tokenizer, seed=3)
    applied = _editors(corpus)["memit"].apply(bundle, [_case()])
    ids = torch.tensor([bundle.tokenizer("The Eiffel Tower is located in the city of")["input_ids"]])
    with torch.no_grad():
        edited = bundle.model(input_ids=ids).logits
    path = applied.edit.save(tmp_path / "edit.safetensors")
    bundle.model.save_pretrained(tmp_path / "edited")  # an edited model saves like any model

    fresh = make_tiny(family, tiny_tokenizer, seed=3)
    loaded = WeightEdit.load(path)
    assert loaded.requests == [_case().request] and loaded.method == "memit"
    assert loaded.hyperparameters["layers"] == [0, 1]
    loaded.apply(fresh.model)
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=ids).logits, edited)
        reloaded = type(bundle.model).from_pretrained(tmp_path / "edited")
        assert torch.equal(reloaded(input_ids=ids).logits, edited)

    other = make_tiny(family, tiny_tokenizer, seed=4)
    with pytest.raises(EditMismatchError, match="differs from the weights"):
        loaded.apply(other.model)


def test_bad_requests_are_refused_with_the_model_untouched(tiny_tokenizer, corpus):
    bundle = make_tiny("llama", tiny_tokenizer)
    rome = _editors(corpus)["rome"]
    original = model_hash(bundle.model)
    with pytest.raises(EditRequestError, match="subject"):
        rome.apply(bundle, [_case(subject="Colosseum")])
    with pytest.raises(EditRequestError, match="target_new is empty"):
        rome.apply(bundle, [_case(new=" ")])
    with pytest.raises(EditRequestError, match="equals target_true"):
        rome.apply(bundle, [_case(new="Paris")])
    with pytest.raises(EditRequestError, match="one request at a time"):
        rome.apply(bundle, [_case(), _case()])
    with pytest.raises(EditRequestError, match="outside"):
        Rome(RomeParams(layers=[7], stats_corpus=corpus)).apply(bundle, [_case()])
    with pytest.raises(NonFiniteLossError, match="model is unchanged"):
        Rome(RomeParams(layers=[1], stats_corpus=corpus, templates=[[3, 1]]), terms=[_NaNTerm()]).apply(
            bundle, [_case()]
        )
    with pytest.raises(NonFiniteLossError):
        # built without validation: the parameter model refuses these (a non-finite loss is forced)
        FineTune(FTParams.model_construct(layers=[1], lr=math.inf, norm_constraint=math.inf, steps=4)).apply(
            bundle, [_case()]
        )
    with pytest.raises(ValueError, match="injection sites must be outputs of"):
        optimise_targets(bundle, [_case().request], TEMPLATES, [Site("mlp_down", 1)], TargetSettings())
    assert model_hash(bundle.model) == original


class _NaNTerm:
    """An extra loss term that breaks the optimisation (reads attention where asked, like SADR will)."""

    name = "nan"

    def __init__(self, layers=()):
        self.layers = list(layers)

    def attention_layers(self, n_layers):
        return self.layers

    def describe(self):
        return {"name": self.name}

    def __call__(self, state):
        # only the last prompt token's row is kept, and only above the injection layer
        assert sorted(state.attention) == [layer for layer in self.layers if layer > 1]
        for layer in state.attention:
            rows, heads, keys = state.attention[layer].shape
            assert (rows, keys) == tuple(state.batch.attention_mask.shape) and heads > 1
        return torch.full((state.n_requests,), math.nan)


def test_presets_and_overrides():
    preset = load_preset("rome", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert preset["model"] == "smollm2-135m"
    params = make_params("memit", load_preset("memit", "smollm2-135m"), {"layers": "2-4", "steps": "7"})
    assert params.layers == [2, 3, 4] and params.steps == 7
    for method in ("rome", "memit", "pmet", "ft"):
        for model in ("gpt2-xl", "gpt-j-6b", "gpt-neox-20b", "llama-2-13b", "llama-3-8b", "tinyllama-1.1b"):
            make_params(method, load_preset(method, model))
        make_params(method, load_preset(method, "Qwen/Qwen2.5-7B-Instruct"))
        make_params(method, load_preset(method, "mistralai/Mistral-7B-v0.1"))
    assert load_preset("memit", "EleutherAI/gpt-j-6b")["params"]["layers"] == [3, 4, 5, 6, 7, 8]
    with pytest.raises(PresetError, match=r"no preset for model .my-own-model.; available: "):
        load_preset("rome", "my-own-model")
    with pytest.raises(PresetError, match="no parameter 'stepz'"):
        make_params("rome", preset, {"stepz": "3"})
    with pytest.raises(PresetError, match="expected int"):
        make_params("rome", preset, {"steps": "many"})


def test_every_params_field_is_typed_and_bad_values_name_field_and_value():
    """Each method's parameter model checks types and ranges, for presets and overrides alike; every field
    has a type, a default or is required, and help text."""
    from attnedit.editing.spec import registered

    for spec in registered():
        if spec.params is None:
            continue
        for name, info in spec.params.model_fields.items():
            assert info.description, (spec.name, name)  # help for the CLI, the API and the inspector
        for name in spec.available_presets():  # every shipped preset passes
            spec.make_params(spec.load_preset("any", name))
    rome = load_preset("rome", "smollm2-135m")
    refused = {  # override -> what the error says (steps=0 was a KeyError, lr=inf a NonFiniteLossError)
        "steps=0": "steps=0 (--param): must be >= 1",
        "steps=-5": "steps=-5 (--param): must be >= 1",
        "lr=inf": "lr=inf (--param): expected a finite number",
        "lr=0": "lr=0.0 (--param): must be > 0",
        "kl_factor=nan": "kl_factor=nan (--param): expected a finite number",
        "clamp_norm_factor=-1": "clamp_norm_factor=-1.0 (--param): must be > 0",
        "stats_samples=0": "stats_samples=0 (--param): must be >= 1",
        "key_mode=keys": "key_mode='keys' (--param): expected one of 'templates', 'prompt'",
        "templates=[[5, 0]]": "templates=[[5, 0]] (--param): expected a list of [length, count] pairs",
        "stats_corpus= ": "stats_corpus='' (--param): expected a non-empty string",
    }
    for override, message in refused.items():
        key, _, value = override.partition("=")
        with pytest.raises(PresetError, match=re.escape(f"rome: {message}")):
            make_params("rome", rome, {key: value})
    ft = load_preset("ft", "smollm2-135m")
    with pytest.raises(PresetError, match=re.escape("ft: norm_constraint=0.0 (--param): must be > 0")):
        make_params("ft", ft, {"norm_constraint": "0"})
    # a bad value in a preset file is named with the preset, and typed values are checked too
    bad_preset = {**rome, "params": {**rome["params"], "steps": 2.5}}
    with pytest.raises(
        PresetError, match=re.escape("rome: steps=2.5 (preset 'smollm2-135m'): expected an integer")
    ):
        make_params("rome", bad_preset)
    with pytest.raises(PresetError, match=re.escape("layers=[-1]")):
        make_params("rome", rome, {"layers": [-1]})


def test_solvers():
    torch.manual_seed(0)
    k_all = torch.randn(500, 6, dtype=torch.float64)
    cov = k_all.T @ k_all / 500
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    key, target = torch.randn(6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    delta = rank_one_update(w, b, cov, key, target)
    assert torch.allclose((w + delta) @ key + b, target, atol=1e-10)  # W' k* + b = v*
    keys, resid = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    delta = least_squares_update(cov, keys, resid, 2.0)
    assert torch.allclose(delta @ (2.0 * cov + keys.T @ keys), resid.T @ keys, atol=1e-10)


def test_singular_statistics_are_regularised_with_a_warning(caplog):
    singular = torch.zeros(5, 5, dtype=torch.float64)
    singular[0, 0] = 1.0
    with caplog.at_level(logging.WARNING):
        x = solve_spd(singular, torch.ones(5, dtype=torch.float64), "C")
    assert torch.isfinite(x).all() and "regularised" in caplog.text
    with pytest.raises(FloatingPointError):
        solve_spd(torch.full((3, 3), math.nan), torch.ones(3), "C")


def test_second_moments_match_a_direct_computation_and_are_cached(tiny_tokenizer, corpus, monkeypatch):
    bundle = make_tiny("gpt2", tiny_tokenizer)
    spec = StatsSpec(corpus=corpus, samples=10, max_tokens=16, batch_tokens=64)
    moments = second_moments(bundle, "mlp_down", [0, 2], spec, progress=False)
    name = bundle.adapter.module_name("mlp_down", 2)
    keys = []
    for text in CORPUS[:6] + CORPUS[:4]:
        ids = torch.tensor([tiny_tokenizer(text)["input_ids"][:16]])
        with torch.no_grad(), Trace(bundle.model, [name], retain_input=True, detach=True) as trace:
            bundle.model(input_ids=ids)
            keys.append(trace[name].input[0])
    k = torch.cat(keys)
    assert torch.allclose(moments[2], k.T @ k / len(k), atol=1e-5)
    bundle.cache.clear()  # from disk now: computing again would fail
    monkeypatch.setattr("attnedit.editing.covariance._accumulate", lambda *a, **kw: pytest.fail("recomputed"))
    again = second_moments(bundle, "mlp_down", [2], spec, progress=False)
    assert torch.equal(again[2], moments[2])


def test_a_bad_statistics_cache_file_is_named_set_aside_and_recomputed(tiny_tokenizer, corpus, caplog):
    """Flipped bytes, a NaN with a digest that verifies, an unreadable file: each is named in a warning,
    moved to ``*.bad`` and recomputed to the same bits; a file without a digest is recomputed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    bundle = make_tiny("gpt2", tiny_tokenizer)
    spec = StatsSpec(corpus=corpus, samples=10, max_tokens=16, batch_tokens=64)
    moments = second_moments(bundle, "mlp_down", [1], spec, progress=False)[1]
    (path,) = (Path(os.environ["ATTNEDIT_CACHE"]) / "stats").rglob("*.safetensors")
    good = path.read_bytes()
    with safe_open(str(path), framework="pt") as fh:
        meta, count = fh.metadata(), fh.get_tensor("count")
    nan = moments.clone()
    nan[0, 0] = math.nan
    flipped = bytearray(good)
    flipped[-40] ^= 0x10  # inside mom2's data (count, 8 bytes, is stored last)

    def nan_verified() -> None:
        from attnedit.core.deltas import tensors_digest

        tensors = {"mom2": nan, "count": count}
        save_file(tensors, str(path), {"sha256": tensors_digest(tensors)})

    for damage, problem in (
        (lambda: path.write_bytes(bytes(flipped)), "does not verify"),
        (nan_verified, "non-finite"),
        (lambda: path.write_bytes(good[: len(good) // 2]), "does not load"),
    ):
        damage()
        bundle.cache.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="attnedit.editing"):
            again = second_moments(bundle, "mlp_down", [1], spec, progress=False)[1]
        assert torch.equal(again, moments)
        assert problem in caplog.text and str(path) in caplog.text
        assert path.with_name(path.name + ".bad").is_file() and path.read_bytes() == good
    path.with_name(path.name + ".bad").unlink()
    save_file({"mom2": nan, "count": count}, str(path))  # as written before the digests: recomputed
    bundle.cache.clear()
    assert torch.equal(second_moments(bundle, "mlp_down", [1], spec, progress=False)[1], moments)
    assert path.read_bytes() == good and not path.with_name(path.name + ".bad").exists()
    assert meta and "sha256" in meta


def test_a_bad_template_cache_file_is_named_set_aside_and_recomputed(tiny_tokenizer, caplog):
    from attnedit.editing.templates import TemplateSpec, context_templates

    bundle = make_tiny("llama", tiny_tokenizer)
    spec = TemplateSpec(lengths=((3, 2),))
    templates = context_templates(bundle, spec)
    (path,) = (Path(os.environ["ATTNEDIT_CACHE"]) / "templates").glob("*.json")
    good = path.read_text()
    entry = json.loads(good)
    for bad, problem in (
        (good[:-10], "does not parse"),
        (json.dumps({**entry, "templates": ["{}", "Injected text. {}"]}), "does not verify"),
    ):
        path.write_text(bad)
        bundle.cache.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="attnedit.editing"):
            assert context_templates(bundle, spec) == templates
        assert problem in caplog.text and str(path) in caplog.text
        assert path.with_name(path.name + ".bad").read_text() == bad and path.read_text() == good
    path.write_text(json.dumps(["{}", "Stale. {}"]))  # as written before the digests: recomputed
    bundle.cache.clear()
    assert context_templates(bundle, spec) == templates and path.read_text() == good


def test_sample_cases_edit_with_memit_batch(tiny_tokenizer, corpus):
    bundle = make_tiny("qwen2", tiny_tokenizer)
    cases = load_cases("sample").cases[:6]
    editor = _editors(corpus)["memit"]
    applied = editor.apply(bundle, cases)
    assert len(applied.edit.requests) == 6 and len(applied.edit.info["steps"]) == 6
    applied.revert()


def test_hooks_are_removed_after_a_failed_edit(tiny_tokenizer, corpus):
    bundle = make_tiny("llama", tiny_tokenizer)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bundle.model.modules())
    with contextlib.suppress(NonFiniteLossError):
        Rome(
            RomeParams(layers=[1], stats_corpus=corpus, templates=[[3, 1]]), terms=[_NaNTerm(layers=[1, 2])]
        ).apply(bundle, [_case()])
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bundle.model.modules()) == hooks
    assert all("forward" not in vars(block) for block in bundle.model.model.layers)


@pytest.mark.parametrize("steps", [3, 9])
def test_nothing_below_the_injection_is_recomputed_per_step(tiny_tokenizer, steps):
    """Block 0 computes twice per optimisation (prefix cache, lower output), however many steps."""
    bundle = make_tiny("llama", tiny_tokenizer)
    calls = []
    mlp = bundle.adapter.module(bundle.model, "mlp", 0)  # the block itself is called, but skipped
    handle = mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        optimise_targets(
            bundle,
            [_case().request],
            TEMPLATES,
            [Site("mlp", 1)],
            TargetSettings(steps=steps, early_stop_loss=0),
        )
    finally:
        handle.remove()
    assert len(calls) == 2
