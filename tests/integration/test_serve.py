"""The edit inspector's API (``attnedit serve``) on a tiny Llama: edits, answers, the drift grid, patching,
bad input, the runs browser's path checks, an edit stream's curves and concurrent edits."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import (
    EDIT,
    make_eval_runs,
    make_tiny,
    stream_lines,
    torch_threads,
    write_run_dir,
    write_tiny_presets,
)

from attnedit.analysis.drift import attention_drift, record_last_token_attention
from attnedit.core.deltas import WeightEdit, model_hash
from attnedit.evaluation.answers import probe_answers
from attnedit.serve.app import create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    """A TestClient of the inspector on a tiny Llama with presets, and a runs root with one run."""
    tmp = tmp_path_factory.mktemp("serve")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(f"The city number {i} lies on the river {i % 7}." for i in range(40)))
    write_tiny_presets(tmp / "presets", corpus)
    runs = tmp / "runs"
    run = runs / "group" / "rome-run"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"method": "rome", "model": {"name": "tiny-llama"}}))
    (run / "results.jsonl").write_text(json.dumps({"case_id": "0", "ES": 1.0, "nll": float("nan")}) + "\n")
    (run / "summary.json").write_text(json.dumps({"ES": {"mean": 1.0}}))
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text(json.dumps({"method": "secret"}))
    (outside / "results.jsonl").write_text(json.dumps({"case_id": "secret"}) + "\n")
    (runs / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNEDIT_PRESETS", str(tmp / "presets"))
        mp.setenv("ATTNEDIT_CACHE", str(tmp / "cache"))
        with torch_threads(1):
            bundle = make_tiny("llama", tiny_tokenizer)
            # float64: the grid's one-pass edited row (x W + x D) then equals a pass with W + D to ~1e-12
            bundle.model.double()
            with TestClient(create_app(bundle, runs)) as client:
                client.bundle = bundle  # type: ignore[attr-defined]
                yield client


@pytest.fixture(scope="module")
def edited(served) -> dict:
    """One finished ROME edit (its POST answer)."""
    response = served.post("/api/edits", json=EDIT)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_methods_and_sample(served):
    assert served.get("/healthz").json() == {"status": "ok", "model": "tiny-llama"}
    methods = {m["name"]: m for m in served.get("/api/methods").json()["methods"]}
    assert {"none", "rome", "rome+sadr", "memit+sadr", "ft"} <= set(methods)
    assert "none+sadr" not in methods
    assert methods["rome"]["settings"]["layers"] == [1]
    assert methods["rome+sadr"]["settings"]["sadr_gamma"] == 0.05
    assert methods["memit"]["preset"] is None  # no MEMIT preset for the tiny model
    cases = served.get("/api/sample").json()["cases"]
    assert cases[0]["subject"] in cases[0]["prompt"] or "{}" in cases[0]["prompt"]
    assert cases[0]["neighbors"]
    assert served.get("/openapi.json").status_code == 200
    assert served.get("/docs").status_code == 404 and served.get("/redoc").status_code == 404
    assert "<svg" in served.get("/").text or "grid" in served.get("/").text


def test_edit_answers_before_and_after(served, edited):
    results = edited["results"]
    kinds = [r["kind"] for r in results]
    assert kinds == ["rewrite", "paraphrase", "neighbor", "distracted_neighbor", "relation"]
    rewrite = results[0]
    assert rewrite["prompt"] == "Eiffel Tower is located in the city of"
    assert rewrite["after"] != rewrite["before"]
    assert results[3]["prompt"] == "Eiffel Tower is located in the city of Rome. " + EDIT["neighbors"][0]
    for r in results:
        assert set(r["before"]) == {"generated", "p_new", "p_true"}
    # the weights are back, and the edit's own answers are reproduced by applying its download
    bundle = served.bundle
    assert served.app.state.inspector.original_hash == model_hash(bundle.model)
    data = served.get(f"/api/edits/{edited['id']}/edit.safetensors")
    assert data.status_code == 200 and data.headers["content-type"] == "application/octet-stream"
    view = served.get(f"/api/edits/{edited['id']}/view.json").json()
    assert view["request"]["subject"] == "Eiffel Tower" and view["results"] == results


def test_download_is_the_edit(served, edited, tmp_path):
    path = tmp_path / "edit.safetensors"
    path.write_bytes(served.get(f"/api/edits/{edited['id']}/edit.safetensors").content)
    edit = WeightEdit.load(path)
    assert edit.method == "rome" and edit.requests[0].target_new == "Rome"
    assert list(edit.deltas) == ["model.layers.1.mlp.down_proj.weight"]
    # the answers after are those of the model with this edit applied
    bundle = served.bundle
    probes = [(r["kind"], r["prompt"]) for r in edited["results"]]
    with edit.apply(bundle.model):
        after = probe_answers(bundle, probes, edit.requests[0])
    assert [dataclasses.asdict(a) for a in after] == [r["after"] for r in edited["results"]]
    before = probe_answers(bundle, probes, edit.requests[0])
    assert [dataclasses.asdict(b) for b in before] == [r["before"] for r in edited["results"]]


def test_grid_equals_a_direct_drift_computation(served, edited, tmp_path):
    grid = served.get(f"/api/edits/{edited['id']}/grid").json()
    bundle = served.bundle
    prompt = "Eiffel Tower is located in the city of"
    assert grid["prompt"] == prompt and (grid["layers"], grid["heads"]) == (3, 6)
    # directly: record unedited, apply the downloaded edit, record edited, revert
    path = tmp_path / "edit.safetensors"
    path.write_bytes(served.get(f"/api/edits/{edited['id']}/edit.safetensors").content)
    unedited = record_last_token_attention(bundle, [prompt], "Eiffel Tower")
    with WeightEdit.load(path).apply(bundle.model):
        after = record_last_token_attention(bundle, [prompt], "Eiffel Tower")
    direct = attention_drift(unedited, after)[0]
    kl = np.array(grid["kl"])
    # the grid's edited row computes x W + x D instead of x (W + D): equal up to float rounding
    np.testing.assert_allclose(kl, direct, rtol=1e-6, atol=1e-15)
    assert kl[:2].max() == 0.0 and kl[2].max() > 0.0  # layer 1's MLP edit moves only layer 2's attention
    # SADR's rule: the edited weight on the subject's last token above the unedited max over heads
    s = unedited.subject_last[0]
    threshold = unedited.attention[0, :, :, s].max(axis=1, keepdims=True)
    np.testing.assert_array_equal(np.array(grid["selected"]), after.attention[0, :, :, s] > threshold)
    assert grid["subject_span"][1] == s
    # one head's row, before and after, over the prompt's tokens
    row = served.get(f"/api/edits/{edited['id']}/head", params={"layer": 2, "head": 3}).json()
    assert len(row["before"]) == len(row["tokens"]) == unedited.lengths[0]
    np.testing.assert_allclose(row["before"], unedited.attention[0, 2, 3], atol=1e-6)
    np.testing.assert_allclose(row["after"], after.attention[0, 2, 3], atol=1e-6)
    # another probe prompt, without the subject: nothing selected, no span
    other = served.get(f"/api/edits/{edited['id']}/grid", params={"prompt": EDIT["neighbors"][0]}).json()
    assert other["subject_span"] is None and not np.array(other["selected"]).any()
    assert model_hash(bundle.model) == served.app.state.inspector.original_hash


def test_patching_curve(served, edited):
    curve = served.get(f"/api/edits/{edited['id']}/patching", params={"window": 1}).json()
    assert curve["layers"] == [0, 1, 2] and curve["targets"] == ["Paris", "Rome"]
    # patching layer 0 or 1 back changes nothing (their attention did not drift); the base is the edited P
    assert curve["p_new"][0] == pytest.approx(curve["base"]["p_new"], rel=1e-4)
    assert all(0.0 <= p <= 1.0 for p in curve["p_true"] + curve["p_new"])
    assert model_hash(served.bundle.model) == served.app.state.inspector.original_hash


@pytest.mark.parametrize(
    ("change", "field", "status"),
    [
        ({"prompt": "The Eiffel Tower is in", "subject": "Big Ben"}, "subject", 422),
        ({"target_new": "  "}, "target_new", 422),
        ({"target_true": ""}, "target_true", 422),
        ({"method": "rome2"}, "method", 422),
        ({"prompt": "{} is " + "very " * 100}, "prompt", 422),
        ({"neighbors": ["x" * 500]}, "neighbors[0]", 422),
        ({"params": {"stats_corpus": "/etc/passwd"}}, "params.stats_corpus", 422),
        ({"params": {"preset": "/tmp/x.json"}}, "params.preset", 422),
        ({"params": {"no_such_field": 1}}, "params", 422),
        ({"method": "memit"}, "params", 422),  # no preset: the error says which settings to give
        ({"extra": "x"}, "extra", 422),
        ({"prompt": None}, "prompt", 422),
    ],
)
def test_bad_edit_requests_name_the_field(served, change, field, status):
    response = served.post("/api/edits", json={**EDIT, **change})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field, body
    assert body["error"]


def test_unknown_ids_and_bad_queries(served, edited):
    for path in ("grid", "head?layer=0&head=0", "patching", "edit.safetensors", "view.json", "events"):
        response = served.get(f"/api/edits/nope/{path}")
        assert response.status_code == 404 and response.json()["field"] == "id", path
    bad = {"layer": (99, 0), "head": (0, 99)}
    for field, (layer, head) in bad.items():
        response = served.get(f"/api/edits/{edited['id']}/head", params={"layer": layer, "head": head})
        assert response.status_code == 422 and response.json()["field"] == field
    response = served.get(f"/api/edits/{edited['id']}/head", params={"layer": "x", "head": 0})
    assert response.status_code == 422 and response.json()["field"] == "layer"
    response = served.get(f"/api/edits/{edited['id']}/grid", params={"prompt": "y" * 1000})
    assert response.status_code == 422 and response.json()["field"] == "prompt"
    response = served.get(f"/api/edits/{edited['id']}/patching", params={"window": 0})
    assert response.status_code == 422 and response.json()["field"] == "window"


def test_runs_browser_stays_under_its_root(served):
    runs = served.get("/api/runs").json()["runs"]
    assert [r["path"] for r in runs] == ["group/rome-run"]  # the symlinked directory is not followed
    assert runs[0]["summary"] == {"ES": {"mean": 1.0}}
    records = served.get("/api/runs/group/rome-run/records").json()
    assert records["records"] == [{"case_id": "0", "ES": 1.0, "nll": None}]
    for path in (
        "escape",  # a symbolic link out of the root
        "group/../escape",
        "group/%2e%2e/escape",
        "..%2Foutside",
        "%2Ftmp",
        "group",  # no manifest: not a run
        "nothing",
    ):
        response = served.get(f"/api/runs/{path}/records")
        assert response.status_code == 404, path
        assert "secret" not in response.text


def test_events_stream_steps_and_done(served):
    response = served.post("/api/edits", params={"wait": False}, json={**EDIT, "method": "rome+sadr"})
    assert response.status_code == 202
    edit_id = response.json()["id"]
    with served.stream("GET", f"/api/edits/{edit_id}/events") as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and "running" in kinds
    steps = [e for e in events if e["type"] == "step"]
    assert [s["step"] for s in steps] == list(range(len(steps))) and len(steps) >= 1
    assert {"nll", "kl", "weight_decay", "sadr"} <= set(steps[0]["parts"])
    status = served.get(f"/api/edits/{edit_id}").json()
    assert status["state"] == "done" and status["results"][0]["kind"] == "rewrite"


def test_concurrent_edits_equal_sequential_ones(served):
    requests = [
        {**EDIT, "method": "rome"},
        {**EDIT, "method": "ft", "target_new": "Berlin"},
        {**EDIT, "method": "rome+sadr", "target_new": "London"},
    ]
    sequential = [served.post("/api/edits", json=r).json()["results"] for r in requests]
    concurrent: list = [None] * 3

    def post(i: int) -> None:
        concurrent[i] = served.post("/api/edits", json=requests[i]).json()["results"]

    threads = [threading.Thread(target=post, args=(i,)) for i in (2, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert concurrent == sequential
    assert model_hash(served.bundle.model) == served.app.state.inspector.original_hash


def test_failed_edit_leaves_the_weights(served):
    # a layer outside the model is refused inside the worker, when the editor runs
    response = served.post("/api/edits", json={**EDIT, "params": {"layers": [7]}})
    assert response.status_code == 422 and response.json()["field"] == "request", response.text
    assert "layer" in response.json()["error"]
    assert model_hash(served.bundle.model) == served.app.state.inspector.original_hash
    assert served.get("/healthz").json()["status"] == "ok"


def test_serve_command(monkeypatch, tiny_dir, tmp_path):
    import sys

    import uvicorn
    from typer.testing import CliRunner

    from attnedit.cli.main import app

    served: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda web, **kwargs: served.update(app=web, **kwargs))
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert served["host"] == "127.0.0.1" and served["port"] == 8000
    assert "warning" not in result.output
    with TestClient(served["app"]) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/runs").json() == {"runs": []}
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "warning: serving on 0.0.0.0" in result.output
    # without the serve extra: one line saying what to install (tests/integration/test_extras.py has more)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir)])
    assert result.exit_code == 2 and "pip install 'attnedit[serve]'" in result.output, result.output


@pytest.fixture(scope="module")
def reports(served, tmp_path_factory, tiny_dir):
    """A TestClient whose runs root is ``make_eval_runs``'s."""
    root = make_eval_runs(tmp_path_factory.mktemp("reports"), tiny_dir)
    with TestClient(create_app(served.bundle, root)) as client:
        client.root = root  # type: ignore[attr-defined]
        yield client


