"""``attnedit analyze``: every subcommand end to end through the CLI on a tiny Llama saved to disk, and
one analysis run called directly (``runs.analysis_runs``, as a non-CLI caller does)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from typer.testing import CliRunner

from attnedit.analysis import drift, tracing
from attnedit.analysis.aggregate import POSITIONS, aligned, token_positions, trace_aggregate
from attnedit.analysis.engine import json_ready
from attnedit.cli.main import app
from attnedit.runs.analyses import CASES, Setting
from attnedit.runs.analysis_runs import PatchOptions, TraceOptions, run_trace

PRESET = str(ROOT / "src/attnedit/resources/presets/rome/smollm2-135m.json")
N_LAYERS = 3  # helpers.tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from helpers import CORPUS

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(CORPUS))
    return path


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    """One statistics cache for the module (ROME's covariance is computed once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNEDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _edit_args(corpus: Path) -> list[str]:
    params = ["layers=0", f"stats_corpus={corpus}", "stats_samples=20", "steps=3", "templates=[[3,1]]"]
    return ["--method", "rome", "--preset", PRESET, *[x for p in params for x in ("-p", p)]]


def _invoke(command: str, out: Path, model: Path, *extra: str, limit: int = 2):
    args = ["analyze", command, "sample", "--model", str(model), "--out", str(out), "--threads", "1"]
    result = CliRunner().invoke(app, [*args, "--limit", str(limit), *extra])
    return result


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / CASES).read_text().splitlines()]


def _common(out: Path, name: str, figures: list[str]) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["analysis"] == name and manifest["seed"] == 0 and manifest["limit"] == 2
    assert manifest["model"]["fingerprint"] and len(manifest["data"]["sha256"]) == 64
    result = json.loads((out / f"{name}.json").read_text())
    assert set(result) >= {"analysis", "n_cases", "positions", "aggregate", "figures", "cases"}
    assert result["n_cases"] == 2 and [c["case_id"] for c in result["cases"]] == ["0", "1"]
    assert result["figures"] == figures
    for figure in figures:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["case_id"] for r in _lines(out)] == ["0", "1"]
    return result


def test_token_positions_align_like_rome():
    # tokens: 0 prefix, 1-3 subject, 4 first after, 5-6 further, 7 last
    assert token_positions(8, 1, 3) == [[1], [2], [3], [4], [5, 6], [7]]
    assert token_positions(4, 1, 2) == [[1], [], [2], [], [], [3]]  # first subsequent is the last token
    assert token_positions(3, -1, -1) == [[], [], [], [], [0, 1], [2]]
    grid = aligned(np.arange(16.0).reshape(2, 8), 1, 3)
    assert grid.shape == (len(POSITIONS), 2)
    assert grid[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.5, 7.0]


