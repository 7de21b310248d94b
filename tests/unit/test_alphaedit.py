"""AlphaEdit on tiny random models: the projection (rules, cache), the projected update, the stream's
state (C_prev) and its rebuilding by a resumed sequential run, and the command line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, make_tiny, tiny_run, tiny_settings
from typer.testing import CliRunner

from attnedit.core.data import load_cases
from attnedit.core.deltas import WeightEdit, model_hash
from attnedit.core.models import ModelBundle
from attnedit.core.sites import Site
from attnedit.editing import nullspace
from attnedit.editing.base import method_templates, stats_spec
from attnedit.editing.covariance import second_moments
from attnedit.editing.methods.alphaedit import AlphaEdit, AlphaEditParams, StateIntegrityError
from attnedit.editing.methods.memit import Memit, MemitParams
from attnedit.editing.nullspace import NullspaceRule, null_space_projections, projection_of
from attnedit.editing.presets import PresetError
from attnedit.editing.registry import make_editor
from attnedit.editing.solvers import projected_update, read_at_fact_token

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

PRESET = ROOT / "src/attnedit/resources/presets/alphaedit/smollm2-135m.json"
LAYERS = [0, 1]


def _params(corpus: str, **overrides: object) -> AlphaEditParams:
    # half of the directions kept: a proper projection on every tiny model, whatever its spectrum
    settings = {"layers": LAYERS, "nullspace_rule": "fraction", "nullspace_threshold": 0.5, **overrides}
    return AlphaEditParams(**tiny_settings(corpus, **settings))


def _views(bundle: ModelBundle) -> dict[int, torch.Tensor]:
    """Each edit layer's down-projection as [out, in] (GPT-2's Conv1D transposed), copied."""
    return {
        layer: bundle.adapter.weight_view(bundle.model, "mlp_down", layer).detach().double().clone()
        for layer in LAYERS
    }


def _cases(start: int, count: int) -> list:
    return load_cases("sample").cases[start : start + count]


# -- the projection ---------------------------------------------------------------------------------------


def test_rules_keep_the_small_eigen_directions():
    """Each rule keeps the directions it names, and P is the orthogonal projection onto them."""
    eigenvalues = torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0], dtype=torch.float64)
    basis, _ = torch.linalg.qr(
        torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    moments = basis @ torch.diag(eigenvalues) @ basis.T
    for rule, count in (
        (NullspaceRule("absolute", 2e-2), int((eigenvalues < 2e-2).sum())),
        (NullspaceRule("relative", 0.05), int((eigenvalues < 0.05 * eigenvalues.max()).sum())),
        (NullspaceRule("fraction", 0.6), round(0.6 * 5)),
    ):
        projection, kept = projection_of(moments, rule)
        p = projection.double()
        expected = basis[:, :count] @ basis[:, :count].T  # eigenvalues ascending: the first ones
        assert kept == count and torch.allclose(p, expected, atol=1e-6)
        assert torch.allclose(p @ p, p, atol=1e-6) and torch.allclose(p, p.T, atol=1e-6)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        NullspaceRule("fraction", 1.5)


def test_bad_settings_are_refused_naming_the_field():
    bundle_name = "tiny"
    with pytest.raises(PresetError, match=r"nullspace_threshold.*at most 1"):
        make_editor(
            "alphaedit",
            bundle_name,
            str(PRESET),
            {"nullspace_rule": "fraction", "nullspace_threshold": "1.5"},
        )
    with pytest.raises(PresetError, match="mom2_update_weight"):
        make_editor("alphaedit", bundle_name, str(PRESET), {"mom2_update_weight": "100"})
    with pytest.raises(PresetError, match="nullspace_rule"):
        make_editor("alphaedit", bundle_name, str(PRESET), {"nullspace_rule": "median"})


def test_projection_is_cached_in_memory_and_on_disk_and_keyed_by_the_rule(
    tiny_tokenizer, corpus, monkeypatch, isolated_cache
):
    spec = stats_spec(_params(corpus))
    rule = NullspaceRule("fraction", 0.5)
    bundle = make_tiny("llama", tiny_tokenizer)
    calls: list[NullspaceRule] = []
    real = nullspace.projection_of

    def counted(moments: torch.Tensor, chosen: NullspaceRule):
        calls.append(chosen)
        return real(moments, chosen)

    monkeypatch.setattr(nullspace, "projection_of", counted)
    first = null_space_projections(bundle, "mlp_down", LAYERS, spec, rule)
    assert len(calls) == 2
    again = null_space_projections(bundle, "mlp_down", LAYERS, spec, rule)
    assert len(calls) == 2 and all(again[layer] is first[layer] for layer in LAYERS)  # memory
    fresh = make_tiny("llama", tiny_tokenizer)  # same weights, same fingerprint, empty memory cache
    from_disk = null_space_projections(fresh, "mlp_down", LAYERS, spec, rule)
    assert len(calls) == 2 and all(torch.equal(from_disk[k], first[k]) for k in LAYERS)
    # another rule: another projection, computed
    other = null_space_projections(fresh, "mlp_down", LAYERS, spec, NullspaceRule("fraction", 0.25))
    assert len(calls) == 4 and not torch.equal(other[0], first[0])
    # the trace of an orthogonal projection is its rank: a quarter and half of the 96 directions
    assert round(float(other[0].trace())) == 24 and round(float(first[0].trace())) == 48
    # a damaged file is set aside and recomputed
    files = sorted((isolated_cache / "nullspace").rglob("mlp_down.0-*fraction-0.5.safetensors"))
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    data[-8:] = b"\x00" * 8
    files[0].write_bytes(bytes(data))
    damaged = make_tiny("llama", tiny_tokenizer)
    repaired = null_space_projections(damaged, "mlp_down", [0], spec, rule)
    assert len(calls) == 5 and torch.equal(repaired[0], first[0])
    assert files[0].with_name(files[0].name + ".bad").is_file()
    # the projection is that of MEMIT's cached statistics
    moments = second_moments(damaged, "mlp_down", [0], spec)[0]
    assert torch.equal(real(moments, rule)[0], first[0])


# -- the update ---------------------------------------------------------------------------------------------


def test_projected_update_with_identity_and_no_prior_is_the_plain_closed_form():
    gen = np.random.default_rng(0)
    keys, residuals = gen.normal(size=(5, 12)), gen.normal(size=(5, 7))
    l2 = 10.0
    ours = projected_update(torch.eye(12), torch.from_numpy(keys), torch.from_numpy(residuals), None, l2)
    # Delta^T = (K K^T + L2 I)^-1 K R^T, keys as columns
    direct = np.linalg.solve(keys.T @ keys + l2 * np.eye(12), keys.T @ residuals).T
    assert ours.dtype == torch.float64 and np.allclose(ours.numpy(), direct, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="l2 must be positive"):
        projected_update(torch.eye(12), torch.from_numpy(keys), torch.from_numpy(residuals), None, 0.0)


@dataclass
class _IdentityMemit(Memit):
    """MEMIT whose 'statistics' are the identity and lambda is ``l2``: the plain ridge closed form."""

    l2: float = 10.0

    def _layer_matrices(self, bundle, layers):
        size = bundle.adapter.weight_view(bundle.model, "mlp_down", layers[0]).shape[1]
        return {layer: torch.eye(size) for layer in layers}, self.l2


def test_alphaedit_with_every_direction_and_no_prior_is_the_unprojected_edit(tiny_tokenizer, corpus):
    """With P = I (fraction 1) and C_prev = 0, the whole edit (targets, keys per layer, layouts) is the one
    of the unprojected closed form ``solve(K K^T + L2 I, K R^T)``."""
    cases = _cases(0, 3)
    for family in ("llama", "gpt2"):
        bundle = make_tiny(family, tiny_tokenizer)
        alpha = AlphaEdit(_params(corpus, nullspace_threshold=1.0)).apply(bundle, cases)
        ours = alpha.edit.deltas
        alpha.revert()
        plain = _IdentityMemit(MemitParams(layers=LAYERS, **tiny_settings(corpus))).apply(bundle, cases)
        assert ours.keys() == plain.edit.deltas.keys()
        for name, delta in ours.items():
            assert torch.allclose(delta, plain.edit.deltas[name], rtol=1e-4, atol=1e-7), (family, name)
        plain.revert()


def test_updates_leave_the_preserved_directions_unchanged_on_every_family(tiny, corpus):
    """Delta k0 = 0 for every key k0 outside P's range (the large-eigenvalue directions of the
    statistics), on every family's layout; the edit reverts exactly."""
    editor = AlphaEdit(_params(corpus))
    before_hash = model_hash(tiny.model)
    applied = editor.apply(tiny, _cases(0, 3))
    projections = null_space_projections(tiny, "mlp_down", LAYERS, stats_spec(editor.params), editor.rule())
    for layer in LAYERS:
        # the delta as added, back in [out, in] (the layout change is a transpose for GPT-2's Conv1D)
        stored = applied.edit.deltas[tiny.adapter.weight_name("mlp_down", layer)]
        delta = tiny.adapter.to_weight_layout(stored).double()
        assert delta.shape == tiny.adapter.weight_view(tiny.model, "mlp_down", layer).shape
        complement = torch.eye(delta.shape[1], dtype=torch.float64) - projections[layer].double()
        preserved = complement @ torch.randn(delta.shape[1], 16, dtype=torch.float64)  # keys k0
        assert delta.norm() > 0
        assert (delta @ preserved).norm() <= 1e-4 * delta.norm() * preserved.norm()
    applied.revert()
    assert model_hash(tiny.model) == before_hash


