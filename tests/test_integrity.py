"""Saved edits and caches prove their integrity (issue 15, item 2): a saved edit is re-applied only to
the requests it was computed for, and a damaged file is named, never used silently."""

from __future__ import annotations

import logging
from pathlib import Path

from attnedit.evaluation.evaluator import EvalConfig
from attnedit.runs.rundir import RESULTS, read_results
from attnedit.runs.runner import RunConfig, run

PRESET = Path(__file__).parents[1] / "src/attnedit/resources/presets/memit/smollm2-135m.json"



def _memit(out: Path, model: Path, corpus: Path, **kw) -> RunConfig:
    params = {"layers": "0,1", "stats_corpus": str(corpus), "stats_samples": "20", "steps": "3"}
    return RunConfig(
        data="sample",
        out=str(out),
        model=str(model),
        method="memit",
        preset=str(PRESET),
        params=params,
        eval=EvalConfig(fluency=False),
        **kw,
    )


def _records(out: Path) -> dict[str, dict]:
    return {r["case_id"]: r for r in read_results(out / RESULTS)}


def test_an_extended_save_edits_run_never_reapplies_another_cases_edit(
    tmp_path, tiny_dir, corpus_file, caplog
):
    out = tmp_path / "run"
    run(_memit(out, tiny_dir, corpus_file, first=0, limit=1, save_edits=True), progress=False)
    saved = out / "edits" / "00000.safetensors"
    assert saved.is_file()
    # the same run extended to case 1: position 0 of the new range is case 1, whose edit differs
    with caplog.at_level(logging.WARNING, logger="attnedit.runs.runner"):
        run(_memit(out, tiny_dir, corpus_file, first=1, limit=1, save_edits=True), progress=False)
    fresh = tmp_path / "fresh"
    run(_memit(fresh, tiny_dir, corpus_file, first=1, limit=1), progress=False)
    extended, alone = _records(out)["1"], _records(fresh)["1"]
    assert extended["comparisons"] == alone["comparisons"]  # scored with its own edit
    assert "other requests" in caplog.text and "00000.safetensors" in caplog.text
    # case 0's edit is set aside, never applied to case 1; case 1's own edit is saved in its place
    from attnedit.core.data import load_cases
    from attnedit.core.deltas import WeightEdit

    cases = load_cases("sample").cases
    assert WeightEdit.load(out / "edits" / "00000.safetensors.bad").requests == [cases[0].request]
    assert WeightEdit.load(saved).requests == [cases[1].request]
    # resumed once more on the same range: the matching saved edit is re-applied, nothing is set aside
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attnedit.runs.runner"):
        run(_memit(out, tiny_dir, corpus_file, first=1, limit=1, save_edits=True), progress=False)
    assert "other requests" not in caplog.text
