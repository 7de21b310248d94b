import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ROOT, kill_after_records, tiny_run

from attnedit.core.data import load_cases
from attnedit.evaluation.evaluator import EvalConfig
from attnedit.runs.config import RunConfig, Shard
from attnedit.runs.report import collect
from attnedit.runs.rundir import (
    LOCK,
    MANIFEST,
    RESULTS,
    CorruptRecordsError,
    MixedRecordsError,
    RunConflictError,
    RunDir,
    RunLockedError,
    UnsafeRunFileError,
    read_results,
    selected_records,
)
from attnedit.runs.runner import run
from attnedit.runs.saved_edits import group_edit_path


def _config(out: Path, model: Path, **kw) -> RunConfig:
    return RunConfig(data="sample", out=str(out), model=str(model), eval=EvalConfig(fluency=False), **kw)


def _ids(out: Path) -> list[str]:
    return [r["case_id"] for r in read_results(out / RESULTS)]


def test_run_writes_manifest_results_summary(tmp_path, tiny_dir):
    summary = run(_config(tmp_path, tiny_dir, limit=4), progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == "none" and manifest["seed"] == 0
    assert len(manifest["data"]["sha256"]) == 64
    assert manifest["attnedit_version"] and manifest["model"]["fingerprint"]
    assert _ids(tmp_path) == ["0", "1", "2", "3"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in (
        "ES",
        "EM",
        "PS",
        "PM",
        "NS",
        "NM",
        "RS",
        "RM",
        "DNS",
        "DNM",
        "DRS",
        "RES",
        "ALIAS",
        "OS",
        "DOS",
        "FL",
        "PPL",
        "AvgS",
    ):
        assert set(on_disk[key]) == {"mean", "ci95", "n"}
    assert on_disk["ES"]["n"] == 4


def test_resume_skips_done_and_repairs_torn_line(tmp_path, tiny_dir):
    run(_config(tmp_path, tiny_dir, limit=3), progress=False)
    results = tmp_path / RESULTS
    lines = results.read_text().splitlines(keepends=True)
    # an interrupted run: two complete lines, then half of the third
    results.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    run(_config(tmp_path, tiny_dir, limit=3), progress=False)
    assert _ids(tmp_path) == ["0", "1", "2"]
    assert results.read_text().count("\n") == 3


def test_records_carry_provenance_and_mixed_ones_are_refused_on_resume(tmp_path, tiny_dir):
    run(_config(tmp_path, tiny_dir, limit=3), progress=False)
    results = tmp_path / RESULTS
    records = read_results(results)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert {r["method"] for r in records} == {manifest["method"]}
    assert len({r["hparams_hash"] for r in records}) == 1
    assert len({r["request_hash"] for r in records}) == 3  # three different requests
    # a record computed with other hyper-parameters, planted as the second line: refused, naming it
    lines = results.read_text().splitlines(keepends=True)
    foreign = {**records[1], "hparams_hash": "0123456789abcdef"}
    results.write_text(lines[0] + json.dumps(foreign) + "\n" + lines[2])
    before = results.read_bytes()
    with pytest.raises(MixedRecordsError, match=r"line 2 \(case '1'\).*hparams_hash '0123456789abcdef'"):
        run(_config(tmp_path, tiny_dir, limit=3), progress=False)
    assert results.read_bytes() == before  # nothing cut or added
    # a record of another request under this case id: refused the same way
    foreign = {**records[1], "request_hash": "fedcba9876543210"}
    results.write_text(lines[0] + json.dumps(foreign) + "\n" + lines[2])
    with pytest.raises(MixedRecordsError, match="request_hash"):
        run(_config(tmp_path, tiny_dir, limit=3), progress=False)
    # records older than the provenance keys are accepted (the manifest identity vouched for them)
    newer = ("method", "hparams_hash", "request_hash")
    old = [{k: v for k, v in r.items() if k not in newer} for r in records]
    results.write_text("".join(json.dumps(r) + "\n" for r in old[:2]))
    run(_config(tmp_path, tiny_dir, limit=3), progress=False)
    assert _ids(tmp_path) == ["0", "1", "2"]


def test_limit_below_one_is_refused_by_the_config(tmp_path, tiny_dir):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="--limit must be at least 1"):
            _config(tmp_path, tiny_dir, limit=bad)


def test_conflicting_settings_refused(tmp_path, tiny_dir):
    run(_config(tmp_path, tiny_dir, limit=2), progress=False)
    with pytest.raises(RunConflictError, match="seed"):
        run(_config(tmp_path, tiny_dir, limit=2, seed=1), progress=False)


def test_shards_merge_to_the_full_run(tmp_path, tiny_dir):
    full = run(_config(tmp_path / "full", tiny_dir, limit=7), progress=False)
    for i in range(3):
        run(_config(tmp_path / f"s{i}", tiny_dir, limit=7, shard=Shard(i, 3)), progress=False)
    shard_ids = [_ids(tmp_path / f"s{i}") for i in range(3)]
    assert [i for ids in shard_ids for i in ids] == [str(i) for i in range(7)]
    rows = collect([tmp_path / f"s{i}" for i in range(3)])
    assert len(rows) == 1 and rows[0].summary["_complete_shards"]
    for key in ("ES", "NS", "DNS", "EM", "DNM", "AvgS"):
        assert rows[0].summary[key]["mean"] == pytest.approx(full[key]["mean"])
    with pytest.raises(ValueError, match="shard"):
        collect([tmp_path / "s0", tmp_path / "s0"])


def test_report_warns_on_unfinished_runs_and_other_data_and_tells_rows_apart(tmp_path, tiny_dir, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    run(_config(a, tiny_dir, limit=3), progress=False)
    run(_config(b, tiny_dir, limit=3, first=1), progress=False)  # same label, other range: two rows
    with caplog.at_level("WARNING", logger="attnedit.runs.report"):
        rows = collect([a, b])
    assert sorted(r.label for r in rows) == ["none [a]", "none [b]"]
    assert not caplog.records  # finished runs on the same data: nothing to warn about
    # b loses its last record (an unfinished run) and claims other data
    results = b / RESULTS
    results.write_text("".join(results.read_text().splitlines(keepends=True)[:2]))
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["data"]["sha256"] = "f" * 64
    (b / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="attnedit.runs.report"):
        rows = collect([a, b])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert any("unfinished run: 2 of the 3 cases" in m and str(b) in m for m in messages)
    assert any("different data files" in m and "ffffffffffff: none [b]" in m for m in messages)
    assert {r.label: r.summary["_cases"] for r in rows} == {"none [a]": 3, "none [b]": 2}


def test_first_selects_a_case_range(tmp_path, tiny_dir):
    full = tmp_path / "full"
    run(_config(full, tiny_dir, limit=6), progress=False)
    part = tmp_path / "part"
    run(_config(part, tiny_dir, first=2, limit=3), progress=False)
    assert _ids(part) == _ids(full)[2:5]
    for a, b in zip(read_results(full / RESULTS)[2:5], read_results(part / RESULTS), strict=True):
        assert a["comparisons"] == b["comparisons"]
    assert json.loads((part / "manifest.json").read_text())["first"] == 2
    with pytest.raises(ValueError, match="--first"):
        _config(part, tiny_dir, first=-1)


def test_single_mode_run_extends_to_another_case_range(tmp_path, tiny_dir):
    run_dir = tmp_path / "run"
    run(_config(run_dir, tiny_dir, first=2, limit=3), progress=False)
    created = json.loads((run_dir / "manifest.json").read_text())["created"]
    # cases 3 and 4 are reused, only case 5 is computed; the summary and reports cover 3..5 only
    extended = run(_config(run_dir, tiny_dir, first=3, limit=3), progress=False)
    assert _ids(run_dir) == ["2", "3", "4", "5"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert (manifest["first"], manifest["case_ids"], manifest["created"]) == (3, ["3", "4", "5"], created)
    assert [r["case_id"] for r in selected_records(run_dir)] == ["3", "4", "5"]
    fresh = run(_config(tmp_path / "fresh", tiny_dir, first=3, limit=3), progress=False)
    (row,) = collect([run_dir])
    for key in ("ES", "NS", "DNS", "EM", "DNM", "AvgS"):
        assert extended[key] == fresh[key]
        assert row.summary[key] == fresh[key]
    assert row.summary["_cases"] == 3
    # extended backwards: case 1 is written after 2..5, yet summary and report pool in case order
    back = run(_config(run_dir, tiny_dir, first=1, limit=5), progress=False)
    assert _ids(run_dir) == ["2", "3", "4", "5", "1"]
    fresh = run(_config(tmp_path / "fresh15", tiny_dir, first=1, limit=5), progress=False)
    (row,) = collect([run_dir])
    assert back == fresh and row.summary["AvgS"] == fresh["AvgS"]
    # a batch edit depends on which cases share it: there the range is part of the run's identity
    batch = tmp_path / "batch"
    run(_config(batch, tiny_dir, limit=4, mode="batch", batch_size=2), progress=False)
    with pytest.raises(RunConflictError, match="first"):
        run(_config(batch, tiny_dir, first=1, limit=4, mode="batch", batch_size=2), progress=False)


def test_shard_parse():
    assert Shard.parse("1/4") == Shard(1, 4)
    for bad in ("4/4", "a/b", "1", "-1/2"):
        with pytest.raises(ValueError):
            Shard.parse(bad)


@pytest.mark.smollm2
def test_kill_9_then_resume_keeps_every_case_once(tmp_path, smollm2):
    """A real ``kill -9`` of ``attnedit eval`` mid-run; the same command again completes the run."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "attnedit",
        "eval",
        "sample",
        "--out",
        str(out),
        "--limit",
        "10",
        "--no-fluency",
        "--threads",
        "1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kill_after_records(cmd, env, out / RESULTS, 3, 300)
    killed_at = len(_ids(out))
    assert 3 <= killed_at < 10
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = _ids(out)
    assert sorted(ids, key=int) == [str(i) for i in range(10)]
    assert len(ids) == len(set(ids))


def _edit_config(out: Path, model: Path, corpus: Path, **kw) -> RunConfig:
    return tiny_run(out, model, corpus, params={"templates": "[[3, 1]]"}, **kw)


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_batch_and_sequential_modes_restore_the_model(tmp_path, tiny_dir, corpus_file, mode):
    from attnedit.core.deltas import model_hash
    from attnedit.core.models import load_model

    bundle = load_model(str(tiny_dir))
    original = model_hash(bundle.model)
    out = tmp_path / mode
    run(
        _edit_config(out, tiny_dir, corpus_file, limit=5, mode=mode, batch_size=2),
        bundle=bundle,
        progress=False,
    )
    assert model_hash(bundle.model) == original
    records = read_results(out / RESULTS)
    assert sorted(r["case_id"] for r in records) == sorted(_ids(out)) and len(records) == 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == mode and manifest["hyperparameters"]["layers"] == [0, 1]
    if mode == "sequential":
        assert sorted(p.name for p in (out / "edits").iterdir()) == [f"{k:05d}.safetensors" for k in range(3)]
        assert {r["edits_applied"] for r in records} == {3}
        # a resumed sequential run re-applies the saved edits instead of recomputing them
        (out / RESULTS).write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n")
        run(
            _edit_config(out, tiny_dir, corpus_file, limit=5, mode=mode, batch_size=2),
            bundle=bundle,
            progress=False,
        )
        again = read_results(out / RESULTS)
        assert len(again) == 5
        for old, new in zip(records[2:], again[2:], strict=True):
            assert old["case_id"] == new["case_id"] and old["comparisons"] == new["comparisons"]
        assert model_hash(bundle.model) == original
    else:
        assert {r["edit"]["steps"] for r in records} <= {0, 1, 2}


def test_interrupted_batch_run_reapplies_its_saved_edit(tmp_path, tiny_dir, corpus_file, monkeypatch):
    from attnedit.core.deltas import model_hash
    from attnedit.core.models import load_model
    from attnedit.editing.methods import memit
    from attnedit.evaluation import evaluator as evaluation

    bundle = load_model(str(tiny_dir))
    original = model_hash(bundle.model)
    clean = tmp_path / "clean"
    run(
        _edit_config(clean, tiny_dir, corpus_file, limit=4, mode="batch", batch_size=4),
        bundle=bundle,
        progress=False,
    )
    expected = read_results(clean / RESULTS)
    assert not (clean / "edits").exists() or not any((clean / "edits").iterdir())

    out = tmp_path / "interrupted"
    real = evaluation.Evaluator.score_many
    calls = []

    def fail_on_third(self, cases, references=None):  # batch mode scores its cases one by one
        calls.extend(case.case_id for case in cases)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, cases, references)

    monkeypatch.setattr(evaluation.Evaluator, "score_many", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(
            _edit_config(out, tiny_dir, corpus_file, limit=4, mode="batch", batch_size=4),
            bundle=bundle,
            progress=False,
        )
    assert model_hash(bundle.model) == original
    saved = group_edit_path(out, load_cases("sample").cases[:4])
    assert saved.is_file() and len(read_results(out / RESULTS)) == 2
    # the targets' group checkpoint served the edit and went once the edit was saved
    assert not saved.with_name(saved.stem + ".targets").exists()

    monkeypatch.setattr(evaluation.Evaluator, "score_many", real)

    def no_recompute(self, bundle, cases):
        raise AssertionError("the saved batch edit must be re-applied, not recomputed")

    monkeypatch.setattr(memit.Memit, "apply", no_recompute)
    run(
        _edit_config(out, tiny_dir, corpus_file, limit=4, mode="batch", batch_size=4),
        bundle=bundle,
        progress=False,
    )
    records = read_results(out / RESULTS)
    assert [r["case_id"] for r in records] == [r["case_id"] for r in expected]
    for old, new in zip(expected, records, strict=True):
        assert old["comparisons"] == new["comparisons"]
    assert not saved.exists()
    assert model_hash(bundle.model) == original


def test_a_batch_run_stopped_in_its_target_optimisation_resumes_the_finished_groups(
    tmp_path, tiny_dir, corpus_file
):
    """A batch edit's targets are kept group by group (``edits/HASH.targets/``) until the edit
    is saved: a run stopped during the third group optimises only the last two when resumed, and its
    records equal an uninterrupted run's."""
    from attnedit.core.models import load_model
    from attnedit.editing.adam import on_step

    bundle = load_model(str(tiny_dir))

    def config(out: Path) -> RunConfig:
        c = _edit_config(out, tiny_dir, corpus_file, limit=4, mode="batch", batch_size=4)
        c.params["max_rows"] = "3"  # 2 templates + the KL prompt: one request per group, 4 groups
        return c

    clean = tmp_path / "clean"
    run(config(clean), bundle=bundle, progress=False)
    out = tmp_path / "stopped"
    starts: list[int] = []

    def stop_in_third_group(what: str, step: int, *_: object) -> None:
        if step == 0:
            starts.append(step)
            if len(starts) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), on_step(stop_in_third_group):
        run(config(out), bundle=bundle, progress=False)
    assert len(list((out / "edits").glob("*.targets/*.safetensors"))) == 2
    starts.clear()
    with on_step(lambda what, step, *_: starts.append(step) if step == 0 else None):
        run(config(out), bundle=bundle, progress=False)
    assert len(starts) == 2  # groups 1 and 2 came from the checkpoint
    resumed, expected = read_results(out / RESULTS), read_results(clean / RESULTS)
    assert [r["comparisons"] for r in resumed] == [r["comparisons"] for r in expected]
    assert not list((out / "edits").glob("*.targets"))


def test_runs_sharing_a_targets_cache_reuse_identical_targets(tmp_path, tiny_dir, corpus_file):
    """--targets-cache: IntAttn-Edit after MEMIT on the same batch takes MEMIT's targets from the shared
    directory (no optimisation step runs) and writes the records of an IntAttn-Edit run without it; the
    cache is kept, recorded in the manifest, and not part of the run's identity."""
    from attnedit.core.models import load_model
    from attnedit.editing.adam import on_step

    bundle = load_model(str(tiny_dir))
    presets = ROOT / "src/attnedit/resources/presets"
    cache = tmp_path / "targets"

    def config(out: Path, method: str, shared: Path | None) -> RunConfig:
        cache_dir = None if shared is None else str(shared)
        c = _edit_config(out, tiny_dir, corpus_file, limit=4, mode="batch", batch_size=4)
        c.targets_cache = cache_dir
        c.method = method
        if method == "intattn":
            c.preset = str(presets / "intattn/smollm2-135m.json")
            c.params.update(attn_layers="0,1", alpha="0.5")
        return c

    steps: list[str] = []
    with on_step(lambda what, step, *_: steps.append(what) if step == 0 else None):
        run(config(tmp_path / "memit", "memit", cache), bundle=bundle, progress=False)
        assert steps and len(list(cache.glob("*.safetensors"))) == len(steps)
        steps.clear()
        run(config(tmp_path / "intattn", "intattn", cache), bundle=bundle, progress=False)
        assert steps == []  # every group from the cache
        run(config(tmp_path / "plain", "intattn", None), bundle=bundle, progress=False)
        assert steps  # without the cache, optimised
    shared, plain = read_results(tmp_path / "intattn" / RESULTS), read_results(tmp_path / "plain" / RESULTS)
    assert [r["comparisons"] for r in shared] == [r["comparisons"] for r in plain]
    manifest = json.loads((tmp_path / "intattn" / "manifest.json").read_text())
    assert manifest["targets_cache"] == str(cache)
    assert not list((tmp_path / "intattn" / "edits").glob("*.targets"))
    # the same run directory continues without the cache (a speed setting, not identity)
    run(config(tmp_path / "intattn", "intattn", None), bundle=bundle, progress=False)


def test_bad_mode_and_batch_size_are_refused(tmp_path, tiny_dir, corpus_file):
    with pytest.raises(ValueError, match="--mode"):
        _edit_config(tmp_path, tiny_dir, corpus_file, mode="parallel")
    with pytest.raises(ValueError, match="--targets-cache needs --mode single or batch"):
        _edit_config(tmp_path, tiny_dir, corpus_file, mode="sequential", batch_size=2, targets_cache="t")
    with pytest.raises(ValueError, match="--batch-size needs"):
        _edit_config(tmp_path, tiny_dir, corpus_file, batch_size=4)


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_fluency_batched_across_cases_equals_per_case_generation(tmp_path, tiny_dir, corpus_file, mode):
    """Single mode generates several edited cases in one batch, each row with its own deltas; batch and
    sequential mode several cases at once on the edited model: the generations are those of evaluating
    each case alone with its edit applied, and the model is restored."""
    from dataclasses import replace

    from attnedit.core.deltas import model_hash
    from attnedit.core.models import load_model
    from attnedit.editing.registry import make_editor
    from attnedit.evaluation.evaluator import Evaluator

    bundle = load_model(str(tiny_dir))
    original = model_hash(bundle.model)
    fl = EvalConfig(max_new_tokens=6, fluency_prompts="rewrite")
    kw = {"mode": mode, "batch_size": 1 if mode == "single" else 2}
    config = replace(_edit_config(tmp_path / mode, tiny_dir, corpus_file, limit=5, **kw), eval=fl)
    run(replace(config, generation_cases=3), bundle=bundle, progress=False)
    assert model_hash(bundle.model) == original
    records = read_results(tmp_path / mode / RESULTS)
    assert [r["case_id"] for r in records] == ["0", "1", "2", "3", "4"]

    editor = make_editor(config.method, bundle, config.preset, config.params, sadr=config.sadr)
    evaluator = Evaluator(bundle, fl)

    cases = load_cases("sample").cases[:5]
    if mode == "single":
        expected = []
        for case in cases:
            edit = editor.apply(bundle, [case])
            try:
                expected.append(evaluator.evaluate(case))
            finally:
                edit.revert()
    else:
        edits = []
        groups = [cases[:2], cases[2:4], cases[4:]]
        try:
            expected = []
            for group in groups:
                edits.append(editor.apply(bundle, group))
                if mode == "batch":
                    expected += [evaluator.evaluate(c) for c in group]
                    edits.pop().revert()
            if mode == "sequential":
                expected = [evaluator.evaluate(c) for c in cases]
        finally:
            for edit in reversed(edits):
                edit.revert()
    for got, want in zip(records, expected, strict=True):
        assert got["generations"] == want["generations"] and got["fluency"] == want["fluency"]
        if mode != "sequential":
            assert got["comparisons"] == want["comparisons"]
            continue
        # sequential mode scores its cases together (Evaluator.score_many): equal up to float rounding
        assert got["comparisons"].keys() == want["comparisons"].keys()
        for key, entry in want["comparisons"].items():
            for side in ("right_nll", "wrong_nll"):
                assert got["comparisons"][key][side] == pytest.approx(entry[side], rel=1e-5)
    assert model_hash(bundle.model) == original


def test_run_dir_open_keeps_created_and_checks_identity(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    first = run_dir.open({"seed": 0, "method": "rome", "limit": 2}, ("seed", "method"))
    assert (run_dir.path / MANIFEST).is_file() and run_dir.records_path.is_file()
    assert run_dir.read_manifest() == first and first["created"]
    (run_dir.path / MANIFEST).write_text(json.dumps({**first, "created": "2020-01-01T00:00:00"}))
    # a field outside the identity may change (the case range); the first stamp stays
    again = run_dir.open({"seed": 0, "method": "rome", "limit": 3}, ("seed", "method"))
    assert (again["limit"], again["created"]) == (3, "2020-01-01T00:00:00")
    with pytest.raises(RunConflictError, match="method"):
        run_dir.open({"seed": 0, "method": "memit", "limit": 3}, ("seed", "method"))
    assert run_dir.read_manifest()["method"] == "rome"  # a refused run writes nothing
    # a manifest from before "first" existed implies first = 0
    assert "first" not in run_dir.read_manifest()
    with pytest.raises(RunConflictError, match="first"):
        run_dir.open({"seed": 0, "method": "rome", "first": 1}, ("first",))
    assert run_dir.open({"seed": 0, "method": "rome", "first": 0}, ("first",))["first"] == 0


def test_a_manifest_from_before_knowedit_sampling_continues_with_batch_only(tmp_path):
    from attnedit.evaluation.evaluator import EvalConfig

    run_dir = RunDir(tmp_path / "run")
    old_eval = {k: v for k, v in EvalConfig().manifest().items() if k != "knowedit_sampling"}
    run_dir.open({"eval": old_eval}, ("eval",))
    run_dir.close()
    with pytest.raises(RunConflictError, match="eval"):
        run_dir.open({"eval": EvalConfig().manifest()}, ("eval",))  # the default, per prompt
    batch = EvalConfig(knowedit_sampling="batch").manifest()
    assert run_dir.open({"eval": batch}, ("eval",))["eval"]["knowedit_sampling"] == "batch"
    run_dir.close()


def test_run_dir_records_repair_only_when_asked(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.open({"seed": 0}, ())
    for i in ("0", "1", "2"):
        run_dir.append({"case_id": i, "text": "é"})
    intact = run_dir.records_path.read_bytes()
    assert "é" in intact.decode() and intact.count(b"\n") == 3
    run_dir.records_path.write_bytes(intact + b'{"case_id": "3", "te')  # an interrupted append
    assert [r["case_id"] for r in run_dir.records(["2", "9", "0"])] == ["2", "0"]
    assert len(run_dir.records_path.read_bytes()) > len(intact)  # a reader leaves the tail alone
    assert [r["case_id"] for r in run_dir.records(repair=True)] == ["0", "1", "2"]
    assert run_dir.records_path.read_bytes() == intact
    run_dir.append({"case_id": "3"})
    assert [r["case_id"] for r in read_results(run_dir.records_path)] == ["0", "1", "2", "3"]


def test_run_dir_selected_records_follow_the_manifest(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.open({"seed": 0}, ())  # a run from before case ranges were recorded: every record
    for i in ("3", "1", "2"):
        run_dir.append({"case_id": i})
    assert [r["case_id"] for r in selected_records(tmp_path)] == ["3", "1", "2"]
    run_dir.open({"seed": 0, "case_ids": ["1", "2", "4"]}, ())
    assert [r["case_id"] for r in run_dir.selected_records()] == ["1", "2"]
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        selected_records(tmp_path / "missing")


def test_run_dir_strict_json_and_atomic_writes(tmp_path):
    strict = RunDir(tmp_path, "cases.jsonl", allow_nan=False)
    strict.open({"seed": 0}, ())
    with pytest.raises(ValueError):
        strict.append({"case_id": "0", "x": float("nan")})
    assert strict.records() == [] and strict.records_path.name == "cases.jsonl"
    RunDir(tmp_path).append({"case_id": "0", "x": float("nan")})  # evaluation records may hold NaN
    path = strict.write_json("result.json", {"a": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["cases.jsonl", "manifest.json", "result.json", RESULTS, LOCK]
    )


def test_run_dir_seeding_is_recorded(tmp_path):
    import random

    run_dir = RunDir(tmp_path)
    run_dir.seed_everything(3)
    drawn = random.random()
    assert run_dir.seed_everything(3) == 3 and random.random() == drawn
    with pytest.raises(ValueError, match="seed"):
        run_dir.open({"seed": 4}, ())
    assert not (tmp_path / MANIFEST).exists()
    run_dir.open({"seed": 3}, ())


def test_reading_a_run_directory_needs_no_torch():
    code = "import sys, attnedit.runs.rundir; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_records_on_disk_are_case_records(tmp_path, tiny_dir, corpus_file):
    """Every key a run writes is declared by ``CaseRecord`` (the type describes the whole line)."""
    from dataclasses import replace

    from attnedit.evaluation.records import CaseRecord

    config = _edit_config(tmp_path / "run", tiny_dir, corpus_file, limit=2, ppl_corpus=str(corpus_file))
    run(replace(config, eval=EvalConfig(max_new_tokens=3, fluency_prompts="rewrite")), progress=False)
    records = read_results(tmp_path / "run" / RESULTS)
    assert len(records) == 2
    for record in records:
        assert CaseRecord.__required_keys__ <= set(record) <= set(CaseRecord.__annotations__)
        assert {"ppl", "edit", "fluency", "generations", "seconds_edit"} <= set(record)


def _records_file(tmp_path: Path, n: int = 6) -> RunDir:
    run_dir = RunDir(tmp_path / "run")
    run_dir.open({"seed": 0}, ())
    for i in range(n):
        run_dir.append({"case_id": str(i), "x": i / 7, "text": "é"})
    run_dir.close()
    return run_dir


def _valid_ids(data: bytes) -> set[str]:
    """The records a damaged file still holds intact: its newline-terminated lines that are records."""
    ids = set()
    for line in data.split(b"\n")[:-1]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("case_id"), str):
            ids.add(record["case_id"])
    return ids


def test_a_corrupted_middle_line_stops_with_its_line_number_and_removes_nothing(tmp_path):
    run_dir = _records_file(tmp_path)
    lines = run_dir.records_path.read_bytes().split(b"\n")
    lines[2] = b'{"case_id": "2", "x": 0.28'  # a broken record in the middle, valid ones after it
    damaged = b"\n".join(lines)
    run_dir.records_path.write_bytes(damaged)
    with pytest.raises(CorruptRecordsError, match=r"results\.jsonl, line 3"):
        run_dir.records(repair=True)
    with pytest.raises(CorruptRecordsError, match="line 3"):
        run_dir.records()
    assert run_dir.records_path.read_bytes() == damaged  # nothing cut
    # a foreign line (valid JSON, not a record) is refused the same way
    run_dir.records_path.write_bytes(b'{"case_id": "0"}\n[1, 2]\n{"case_id": "1"}\n')
    with pytest.raises(CorruptRecordsError, match="line 2"):
        run_dir.records(repair=True)
    # the way forward: the bad line is set aside, every record kept
    assert run_dir.quarantine() == 1
    run_dir.close()
    assert [r["case_id"] for r in run_dir.records(repair=True)] == ["0", "1"]
    aside = run_dir.records_path.with_name(RESULTS + ".quarantine")
    assert aside.read_bytes() == b"[1, 2]\n"


def test_random_truncations_and_corruptions_never_lose_a_valid_record(tmp_path):
    import random

    intact = _records_file(tmp_path, 8).records_path.read_bytes()
    rng = random.Random(15)
    for trial in range(300):
        data = bytearray(intact)
        if trial % 3 == 0:  # an interrupted write: the file cut anywhere
            data = data[: rng.randrange(len(data) + 1)]
        else:  # a few bytes overwritten, inserted or deleted anywhere (newlines included)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(data))
                byte = rng.choice([b"\n", b"\xff", b"{", b'"', b"x", b"0", b"}"])
                kind = rng.randrange(3)
                if kind == 0:
                    data[at : at + 1] = byte
                elif kind == 1:
                    data[at:at] = byte
                else:
                    del data[at]
        damaged = bytes(data)
        path = tmp_path / "run" / RESULTS
        path.write_bytes(damaged)
        valid = _valid_ids(damaged)
        torn = damaged.rsplit(b"\n", 1)[-1]
        run_dir = RunDir(tmp_path / "run")
        try:
            kept = run_dir.records(repair=True)
        except CorruptRecordsError as err:
            assert str(path) in str(err) and "line" in str(err)
            assert path.read_bytes() == damaged, trial  # refused: the file is untouched
            continue
        # resumed: every intact record survives; at most the unterminated last line was cut
        assert valid <= {r["case_id"] for r in kept}, trial
        assert path.read_bytes() == damaged[: len(damaged) - len(torn)], trial


def _hold_lock(path: Path) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from attnedit.runs.rundir import RunDir\n"
        "d = RunDir(sys.argv[1]); d.path.mkdir(exist_ok=True); d.lock()\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_on_one_run_directory_is_refused(tmp_path):
    holder = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunDir(tmp_path / "run").open({"seed": 0}, ())
        assert not (tmp_path / "run" / MANIFEST).exists()  # the refused one wrote nothing
    finally:
        holder.kill()  # like kill -9: the OS releases the lock
        holder.wait()
    with RunDir(tmp_path / "run") as run_dir:
        run_dir.open({"seed": 0}, ())
        assert run_dir.locked
    assert not run_dir.locked


def test_concurrent_evals_on_one_out_write_every_case_once(tmp_path, tiny_dir):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=str(holder.pid)):
            run(_config(tmp_path, tiny_dir, limit=2), progress=False)
    finally:
        holder.kill()
        holder.wait()
    run(_config(tmp_path, tiny_dir, limit=2), progress=False)
    assert _ids(tmp_path) == ["0", "1"]


def test_a_failed_start_leaves_the_directory_unlocked(tmp_path, tiny_dir):
    run(_config(tmp_path, tiny_dir, limit=2), progress=False)
    with pytest.raises(RunConflictError, match="seed"):  # refused after the lock was taken
        run(_config(tmp_path, tiny_dir, limit=2, seed=1), progress=False)
    with pytest.raises(ValueError):  # a bad flag: refused before the directory is touched
        _config(tmp_path, tiny_dir, limit=2, first=-1)
    # another process may take the lock now (so this one let it go)
    _hold_lock(tmp_path).kill()
    run(_config(tmp_path, tiny_dir, limit=3), progress=False)
    assert _ids(tmp_path) == ["0", "1", "2"]


def test_symlinked_or_foreign_run_files_are_refused_untouched(tmp_path):
    outside = tmp_path / "precious.jsonl"
    outside.write_text("not ours\n")
    for name in (RESULTS, MANIFEST):
        out = tmp_path / f"link-{name}"
        out.mkdir()
        (out / name).symlink_to(outside)
        with pytest.raises(UnsafeRunFileError, match="symbolic link"):
            RunDir(out).open({"seed": 0}, ())
        assert outside.read_text() == "not ours\n"
        assert not RunDir(out).locked
    with pytest.raises(UnsafeRunFileError, match="symbolic link"):
        read_results(tmp_path / f"link-{RESULTS}" / RESULTS, repair=True)
    # a results file with no manifest beside it is someone else's
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / RESULTS).write_text('{"case_id": "0"}\n{"case_id": "1"')
    with pytest.raises(UnsafeRunFileError, match="no manifest"):
        RunDir(foreign).open({"seed": 0}, ())
    assert (foreign / RESULTS).read_text() == '{"case_id": "0"}\n{"case_id": "1"'
    assert not (foreign / MANIFEST).exists()
    # an --out that is a file is refused before anything is written
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UnsafeRunFileError, match="not a directory"):
        RunDir(afile).open({"seed": 0}, ())
    with pytest.raises(ValueError, match="plain name"):
        RunDir(tmp_path, "../escape.jsonl")


def test_the_cli_refuses_a_locked_or_unsafe_run_directory_in_one_line(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from attnedit.cli.main import app

    cli = CliRunner()
    args = ["eval", "sample", "--model", str(tiny_dir), "--limit", "1", "--no-fluency", "--out"]
    holder = _hold_lock(tmp_path / "run")
    try:
        result = cli.invoke(app, [*args, str(tmp_path / "run")])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2 and f"pid {holder.pid}" in result.output
    assert "Traceback" not in result.output
    linked = tmp_path / "linked"
    run(_config(linked, tiny_dir, limit=1), progress=False)
    (tmp_path / "elsewhere.jsonl").write_bytes((linked / RESULTS).read_bytes())
    (linked / RESULTS).unlink()
    (linked / RESULTS).symlink_to(tmp_path / "elsewhere.jsonl")
    result = cli.invoke(app, ["report", str(linked)])
    assert result.exit_code == 2 and "symbolic link" in result.output


def test_the_data_are_identified_by_their_sha256_not_their_path(tmp_path, tiny_dir):

    sample = load_cases("sample")
    copy = tmp_path / "moved" / Path(sample.path).name
    copy.parent.mkdir()
    copy.write_bytes(Path(sample.path).read_bytes())
    out = tmp_path / "run"
    run(_config(out, tiny_dir, limit=2), progress=False)
    run(replace(_config(out, tiny_dir, limit=2), data=str(copy)), progress=False)  # the same bytes: resumed
    assert _ids(out) == ["0", "1"]
    assert json.loads((out / MANIFEST).read_text())["data"]["path"] == str(copy)
    edited = tmp_path / "edited" / copy.name
    edited.parent.mkdir()
    edited.write_bytes(copy.read_bytes().replace(b"Paris", b"Lyon", 1))
    with pytest.raises(RunConflictError, match="data"):
        run(replace(_config(out, tiny_dir, limit=2), data=str(edited)), progress=False)


def test_the_model_is_identified_by_its_fingerprint_not_its_path(tmp_path, tiny_dir):
    """The same weights read from another directory (another $ATTNEDIT_CACHE, a moved copy) continue
    the run; other weights are refused, naming the model."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run(_config(out, tiny_dir, limit=1), progress=False)
    copy = tmp_path / "moved-model"
    shutil.copytree(tiny_dir, copy)
    run(_config(out, copy, limit=2), progress=False)  # the same weights: resumed
    assert _ids(out) == ["0", "1"]
    other = tmp_path / "other-model"
    shutil.copytree(copy, other)  # the tokenizer files; the weights are replaced below
    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(other)
    with pytest.raises(RunConflictError, match="model"):
        run(_config(out, other, limit=2), progress=False)


def test_two_concurrent_evals_on_one_out_write_every_case_once(tmp_path, tiny_dir):
    """Two ``attnedit eval`` processes started together on one --out: one runs, the other is refused with one
    line naming the holder (exit 2); running the command again afterwards finds every case done, once."""
    import subprocess
    import sys

    out = tmp_path / "shared-out"
    command = [sys.executable, "-m", "attnedit", "eval", "sample", "--model", str(tiny_dir), "--limit", "6"]
    command += ["--no-fluency", "--ppl-corpus", "none", "--out", str(out), "--threads", "1"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    outputs = [p.communicate(timeout=300) for p in procs]  # read the pipes while waiting: no deadlock
    results = [(p.returncode, err) for p, (_, err) in zip(procs, outputs, strict=True)]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # [0, 0]: the second started after the first had finished
    for code, err in results:
        if code == 2:
            assert "another process (pid" in err
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert _ids(out) == ["0", "1", "2", "3", "4", "5"]  # every case exactly once, in order