def test_a_second_batch_of_a_stream_keeps_the_first_batchs_outputs(tiny_tokenizer, corpus):
    """After ``after_group`` of batch A, batch B's update barely changes the down-projections' outputs at
    A's keys (as read after A's edit); without C_prev it changes them far more. (The tiny models' keys
    have ``K K^T`` near 1e-2: the ridge is set well below it, so that C_prev binds.)"""
    bundle = make_tiny("llama", tiny_tokenizer)
    params = _params(corpus, l2=1e-6, nullspace_threshold=0.75)
    first, second = _cases(0, 3), _cases(3, 3)
    streamed = AlphaEdit(params)
    applied_a = streamed.apply(bundle, first)
    streamed.after_group(bundle, first)
    templates = method_templates(bundle, params)
    reads = {layer: Site("mlp_down", layer, "input") for layer in LAYERS}
    found = read_at_fact_token(bundle, [c.request for c in first], templates, list(reads.values()))
    keys_a = {layer: found[read].mean(1).double() for layer, read in reads.items()}
    for layer in LAYERS:  # C_prev is exactly A's K K^T
        assert torch.allclose(streamed.prior[layer], keys_a[layer].T @ keys_a[layer])

    def change_at_a(editor: AlphaEdit) -> dict[int, float]:
        before = _views(bundle)
        applied = editor.apply(bundle, second)
        after = _views(bundle)
        applied.revert()
        return {
            layer: float(
                ((after[layer] - before[layer]) @ keys_a[layer].T).norm()
                / (before[layer] @ keys_a[layer].T).norm()
            )
            for layer in LAYERS
        }

    kept, unkept = change_at_a(streamed), change_at_a(AlphaEdit(params))
    for layer in LAYERS:
        assert kept[layer] < 0.01 * unkept[layer] and kept[layer] < 1e-3, (layer, kept, unkept)
    applied_a.revert()


