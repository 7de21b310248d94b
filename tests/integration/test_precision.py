"""--device / --dtype: half-precision weights edit and evaluate end to end (the target optimisation and
the solvers stay float32/float64), and an unavailable device or unsupported dtype is refused up front."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from attnedit.cli.main import app
from attnedit.core.data import load_cases
from attnedit.core.models import ModelLoadError, load_model, resolve_device, resolve_dtype
from attnedit.core.sites import Site
from attnedit.editing.methods.memit import Memit, MemitParams
from attnedit.editing.methods.rome import Rome, RomeParams
from attnedit.evaluation.evaluator import EvalConfig, Evaluator

COMMON = dict(steps=10, templates=[[4, 2]], weight_decay=1e-3, clamp_norm_factor=50.0, stats_samples=30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_half_precision_weights_edit_as_float32_does(tiny_dir, corpus, dtype, method):
    """The edit of half-precision weights is the float32 edit up to the precision's rounding (no
    overflow, no NaN: the optimisation and the solvers run in float32/float64), and ROME's edit makes
    the new object likelier."""
    editor = (
        Rome(RomeParams(layers=[1], stats_corpus=corpus, **COMMON))
        if method == "rome"
        else Memit(MemitParams(layers=[0, 1], stats_corpus=corpus, **COMMON))
    )
    case = load_cases("sample").cases[0]
    full = load_model(str(tiny_dir))
    with editor.apply(full, [case]) as applied:
        reference = applied.edit.deltas
    bundle = load_model(str(tiny_dir), dtype=dtype)
    assert next(bundle.model.parameters()).dtype == dtype
    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    before = evaluator.score(case)["comparisons"]["ES"]["right_nll"][0]
    with editor.apply(bundle, [case]) as applied:
        assert applied.edit.deltas.keys() == reference.keys()
        for name, delta in applied.edit.deltas.items():
            assert delta.dtype == dtype and torch.isfinite(delta).all(), name
            error = (delta.float() - reference[name]).norm() / reference[name].norm()
            assert error < 0.1, (name, float(error))
        assert all(torch.isfinite(p).all() for p in bundle.model.parameters())
        after = evaluator.score(case)["comparisons"]["ES"]["right_nll"][0]
    if method == "rome":
        assert after < before
    assert all(torch.isfinite(p).all() for p in bundle.model.parameters())


def test_bad_device_and_dtype_are_refused_naming_the_flag(tmp_path, tiny_dir):
    runner = CliRunner()
    base = ["eval", "sample", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--limit", "1"]
    result = runner.invoke(app, [*base, "--dtype", "int8"])
    assert result.exit_code == 2 and "--dtype" in result.output and "bfloat16" in result.output
    result = runner.invoke(app, [*base, "--device", "tpu9"])
    assert result.exit_code == 2 and "--device" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, [*base, "--device", "cuda"])
        assert result.exit_code == 2 and "--device" in result.output and "no CUDA device" in result.output
        with pytest.raises(ModelLoadError, match="no CUDA"):
            resolve_device("cuda")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16


def test_eval_in_bfloat16_records_the_precision_and_device(tmp_path, tiny_dir, corpus_file):
    out = tmp_path / "bf16"
    args = [
        "eval",
        "sample",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--limit",
        "2",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--method",
        "rome",
        "--preset",
        "smollm2-135m",
        "--no-fluency",
        "--ppl-corpus",
        "none",
        "-p",
        "layers=1",
        "-p",
        f"stats_corpus={corpus_file}",
        "-p",
        "stats_samples=20",
        "-p",
        "steps=3",
        "-p",
        "templates=[[3, 1]]",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "torch.bfloat16" and manifest["device"] == "cpu"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ES"]["n"] == 2
    # the dtype is part of the run's identity: the same directory in float32 is refused
    again = CliRunner().invoke(app, [a for a in args if a not in ("--dtype", "bfloat16")])
    assert again.exit_code == 2 and "model" in again.output


# --- target_matmul="bfloat16": the target optimisation's products in bfloat16 (issue 20) ---


def _linears(bundle, first):
    adapter = bundle.adapter
    found = [
        m
        for i in range(first, adapter.n_layers)
        for m in adapter.module(bundle.model, "layer", i).modules()
        if isinstance(m, torch.nn.Linear)
    ]
    head = adapter.unembedding(bundle.model)
    return found + ([head] if isinstance(head, torch.nn.Linear) and head not in found else [])


def test_linear_precision_casts_products_only_inside_and_restores_exactly(tiny):
    """Inside ``linear_precision`` the linear layers of blocks >= first and the vocabulary projection
    multiply in bfloat16 (outputs close to, not equal to, float32), gradients reach the input, the lower
    blocks and the weights are untouched, and on exit the forward is bit-identical to before."""
    from attnedit.core.interventions import linear_precision

    bundle = tiny
    ids = torch.randint(3, 300, (2, 7))
    model = bundle.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    expected = _linears(bundle, 1)
    with linear_precision(model, bundle.adapter, 1, torch.bfloat16) as n:
        assert n == len(expected)  # GPT-2's Conv1D blocks: only the head is an nn.Linear
        below = [
            m for m in bundle.adapter.module(model, "layer", 0).modules() if isinstance(m, torch.nn.Linear)
        ]
        assert all("forward" not in m.__dict__ for m in below)
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        inside = model(inputs_embeds=x).logits
        inside.square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert inside.dtype == before.dtype
        error = ((inside.detach() - before).norm() / before.norm()).item()
        assert 0 < error < 0.05
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(after, before)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in expected)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_bfloat16_target_products_keep_the_initial_outputs_and_nearly_the_targets(tiny_dir, method):
    """With ``target_matmul="bfloat16"`` the targets start from the same initial module outputs (read in
    the model's precision: bit-equal) and end close to the float32 ones. At "model" nothing changes (the
    float32 path, bit-identical on repeat)."""
    from attnedit.editing.base import method_templates, target_settings
    from attnedit.editing.optimise import optimise_targets

    bundle = load_model(str(tiny_dir))
    case = load_cases("sample").cases[0]
    params = RomeParams(layers=[1], **COMMON) if method == "rome" else MemitParams(layers=[0, 1], **COMMON)
    templates = method_templates(bundle, params)
    site = Site("mlp", 1) if method == "rome" else Site("layer", 1)  # each method's injection
    results = {}
    for matmul in ("model", "bfloat16", "model"):
        params.target_matmul = matmul
        results.setdefault(matmul, []).append(
            optimise_targets(bundle, [case.request], templates, [site], target_settings(params))
        )
    fp32, again, bf16 = results["model"][0], results["model"][1], results["bfloat16"][0]
    assert torch.equal(fp32.delta[site], again.delta[site])  # the default path is unchanged and repeatable
    assert torch.equal(bf16.init[site], fp32.init[site])
    assert not torch.equal(bf16.delta[site], fp32.delta[site])
    error = (bf16.target(site) - fp32.target(site)).norm() / fp32.target(site).norm()
    assert error < 0.1, float(error)


def test_target_matmul_is_checked_and_recorded_only_when_set():
    from attnedit.editing.presets import PresetError, params_dict
    from attnedit.editing.registry import make_params

    with pytest.raises(PresetError, match="target_matmul"):
        make_params("rome", {"params": {"layers": [1]}}, {"target_matmul": "fp8"})
    default = make_params("rome", {"params": {"layers": [1]}})
    assert "target_matmul" not in params_dict(default)  # earlier runs' manifests keep their identity
    low = make_params("memit", {"params": {"layers": [1]}}, {"target_matmul": "bfloat16"})
    assert params_dict(low)["target_matmul"] == "bfloat16"


def test_an_unknown_matmul_setting_is_refused_before_any_work(tiny):
    from attnedit.editing.optimise import TargetSettings, optimise_targets

    case = load_cases("sample").cases[0]
    with pytest.raises(ValueError, match="float8"):
        optimise_targets(tiny, [case.request], ["{}"], [Site("mlp", 1)], TargetSettings(matmul="float8"))