def test_report_equals_runs_report(reports):
    from attnedit.analysis.engine import json_ready
    from attnedit.runs.report import collect, columns, markdown_table, paired, paired_table

    listed = {r["path"] for r in reports.get("/api/runs").json()["runs"]}
    assert {"evals/base", "evals/ft", "analysis"} == listed
    rows = collect([reports.root / "evals" / "base", reports.root / "evals" / "ft"])
    query = {"runs": ["evals/base", "evals/ft"], "against": "none", "magnitudes": True}
    body = reports.get("/api/report", params=query).json()
    assert body["columns"] == list(columns(True, False, rows))
    assert [r["label"] for r in body["rows"]] == [r.label for r in rows] == ["none", "ft"]
    assert [r["runs"] for r in body["rows"]] == [["evals/base"], ["evals/ft"]]  # relative to the root
    assert [r["summary"] for r in body["rows"]] == [json_ready(r.summary) for r in rows]
    assert [r["cases"] for r in body["rows"]] == [3, 3]
    assert body["markdown"] == markdown_table(rows, columns(True, False, rows))
    differences = paired(rows, "none", True)
    assert body["against"] == "none" and body["paired"] == json_ready(differences)
    assert body["paired_markdown"] == paired_table(differences, "none")
    assert body["paired"]["ft"]["ES"]["cases"] == 3
    # without against: no paired differences; without magnitudes: the table's columns only
    plain = reports.get("/api/report", params={"runs": ["evals/ft"]}).json()
    assert "paired" not in plain and plain["columns"] == list(columns(False, False, rows[1:]))


