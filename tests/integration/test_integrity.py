"""Saved edits and caches prove their integrity (issue 15, item 2): a saved edit is re-applied only to
the requests it was computed for, and a damaged file is named, never used silently."""

from __future__ import annotations

import logging
from pathlib import Path

from helpers import tiny_run

from attnedit.runs.config import RunConfig
from attnedit.runs.rundir import RESULTS, read_results
from attnedit.runs.runner import run
from attnedit.runs.saved_edits import group_edit_path


def _memit(out: Path, model: Path, corpus: Path, **kw) -> RunConfig:
    return tiny_run(out, model, corpus, **kw)


def _records(out: Path) -> dict[str, dict]:
    return {r["case_id"]: r for r in read_results(out / RESULTS)}


def test_an_extended_save_edits_run_never_reapplies_another_cases_edit(
    tmp_path, tiny_dir, corpus_file, caplog
):
    from attnedit.core.data import load_cases
    from attnedit.core.deltas import WeightEdit

    cases = load_cases("sample").cases
    out = tmp_path / "run"
    run(_memit(out, tiny_dir, corpus_file, first=0, limit=1, save_edits=True), progress=False)
    first = group_edit_path(out, [cases[0]])
    assert sorted((out / "edits").iterdir()) == [first]
    # the same run extended to case 1 (position 0 of the new range): case 1 gets its own edit, and case
    # 0's saved edit is kept beside it (files are named by their requests, not by position)
    with caplog.at_level(logging.WARNING, logger="attnedit.runs.saved_edits"):
        run(_memit(out, tiny_dir, corpus_file, first=1, limit=1, save_edits=True), progress=False)
    assert "other requests" not in caplog.text
    second = group_edit_path(out, [cases[1]])
    assert sorted((out / "edits").iterdir()) == sorted([first, second])
    assert WeightEdit.load(first).requests == [cases[0].request]
    assert WeightEdit.load(second).requests == [cases[1].request]
    fresh = tmp_path / "fresh"
    run(_memit(fresh, tiny_dir, corpus_file, first=1, limit=1), progress=False)
    extended, alone = _records(out)["1"], _records(fresh)["1"]
    assert extended["comparisons"] == alone["comparisons"]  # scored with its own edit

    # an edit of other requests under case 1's name (copied there): set aside, never applied
    (out / "results.jsonl").write_text("")
    first_bytes = first.read_bytes()
    second.write_bytes(first_bytes)
    with caplog.at_level(logging.WARNING, logger="attnedit.runs.saved_edits"):
        run(_memit(out, tiny_dir, corpus_file, first=1, limit=1, save_edits=True), progress=False)
    assert "other requests" in caplog.text and second.name in caplog.text
    aside = second.with_name(second.name + ".bad")
    assert aside.read_bytes() == first_bytes and WeightEdit.load(second).requests == [cases[1].request]
    assert _records(out)["1"]["comparisons"] == alone["comparisons"]