# -- the stream's state ------------------------------------------------------------------------------------


def test_the_state_round_trips_and_a_damaged_file_is_refused(tiny_tokenizer, corpus, tmp_path):
    bundle = make_tiny("gpt2", tiny_tokenizer)
    editor = AlphaEdit(_params(corpus))
    for group in (_cases(0, 2), _cases(2, 2)):
        editor.apply(bundle, group)  # kept: a stream
        editor.after_group(bundle, group)
    assert editor.streamed == 4 and set(editor.prior) == set(LAYERS)
    path = editor.save_state(tmp_path / "state.safetensors")
    loaded = AlphaEdit(_params(corpus))
    loaded.load_state(path)
    state, again = editor.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(16)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    fresh = AlphaEdit(_params(corpus))
    with pytest.raises(StateIntegrityError, match="does not verify"):
        fresh.load_state(damaged)
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(StateIntegrityError, match="does not load"):
        fresh.load_state(tmp_path / "torn.safetensors")
    with pytest.raises(StateIntegrityError, match="edit layers"):
        AlphaEdit(_params(corpus, layers=[1, 2])).load_state(path)
    assert fresh.prior == {} and fresh.streamed == 0
    fresh.load_state_dict(state)
    editor.reset_state()
    assert editor.prior == {} and editor.streamed == 0 and fresh.streamed == 4


