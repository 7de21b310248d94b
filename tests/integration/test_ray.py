"""``--backend ray`` on a local Ray instance (2 CPUs) with the tiny Llama: records equal a local run's,
a worker or the driver killed mid-run loses no case and writes none twice, and the flags' errors."""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import MEMIT_PRESET, ROOT, kill_after_records, tiny_run, torch_threads

from attnedit.evaluation.evaluator import EvalConfig
from attnedit.runs.config import RunConfig
from attnedit.runs.executors import RayOptions
from attnedit.runs.rundir import MANIFEST, RESULTS, read_results
from attnedit.runs.runner import run

pytestmark = pytest.mark.ray

SRC = str(ROOT / "src")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance for the module; its workers use a cache directory of their own. (Ray is
    imported here: the lowest-transformers environment, without the extra, deselects these tests.)"""
    import ray

    cache = tmp_path_factory.mktemp("ray-cache")
    before = os.environ.get("ATTNEDIT_CACHE")
    os.environ["ATTNEDIT_CACHE"] = str(cache)  # inherited by the Ray workers started now
    # workers import this module and the helpers it imports
    paths = (SRC, str(Path(__file__).parent), str(ROOT / "tests"), os.environ.get("PYTHONPATH"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("ATTNEDIT_CACHE", None)
        else:
            os.environ["ATTNEDIT_CACHE"] = before


def _memit(out: Path, model: Path, corpus: Path, fluency: bool = False, **kw) -> RunConfig:
    eval = EvalConfig(fluency=fluency, max_new_tokens=4, max_generation_prompts=1)
    return tiny_run(out, model, corpus, params={"templates": "[[3, 1]]"}, eval=eval, **kw)


def _records(out: Path) -> dict[str, dict]:
    records = read_results(out / RESULTS)
    ids = [r["case_id"] for r in records]
    assert len(ids) == len(set(ids)), "a case written twice"
    # every timing (seconds_*) differs between two runs
    return {r["case_id"]: {k: v for k, v in r.items() if not k.startswith("seconds_")} for r in records}


@pytest.mark.parametrize(
    ("mode", "batch_size", "fluency"), [("single", 1, True), ("batch", 2, False)], ids=["single", "batch"]
)
def test_ray_records_equal_local_records(tmp_path, tiny_dir, corpus_file, cluster, mode, batch_size, fluency):
    kw = dict(limit=5, mode=mode, batch_size=batch_size, generation_cases=2)
    options = RayOptions(workers=2)
    with torch_threads(options.threads):  # the actors' thread count: float sums split alike
        local = run(_memit(tmp_path / "local", tiny_dir, corpus_file, fluency, **kw), progress=False)
    remote = run(_memit(tmp_path / "ray", tiny_dir, corpus_file, fluency, **kw), progress=False, ray=options)
    a, b = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 5
    for case_id in a:
        assert a[case_id] == b[case_id], case_id
    if fluency:
        assert all(r["generations"] for r in b.values())  # FL came from the same decoding batches
    assert json.dumps(local, sort_keys=True) == json.dumps(remote, sort_keys=True)


def test_a_killed_worker_has_its_unit_retried(tmp_path, tiny_dir, corpus_file, cluster):
    marker = tmp_path / "crashed"
    config = _memit(tmp_path / "ray", tiny_dir, corpus_file, limit=4)
    run(config, progress=False, ray=RayOptions(workers=2, crash_once=str(marker)))
    assert marker.exists()  # one actor did die mid-unit
    assert sorted(_records(tmp_path / "ray"), key=int) == ["0", "1", "2", "3"]
    assert "failed_units" not in json.loads((tmp_path / "ray" / MANIFEST).read_text())


def test_units_failing_every_try_are_reported_and_the_rest_kept(tmp_path, tiny_dir, corpus_file, cluster):
    from attnedit.runs.executors import UnitsFailedError

    marker = tmp_path / "crashed"
    config = _memit(tmp_path / "ray", tiny_dir, corpus_file, limit=3)
    with pytest.raises(UnitsFailedError, match="1 case"):
        run(config, progress=False, ray=RayOptions(workers=1, max_retries=0, crash_once=str(marker)))
    manifest = json.loads((tmp_path / "ray" / MANIFEST).read_text())
    (failed,) = manifest["failed_units"]
    assert failed["tries"] == 1 and failed["error"]
    assert sorted(_records(tmp_path / "ray")) == sorted({"0", "1", "2"} - set(failed["case_ids"]))
    run(config, progress=False, ray=RayOptions(workers=1))  # the same run again: completed
    assert sorted(_records(tmp_path / "ray"), key=int) == ["0", "1", "2"]


@dataclass
class PrivateDiskCache:
    """A worker factory giving each actor a disk cache of its own (as on machines without a shared file
    system), so that one-time work an actor does not receive from the object store shows up on its disk."""

    inner: Any
    root: str

    def __call__(self, device: str) -> Any:
        os.environ["ATTNEDIT_CACHE"] = tempfile.mkdtemp(dir=self.root)
        return self.inner(device)


def _run_with_wrapped_workers(tmp_path, tiny_dir, corpus_file, monkeypatch, wrap, cases: int) -> Path:
    """A batch run (groups of 2) of ``cases`` cases on 2 actors whose worker factory is
    ``wrap(factory, root)``; every case written; returns ``root``, a directory for the wrapper's files."""
    from attnedit.runs import ray_eval

    root = tmp_path / "workers"
    root.mkdir()
    made = ray_eval.EvalWorkerFactory
    monkeypatch.setattr(ray_eval, "EvalWorkerFactory", lambda *a: wrap(made(*a), str(root)))
    config = _memit(tmp_path / "ray", tiny_dir, corpus_file, limit=cases, mode="batch", batch_size=2)
    run(config, progress=False, ray=RayOptions(workers=2))
    assert len(_records(tmp_path / "ray")) == cases
    return root