def test_report_stays_under_the_root_and_names_bad_input(reports):
    for path in ("escape", "evals/../escape", "evals/%2e%2e/escape", "../outside/secret", "/tmp", "evals"):
        response = reports.get("/api/report", params={"runs": ["evals/base", path]})
        assert response.status_code == 404, path
        assert "secret" not in response.text
    bad = [
        ({"runs": ["evals/base"], "against": "rome"}, "against"),
        ({"runs": ["evals/base", "evals/base"]}, "runs"),  # the same shard twice
        ({"runs": ["analysis"]}, "runs"),  # not an evaluation run
        ({}, "runs"),
    ]
    for params, field in bad:
        response = reports.get("/api/report", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["field"] == field, params
    # an inspector started without --runs has no report
    with TestClient(create_app(reports.app.state.inspector.bundle)) as client:
        response = client.get("/api/report", params={"runs": ["evals/base"]})
        assert response.status_code == 404 and response.json()["field"] == "runs"


def test_run_records_carry_each_case_s_own_scores(reports):
    """The records of an evaluation run carry flat per-case scores (share of a score's prompts right; the
    case's KnowEdit value), so the page can sort and filter cases, e.g. those whose distracted
    neighbours fail."""
    from attnedit.evaluation.metrics import case_counts
    from attnedit.runs.rundir import RESULTS, read_results

    body = reports.get("/api/runs/evals/ft/records").json()
    originals = {r["case_id"]: r for r in read_results(reports.root / "evals" / "ft" / RESULTS)}
    assert len(body["records"]) == 3
    for record in body["records"]:
        original = originals[record["case_id"]]
        for score in ("ES", "PS", "NS", "DNS"):
            ((hits, prompts),) = case_counts([original], score)
            assert record[score] == pytest.approx(hits / prompts, abs=1e-4), score
        assert 0.0 <= record["KE_EDIT"] <= 1.0


def test_the_form_offers_the_cases_of_the_server_s_data_file(served, tmp_path):
    """``attnedit serve --data FILE``: the case picker lists that file's cases (the server's choice; the
    browser names no path); a bad file fails when the app is made, naming the record and field."""
    from attnedit.core.data import DataFormatError, sample_path

    records = json.loads(Path(sample_path()).read_text())[:2]
    records[1]["requested_rewrite"]["subject"] = "Someone Else Entirely"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(records[:1]))
    with TestClient(create_app(served.bundle, None, str(path))) as client:
        cases = client.get("/api/sample").json()["cases"]
    assert len(cases) == 1 and cases[0]["subject"] == records[0]["requested_rewrite"]["subject"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"mine\.json\[1\]"):
        create_app(served.bundle, None, str(path))


