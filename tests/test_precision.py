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
from attnedit.editing.memit import Memit
from attnedit.editing.presets import MemitParams, RomeParams
from attnedit.editing.rome import Rome
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
