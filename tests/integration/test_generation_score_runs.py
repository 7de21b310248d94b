"""The generation scores in runs: on by default (the unedited model's baseline too), switched off by the
flag, run directories made before them resume (their manifests imply the score off) and report ``-``,
shards merge, ``--against`` pairs them, the API's record carries them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnedit.cli.main import app
from attnedit.evaluation.evaluator import EvalConfig
from attnedit.runs.config import RunConfig, Shard
from attnedit.runs.report import collect, columns, markdown_table, paired
from attnedit.runs.rundir import MANIFEST, RESULTS, RunConflictError, read_results
from attnedit.runs.runner import run


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """torch on one thread for this module."""


def _config(out: Path, model: Path, **kw) -> RunConfig:
    kw.setdefault("eval", EvalConfig(fluency=False))
    return RunConfig(data="sample", out=str(out), model=str(model), **kw)


def _as_made_before_the_score(out: Path) -> None:
    """Rewrite a run directory as one made before the generation score: no manifest field, no record
    keys (what a run with the score off writes, bar the manifest field)."""
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["eval"].pop("generation_score") is False
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert all("generation_score" not in r for r in read_results(out / RESULTS))


def _table_cells(rows, cols) -> dict[str, dict[str, str]]:
    lines = markdown_table(rows, cols).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells, strict=True))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def test_every_run_scores_generation_by_default_the_unedited_model_too(tmp_path, tiny_dir):
    summary = run(_config(tmp_path / "none", tiny_dir, limit=3), progress=False)
    manifest = json.loads((tmp_path / "none" / MANIFEST).read_text())
    assert manifest["method"] == "none" and manifest["eval"]["generation_score"] is True
    records = read_results(tmp_path / "none" / RESULTS)
    for record in records:
        assert set(record["generation_score"]) == {"GES", "GPS"}
        for key, hits in record["generation_score"].items():
            assert set(hits) <= {0.0, 1.0} and len(record["generated_answers"][key]) == len(hits)
        assert len(record["generation_score"]["GES"]) == len(record["comparisons"]["ES"]["right_nll"])
        assert len(record["generation_score"]["GPS"]) == len(record["comparisons"]["PS"]["right_nll"])
    # the inspector's runs browser shows each record's own generation scores
    from attnedit.serve.runs_browser import case_scores

    mine = case_scores(records[0])
    assert mine["GES"] == sum(records[0]["generation_score"]["GES"]) / len(
        records[0]["generation_score"]["GES"]
    )
    on_disk = json.loads((tmp_path / "none" / "summary.json").read_text())
    for name in ("GES", "GPS"):
        assert on_disk[name] == json.loads(json.dumps(summary[name])) and on_disk[name]["n"] == 3
    # switched off: the same existing metrics, no generation score
    off = run(
        _config(tmp_path / "off", tiny_dir, limit=3, eval=EvalConfig(fluency=False, generation_score=False)),
        progress=False,
    )
    assert {k: v for k, v in off.items() if k not in ("GES", "GPS")} == {
        k: v for k, v in summary.items() if k not in ("GES", "GPS")
    }
    assert off["GES"] == {"mean": None, "ci95": None, "n": 0}
    assert all("generation_score" not in r for r in read_results(tmp_path / "off" / RESULTS))


def test_a_run_made_before_the_score_resumes_without_it_and_reports_a_dash(tmp_path, tiny_dir):
    old, new = tmp_path / "old", tmp_path / "new"
    without = EvalConfig(fluency=False, generation_score=False)
    run(_config(old, tiny_dir, limit=2, eval=without), progress=False)
    _as_made_before_the_score(old)
    # the default (on) is another evaluation than the run's: refused, nothing written
    with pytest.raises(RunConflictError, match="eval"):
        run(_config(old, tiny_dir, limit=3), progress=False)
    assert len(read_results(old / RESULTS)) == 2
    # continued with the score off (what its manifest implies): extended to a third case
    run(_config(old, tiny_dir, limit=3, eval=without), progress=False)
    assert [r["case_id"] for r in read_results(old / RESULTS)] == ["0", "1", "2"]
    assert all("generation_score" not in r for r in read_results(old / RESULTS))
    run(_config(new, tiny_dir, limit=3, label="new"), progress=False)
    rows = collect([old, new])
    cells = _table_cells(rows, columns(rows=rows))
    assert cells["none"]["GES"] == "-" and cells["none"]["GPS"] == "-"
    assert cells["new"]["GES"] != "-" and cells["new"]["ES"] == cells["none"]["ES"]
    # paired: GES/GPS only between runs that both have them
    assert not {"GES", "GPS"} & set(paired(rows, "none")["new"])
    assert "ES" in paired(rows, "none")["new"]


def test_an_old_shard_merges_with_a_shard_continued_since(tmp_path, tiny_dir):
    without = EvalConfig(fluency=False, generation_score=False)
    for i in range(2):
        run(_config(tmp_path / f"s{i}", tiny_dir, limit=4, shard=Shard(i, 2), eval=without), progress=False)
        _as_made_before_the_score(tmp_path / f"s{i}")
    # shard 1 is continued with today's code (its manifest now states the setting); shard 0 is not
    run(_config(tmp_path / "s1", tiny_dir, limit=4, shard=Shard(1, 2), eval=without), progress=False)
    assert json.loads((tmp_path / "s1" / MANIFEST).read_text())["eval"]["generation_score"] is False
    rows = collect([tmp_path / "s0", tmp_path / "s1"])
    assert len(rows) == 1 and rows[0].summary["_cases"] == 4 and rows[0].summary["_complete_shards"]


def test_the_cli_switch_and_the_reports_paired_generation_scores(tmp_path, tiny_dir):
    runner = CliRunner()
    outs = {}
    for label, flags in (("on", []), ("off", ["--no-generation-score"]), ("again", [])):
        out = tmp_path / label
        flags = ["--label", label, "--out", str(out), "--no-fluency", "--ppl-corpus", "none", *flags]
        result = runner.invoke(app, ["eval", "sample", "--model", str(tiny_dir), "--limit", "3", *flags])
        assert result.exit_code == 0, result.output
        assert json.loads((out / MANIFEST).read_text())["eval"]["generation_score"] is (label != "off")
        outs[label] = str(out)
    result = runner.invoke(app, ["report", *outs.values(), "--against", "on", "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("| Method | cases"))
    assert "| GES | GPS |" in header
    paired_rows = json.loads((tmp_path / "rep" / "paired.json").read_text())["rows"]
    assert paired_rows["again"]["GES"]["diff"] == 0 and paired_rows["again"]["GPS"]["diff"] == 0
    assert "GES" not in paired_rows["off"] and "ES" in paired_rows["off"]
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert paired_rows["again"]["GES"]["base"] == pytest.approx(summary["GES"]["mean"])


def test_the_api_record_has_the_generation_scores(tiny_dir):
    import attnedit

    bundle = attnedit.load_model(str(tiny_dir))
    case = attnedit.load_cases("sample")[0]
    record = attnedit.evaluate(bundle, case, fluency=False, ppl_corpus=None)
    assert len(record["generation_score"]["GES"]) == len(case.rewrite)
    assert len(record["generation_score"]["GPS"]) == len(case.paraphrase)
    off = attnedit.evaluate(bundle, case, fluency=False, ppl_corpus=None, generation_score=False)
    assert "generation_score" not in off and off["comparisons"] == record["comparisons"]