def test_one_time_work_is_done_by_one_worker_only(tmp_path, tiny_dir, corpus_file, cluster, monkeypatch):
    root = _run_with_wrapped_workers(tmp_path, tiny_dir, corpus_file, monkeypatch, PrivateDiskCache, 6)
    actors = sorted(root.iterdir())
    assert len(actors) == 2  # three units on two actors: both computed edits
    # the kinds of cache file each actor wrote (stats/..., templates/...)
    computed = {a.name: {f.relative_to(a).parts[0] for f in a.rglob("*") if f.is_file()} for a in actors}
    did = [name for name, kinds in computed.items() if kinds]
    assert len(did) == 1, computed  # the other actor received the templates and statistics
    assert {"stats", "templates"} <= computed[did[0]]


@dataclass
class FirstUnitWaits:
    """A worker factory whose first unit (of the whole run) waits until another actor has started a unit
    (up to 120 s), and notes whether it saw one: with the one-time work done ahead by ``prepare``, the
    other actors start at once instead of after the first unit."""

    inner: Any
    root: str

    def __call__(self, device: str) -> Any:
        return _WaitingUnits(self.inner(device), Path(self.root))


@dataclass
class _WaitingUnits:
    runner: Any
    root: Path

    @property
    def bundle(self) -> Any:
        return self.runner.bundle

    def prepare(self, unit: Any) -> None:
        self.runner.prepare(unit)

    def __call__(self, unit: Any) -> Any:
        import time

        (self.root / f"started-{os.getpid()}-{time.monotonic_ns()}").touch()
        try:
            os.close(os.open(self.root / "first", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return self.runner(unit)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(self.root.glob("started-*"))) < 2:
            time.sleep(0.05)
        (self.root / f"saw-{len(list(self.root.glob('started-*')))}").touch()
        return self.runner(unit)


def test_every_worker_starts_at_once_after_the_one_time_work(
    tmp_path, tiny_dir, corpus_file, cluster, monkeypatch
):
    root = _run_with_wrapped_workers(tmp_path, tiny_dir, corpus_file, monkeypatch, FirstUnitWaits, 4)
    (saw,) = [p.name for p in root.glob("saw-*")]
    assert saw != "saw-1", "the first unit ran alone: no other actor started a unit while it waited"


def test_analysis_on_ray_equals_local(tmp_path, tiny_dir, cluster):
    from attnedit.runs.analyses import Setting
    from attnedit.runs.analysis_runs import TraceOptions, run_trace

    options = TraceOptions(kinds=("mlp",), window=1, samples=2)
    results = {}
    for name, backend in (("local", None), ("ray", RayOptions(workers=2))):
        setting = Setting("sample", str(tiny_dir), tmp_path / name, limit=3, ray=backend)
        results[name] = json.loads(run_trace(setting, options).path.read_text())
    assert results["local"]["cases"] == results["ray"]["cases"]
    assert results["local"]["aggregate"] == results["ray"]["aggregate"]


def _cli(out: Path, model: Path, corpus: Path, address: str, *extra: str) -> list[str]:
    params = ["layers=0,1", f"stats_corpus={corpus}", "stats_samples=20", "steps=3", "templates=[[3, 1]]"]
    args = [sys.executable, "-m", "attnedit", "eval", "sample", "--out", str(out), "--model", str(model)]
    args += ["--method", "memit", "--preset", str(MEMIT_PRESET), "--no-fluency", "--ppl-corpus", "none"]
    args += [a for p in params for a in ("-p", p)]
    return [*args, "--backend", "ray", "--address", address, "--workers", "2", *extra]


def test_a_killed_driver_resumes_with_every_case_once(tmp_path, tiny_dir, corpus_file, cluster):
    out = tmp_path / "run"
    cmd = _cli(out, tiny_dir, corpus_file, cluster, "--limit", "16")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    kill_after_records(cmd, env, out / RESULTS, 1, 120)
    killed_at = len(_records(out))
    assert 1 <= killed_at < 16
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(_records(out), key=int) == [str(i) for i in range(16)]


def test_sequential_mode_refuses_ray(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from attnedit.cli.main import app

    result = CliRunner().invoke(
        app, ["eval", "sample", "--out", str(tmp_path / "o"), "--mode", "sequential", "--backend", "ray"]
    )
    assert result.exit_code == 2 and "sequential mode runs locally only" in result.output
    with pytest.raises(ValueError, match="sequential mode runs locally only"):
        run(RunConfig(data="sample", out=str(tmp_path / "p"), mode="sequential"), ray=RayOptions())