def test_trace_writes_figures_and_resumes(tmp_path, tiny_dir, monkeypatch):
    out = tmp_path / "trace"
    extra = ("--samples", "2", "--window", "2")
    _ok(_invoke("trace", out, tiny_dir, *extra))
    result = _common(out, "trace", ["trace_heatmaps.png", "trace_layers.png"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "none" and manifest["options"]["windows"] == {
        "layer": 1,
        "mlp": 2,
        "attn": 2,
    }
    agg = result["aggregate"]
    for kind in ("layer", "mlp", "attn"):
        assert np.array(agg["indirect_effect"][kind], dtype=float).shape == (len(POSITIONS), N_LAYERS)
        assert len(agg["layer_effects"][kind]) == N_LAYERS
    case = result["cases"][0]
    assert np.array(case["restored"]["mlp"]).shape == (N_LAYERS, len(case["tokens"]))

    # resume: drop the last case, count the traces of the rerun
    lines = (out / CASES).read_text().splitlines(keepends=True)
    (out / CASES).write_text(lines[0] + lines[1][:10])  # plus a torn line
    calls = []
    original = tracing.causal_trace
    monkeypatch.setattr(tracing, "causal_trace", lambda *a, **k: calls.append(1) or original(*a, **k))
    _ok(_invoke("trace", out, tiny_dir, *extra))
    assert len(calls) == 2  # case 1 only: one call per window (1 for layer, 2 for mlp and attn)
    assert [r["case_id"] for r in _lines(out)] == ["0", "1"]
    assert _lines(out)[0] == json.loads(lines[0])

    # another setting in the same directory is refused
    refused = _invoke("trace", out, tiny_dir, "--samples", "3", "--window", "2")
    assert refused.exit_code == 2 and "samples" in refused.output

    # a longer case range continues the run: only the new case is traced, all three are aggregated
    calls.clear()
    _ok(_invoke("trace", out, tiny_dir, *extra, limit=3))
    assert len(calls) == 2 and [r["case_id"] for r in _lines(out)] == ["0", "1", "2"]
    assert json.loads((out / "trace.json").read_text())["n_cases"] == 3
    assert json.loads((out / "manifest.json").read_text())["limit"] == 3
    _ok(_invoke("trace", out, tiny_dir, *extra, limit=1))  # a shorter one aggregates only its cases
    assert len(calls) == 2 and json.loads((out / "trace.json").read_text())["n_cases"] == 1


def test_substitute(tmp_path, tiny_dir, corpus):
    out = tmp_path / "substitute"
    args = (*_edit_args(corpus), "--window", "2", "--kinds", "attn,mlp")
    _ok(_invoke("substitute", out, tiny_dir, *args))
    result = _common(out, "substitute", ["substitute_attn.png", "substitute_mlp.png"])
    agg = result["aggregate"]
    assert agg["n_prompts"] == {"DNS": 8, "RS": 2}  # 4 neighbours and 1 relation per case
    for kind in ("attn", "mlp"):
        for task in ("DNS", "RS"):
            for target in ("o_true", "o_edit"):
                grid = np.array(agg["effects"][kind][task][target], dtype=float)
                assert grid.shape == (len(POSITIONS), N_LAYERS)
    case = result["cases"][0]
    first = np.array(case["values"]["attn"][0])
    assert first.shape == (N_LAYERS, len(case["tokens"][0]), 2)
    assert case["subject_tokens"][0][0] >= 0  # the subject is in the distracted prompt's edit sentence
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "rome" and manifest["hyperparameters"]["layers"] == [0]
    _ok(_invoke("substitute", out, tiny_dir, *args))  # everything done: nothing recomputed
    assert len(_lines(out)) == 2


def test_drift(tmp_path, tiny_dir, corpus):
    out = tmp_path / "drift"
    _ok(_invoke("drift", out, tiny_dir, *_edit_args(corpus)))
    result = _common(out, "drift", ["drift_kl.png"])
    agg = result["aggregate"]
    assert set(agg["correlations"]) == {"DNS", "RS"}
    for task in ("DNS", "RS"):
        assert set(agg["correlations"][task]) == set(drift.FACTORS)
        for corr in agg["correlations"][task].values():
            assert set(corr) == {"r", "p", "n"}
    assert agg["correlations"]["DNS"]["kl"]["n"] == 8
    assert agg["correlations"]["DNS"]["kl"]["r"] is not None
    table = (out / "drift_correlations.md").read_text()
    assert "| kl |" in table and "Distract-Neighborhood r" in table
    case = result["cases"][0]
    assert len(case["factors"]["kl"]) == len(case["prompts"]) == 5
    assert np.array(case["kl_per_layer"]).shape == (5, N_LAYERS)
    assert np.array(case["p_edited"]).shape == (5, 2)


def _squeezed(output: str) -> str:
    """Log output without whitespace (rich wraps long lines)."""
    return "".join(output.split())


def test_errors_name_the_case_or_record(tmp_path, tiny_dir, corpus, monkeypatch):
    record = json.loads((ROOT / "src/attnedit/resources/sample_counterfact.json").read_text())[0]
    record["l-neighbor"]["targets"][0] = " "
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([record]))
    args = ["analyze", "drift", str(data), "--model", str(tiny_dir), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--threads", "1", *_edit_args(corpus)])
    assert result.exit_code == 2 and "l-neighbor.targets" in _squeezed(result.output)

    def fail(*args, **kwargs):
        raise ValueError("cannot record this one")

    monkeypatch.setattr(drift, "record_last_token_attention", fail)
    result = _invoke("drift", tmp_path / "d", tiny_dir, *_edit_args(corpus), "--first", "3", limit=1)
    assert result.exit_code == 2
    assert "case3(sample_counterfact.json#3):cannotrecordthisone" in _squeezed(result.output)
    assert "--drift-layers" in _squeezed(
        _invoke("drift", tmp_path / "e", tiny_dir, *_edit_args(corpus), "--drift-layers", "0-9").output
    )


def test_patch_with_scores(tmp_path, tiny_dir, corpus):
    out = tmp_path / "patch"
    _ok(_invoke("patch", out, tiny_dir, *_edit_args(corpus), "--window", "2", "--scores"))
    result = _common(out, "patch", ["patch_curves.png", "patch_scores.png"])
    agg = result["aggregate"]
    for task in ("DNS", "RS"):
        for target in ("o_true", "o_edit"):
            assert len(agg["curves"][task][target]) == N_LAYERS
            assert 0.0 <= agg["p_edited"][task][target] <= 1.0
            assert 0.0 <= agg["p_unedited"][task][target] <= 1.0
            grid = np.array(agg["scores"][task][target], dtype=float)
            assert grid.shape == (len(POSITIONS), N_LAYERS)
    case = result["cases"][0]
    assert np.array(case["curves"]).shape == (5, N_LAYERS, 2)
    assert np.array(case["scores"][0]).shape == (N_LAYERS, len(case["tokens"][0]), 2)


def test_run_trace_without_the_cli(tmp_path, tiny_dir):
    """``run_trace`` as a library call: its record of a case is that case's causal trace, and NAME.json
    holds the aggregate of its records (recomputable from them without the model)."""
    from attnedit.core.data import load_cases
    from attnedit.core.models import load_model

    with pytest.raises(ValueError, match="--samples"):
        TraceOptions(samples=0)
    with pytest.raises(ValueError, match="--queries"):
        PatchOptions(queries="first")
    out = tmp_path / "trace"
    with pytest.raises(ValueError, match="unedited model"):
        run_trace(Setting("sample", str(tiny_dir), out, limit=1, method="rome"), TraceOptions())

    options = TraceOptions(kinds=("mlp", "attn"), window=2, samples=2)
    result = run_trace(Setting("sample", str(tiny_dir), out, first=1, limit=1, seed=5), options)
    assert result.analysis == "trace" and result.path == out / "trace.json" and result.n_cases == 1
    assert result.figures == (out / "trace_heatmaps.png", out / "trace_layers.png")
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in result.figures)
    saved = json.loads(result.path.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["options"] == {
        "kinds": ["mlp", "attn"],
        "windows": {"mlp": 2, "attn": 2},
        "samples": 2,
        "noise": None,
    }
    [record] = saved["cases"]
    assert record["case_id"] == "1" and _lines(out) == [record]

    # the record is the case's causal trace with the run's seed (both kinds share one window: one trace)
    case = load_cases("sample").cases[1].request
    bundle = load_model(str(tiny_dir))
    trace = tracing.causal_trace(
        bundle, case.prompt, case.subject, case.target_true, ["mlp", "attn"], 2, None, 2, 5
    )
    assert record["restored"] == json_ready(trace.restored)
    assert record["corrupted"] == trace.corrupted and record["clean"] == trace.clean

    # the aggregate is the records' aggregate
    expected = json_ready(trace_aggregate([record], options.kinds, N_LAYERS))
    assert saved["aggregate"] == expected
    assert set(expected["indirect_effect"]) == {"mlp", "attn"}


def test_repair_moves_unreadable_lines_aside_and_keeps_every_record(tmp_path, tiny_dir):
    """A corrupted middle line of cases.jsonl stops the rerun (exit 2, naming the line and --repair); with
    --repair it moves to the quarantine file, every valid record is kept and none is recomputed."""
    out = tmp_path / "trace"
    extra = ("--samples", "2", "--kinds", "layer")
    _ok(_invoke("trace", out, tiny_dir, *extra, limit=3))
    lines = (out / CASES).read_text().splitlines(keepends=True)
    (out / CASES).write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    refused = _invoke("trace", out, tiny_dir, *extra, limit=3)
    assert refused.exit_code == 2 and "line 2" in refused.output and "--repair" in refused.output
    _ok(_invoke("trace", out, tiny_dir, *extra, "--repair", limit=3))
    assert (out / (CASES + ".quarantine")).read_text() == "{not json\n"
    assert [r["case_id"] for r in _lines(out)] == ["0", "1", "2"]
    assert [json.loads(x) for x in lines] == _lines(out)  # the valid records, untouched


def test_analysis_records_carry_provenance_and_mixed_ones_are_refused(tmp_path, tiny_dir):
    """Each record of cases.jsonl says what it was computed with (method, hyper-parameter hash, request
    hash), as evaluation records do; a record of another request under a case id stops the rerun (exit 2,
    naming the line and the key) and the file is left as it was."""
    out = tmp_path / "trace"
    extra = ("--samples", "2", "--kinds", "layer")
    _ok(_invoke("trace", out, tiny_dir, *extra, limit=2))
    records = _lines(out)
    assert {r["method"] for r in records} == {"none"}  # tracing analyses the unedited model
    assert len({r["hparams_hash"] for r in records}) == 1
    assert len({r["request_hash"] for r in records}) == 2
    lines = (out / CASES).read_text().splitlines(keepends=True)
    foreign = {**records[1], "request_hash": "fedcba9876543210"}
    (out / CASES).write_text(lines[0] + json.dumps(foreign) + "\n")
    before = (out / CASES).read_bytes()
    refused = _invoke("trace", out, tiny_dir, *extra, limit=3)
    assert refused.exit_code == 2
    assert "line 2" in refused.output and "request_hash" in _squeezed(refused.output)
    assert (out / CASES).read_bytes() == before