@pytest.fixture(scope="module")
def streams(served, tmp_path_factory):
    """A TestClient whose runs root holds an edit stream that collapsed (``curves.jsonl``), a batch run
    without curves, and ``escape``: a symbolic link to a stream outside the root."""
    tmp = tmp_path_factory.mktemp("streams")
    root = tmp / "runs"
    write_run_dir(
        root / "streams" / "alpha", "alphaedit", method="alphaedit", lines=stream_lines(3, collapse=True)
    )
    write_run_dir(root / "batch", "memit", mode="batch")
    write_run_dir(tmp / "outside" / "secret", "secret", lines=stream_lines(2))
    (root / "escape").symlink_to(tmp / "outside" / "secret", target_is_directory=True)
    with TestClient(create_app(served.bundle, root)) as client:
        client.root = root  # type: ignore[attr-defined]
        yield client


def test_run_curves_are_the_stream_s_checkpoints(streams):
    from attnedit.runs.curves import read_curves

    listed = {r["path"]: r["curves"] for r in streams.get("/api/runs").json()["runs"]}
    assert listed == {"streams/alpha": True, "batch": False}
    body = streams.get("/api/runs/streams/alpha/curves").json()
    lines = read_curves(streams.root / "streams" / "alpha")
    assert body["lines"] == lines and [line["edits"] for line in lines] == [0, 100, 200, 300]
    assert body["collapsed"] == lines[-1]["collapsed"] and body["label"] == "alphaedit"
    es = next(m for m in body["metrics"] if m["key"] == "ES")
    assert es["points"] == [
        [line["edits"], line["edited"]["ES"]["mean"], line["edited"]["ES"]["ci95"]] if line["edited"] else
        [line["edits"], None, None]
        for line in lines
    ]  # fmt: skip
    # a run without checkpoints: nothing to draw
    plain = streams.get("/api/runs/batch/curves").json()
    assert plain["lines"] == [] and plain["metrics"] == [] and plain["collapsed"] is None
    for path in (
        "escape",
        "streams/../escape",
        "streams/%2e%2e/escape",
        "..%2Foutside/secret",
        "%2Ftmp",
        "streams",
    ):
        response = streams.get(f"/api/runs/{path}/curves")
        assert response.status_code == 404, path
        assert response.json()["field"] == "path" and "secret" not in response.text


def test_the_page_draws_a_run_s_curves(served):
    """The page asks for a selected run's curves and has the place to draw them (the browser test
    clicks through it)."""
    script = served.get("/static/app.js").text
    assert "/curves`" in script and "function curveChart" in script
    page = served.get("/").text
    assert 'id="run-curves"' in page and 'id="curves-table"' in page