def _sequential_config(out: Path, model: Path, corpus: str):
    params = {"templates": "[[3, 1]]", "nullspace_rule": "fraction", "nullspace_threshold": "0.5"}
    return tiny_run(
        out,
        model,
        corpus,
        method="alphaedit",
        preset=PRESET,
        params=params,
        limit=4,
        mode="sequential",
        batch_size=2,
    )


def test_a_resumed_sequential_run_continues_the_same_stream(tmp_path, tiny_dir, corpus):
    """A run stopped after its first group's edit, resumed by a fresh process (a fresh editor), re-applies
    that edit from its file, takes C_prev back from the stream's saved state, and ends with the C_prev and
    the second edit of an uninterrupted run."""
    from attnedit.core.models import load_model
    from attnedit.runs.runner import run

    bundle = load_model(str(tiny_dir))
    original = model_hash(bundle.model)

    def editor() -> AlphaEdit:
        config = _sequential_config(tmp_path, tiny_dir, corpus)
        made = make_editor(config.method, bundle, config.preset, config.params)
        assert isinstance(made, AlphaEdit)
        return made

    whole = editor()
    run(_sequential_config(tmp_path / "whole", tiny_dir, corpus), bundle=bundle, editor=whole, progress=False)

    class Stop(RuntimeError):
        pass

    stopped = editor()
    calls: list[int] = []
    real_apply = stopped.apply

    def apply_once(b, cases):
        calls.append(len(cases))
        if len(calls) == 2:
            raise Stop("killed after the first group")
        return real_apply(b, cases)

    stopped.apply = apply_once  # type: ignore[method-assign]
    with pytest.raises(Stop):
        run(
            _sequential_config(tmp_path / "resumed", tiny_dir, corpus),
            bundle=bundle,
            editor=stopped,
            progress=False,
        )
    assert model_hash(bundle.model) == original
    assert [p.name for p in (tmp_path / "resumed" / "edits").iterdir()] == ["00000.safetensors"]

    resumed = editor()
    computed: list[int] = []
    real = resumed.apply

    def counted(b, cases):
        computed.append(len(cases))
        return real(b, cases)

    resumed.apply = counted  # type: ignore[method-assign]
    run(
        _sequential_config(tmp_path / "resumed", tiny_dir, corpus),
        bundle=bundle,
        editor=resumed,
        progress=False,
    )
    assert computed == [2]  # the first group re-applied from its file, only the second computed
    assert resumed.streamed == whole.streamed == 4
    for layer in LAYERS:
        assert torch.equal(resumed.prior[layer], whole.prior[layer])
    for k in range(2):
        a = WeightEdit.load(tmp_path / "whole" / "edits" / f"{k:05d}.safetensors").deltas
        b = WeightEdit.load(tmp_path / "resumed" / "edits" / f"{k:05d}.safetensors").deltas
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert model_hash(bundle.model) == original


# -- the command line ----------------------------------------------------------------------------------


def test_eval_alphaedit_batch_on_the_command_line(tmp_path, tiny_dir, corpus):
    from attnedit.cli.main import app

    flags = ["-p", "layers=0,1", "-p", f"stats_corpus={corpus}", "-p", "stats_samples=20", "-p", "steps=3"]
    flags += ["-p", "templates=[[3, 1]]", "-p", "nullspace_rule=fraction", "-p", "nullspace_threshold=0.5"]
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "eval", "sample", "--model", str(tiny_dir), "--method", "alphaedit", "--preset", "smollm2-135m",
            "--mode", "batch", "--batch-size", "4", "--limit", "4", "--no-fluency", "--out", str(out), *flags,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| alphaedit |" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "alphaedit" and manifest["hyperparameters"]["nullspace_rule"] == "fraction"
    assert json.loads((out / "summary.json").read_text())["ES"]["n"] == 4
