"""Edit streams in reports: the curve table at chosen numbers of edits (``runs.curves``), the figure
(``analysis.plots.curve_grid``), ``attnedit report``'s curves files and table, and the runs browser's
curves of a run (``serve.runs_browser``). The run directories are written by hand (``helpers``:
``write_run_dir``, ``stream_lines``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import CHANGED, stream_lines, write_run_dir
from typer.testing import CliRunner

from attnedit.cli.main import app
from attnedit.runs import curves as rc
from attnedit.runs.report import collect
from attnedit.runs.rundir import CURVES, read_curves

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """A MEMIT stream of 10 checkpoints every 100 edits, an AlphaEdit stream that collapsed at its 4th,
    a MEMIT batch run (no curves, the same label as the stream) and a ROME run in two shards."""
    return {
        "memit": write_run_dir(tmp_path / "memit-seq", "memit", lines=stream_lines(10)),
        "alpha": write_run_dir(
            tmp_path / "alpha-seq", "alphaedit", method="alphaedit", lines=stream_lines(4, collapse=True)
        ),
        "batch": write_run_dir(tmp_path / "memit-batch", "memit", mode="batch"),
        "rome0": write_run_dir(tmp_path / "rome-0", "rome", method="rome", mode="single", shard=(0, 2)),
        "rome1": write_run_dir(tmp_path / "rome-1", "rome", method="rome", mode="single", shard=(1, 2)),
    }


def _streams(runs: dict[str, Path]) -> list[rc.RunCurves]:
    return rc.stream_curves(collect(list(runs.values())))


def test_the_stream_file_comes_back_in_order_of_edits(runs):
    # lines out of order on disk come back in order of edits
    path = runs["memit"] / CURVES
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\n")
    assert [line["edits"] for line in read_curves(runs["memit"])] == [100 * i for i in range(11)]


def test_only_streams_have_curves_and_mixed_runs_stay_apart(runs):
    rows = collect(list(runs.values()))
    # the batch run and the stream share the label "memit" but are other runs: told apart, not merged
    assert [r.label for r in rows] == ["memit [memit-seq]", "alphaedit", "memit [memit-batch]", "rome"]
    assert rows[3].run_dirs == [str(runs["rome0"]), str(runs["rome1"])]  # the shards are one row
    streams = rc.stream_curves(rows)
    assert [(c.label, c.run_dir) for c in streams] == [
        ("memit [memit-seq]", str(runs["memit"])),
        ("alphaedit", str(runs["alpha"])),
    ]
    assert streams[0].collapsed is None
    assert streams[1].collapsed == stream_lines(4, collapse=True)[-1]["collapsed"]


def test_default_points_are_up_to_six_evenly_spaced_with_the_last(runs):
    memit, alpha = _streams(runs)
    table = rc.curve_table([memit])
    edits = memit.edits  # 0, 100, ..., 1000: 11 checkpoints
    step = (len(edits) - 1) / (rc.DEFAULT_POINTS - 1)
    assert table.points == [edits[round(i * step)] for i in range(rc.DEFAULT_POINTS)]
    assert table.points[0] == 0 and table.points[-1] == edits[-1] and table.at is None
    # a stream with fewer checkpoints shows all of them
    assert rc.curve_table([alpha]).points == alpha.edits
    # together: the points among every run's checkpoints; the collapsed stream also shows its own last
    both = rc.curve_table([memit, alpha])
    assert both.points == table.points
    rows = [(run.label, edits) for run, edits, _ in both.rows]
    assert rows == [("memit [memit-seq]", e) for e in table.points] + [
        ("alphaedit", e) for e in sorted(set(table.points) | {alpha.edits[-1]})
    ]
    # the rows hold the runs' own lines; after its collapse the AlphaEdit stream has none
    for run, e, line in both.rows:
        assert line == (run.at(e) if e in run.edits else None)
    assert [e for run, e, line in both.rows if line is None] == [
        e for e in table.points if e > alpha.edits[-1]
    ]


def test_at_picks_those_checkpoints_and_marks_missing_ones(runs):
    memit, alpha = _streams(runs)
    table = rc.curve_table([memit, alpha], at=[1000, 100, 250])
    assert table.points == table.at == [100, 250, 1000]
    assert [(run.label, e, line is not None) for run, e, line in table.rows] == [
        ("memit [memit-seq]", 100, True),
        ("memit [memit-seq]", 250, False),  # no checkpoint at 250 edits
        ("memit [memit-seq]", 1000, True),
        ("alphaedit", 100, True),
        ("alphaedit", 250, False),
        ("alphaedit", 1000, False),  # it stopped at 400
    ]
    md = rc.markdown_curves(table).splitlines()
    head = [c.strip() for c in md[0].strip("|").split("|")]
    assert head == ["Run", "edits", "ES", "PS", "NS", "PIQA", "ppl", "known", "fluency", "change", "stopped"]
    cells = {(r[0], int(r[1])): r[2:] for r in ([c.strip() for c in x.strip("|").split("|")] for x in md[2:])}
    missing = cells[("memit [memit-seq]", 250)]
    assert missing[:-1] == [rc.MISSING] * 8 and missing[-1] == ""
    assert cells[("alphaedit", 1000)][:-1] == [rc.MISSING] * 8
    line = memit.at(1000)
    assert line is not None
    es = line["edited"]["ES"]
    assert cells[("memit [memit-seq]", 1000)][0] == f"{es['mean']:.1f} ± {es['ci95']:.1f}"
    assert cells[("memit [memit-seq]", 1000)][3] == f"{line['general']['piqa']:.3f}"
    assert (
        cells[("memit [memit-seq]", 1000)][7] == f"{max(w['change'] for w in line['weights'].values()):.2f}"
    )
    # curves.json: the same rows, values null where there is no checkpoint
    data = rc.curves_json(table)
    assert data["at"] == [100, 250, 1000]
    assert [(r["label"], r["edits"], r["values"] is None) for r in data["rows"]] == [
        (run.label, e, line is None) for run, e, line in table.rows
    ]
    assert data["rows"][0]["values"]["ES"] == {
        "mean": memit.lines[1]["edited"]["ES"]["mean"],
        "ci95": memit.lines[1]["edited"]["ES"]["ci95"],
    }
    assert data["runs"][1] == {
        "label": "alphaedit",
        "run_dir": alpha.run_dir,
        "checkpoints": alpha.edits,
        "collapsed": alpha.collapsed,
    }


def test_the_collapse_is_named_in_its_row(runs):
    _, alpha = _streams(runs)
    md = rc.markdown_curves(rc.curve_table([alpha]))
    last = md.splitlines()[-1]
    assert last.startswith(f"| alphaedit | {alpha.edits[-1]} |") and last.endswith(f"| {alpha.collapsed} |")
    assert sum(alpha.collapsed in row for row in md.splitlines()) == 1


def test_metric_values(runs):
    memit, _ = _streams(runs)
    unedited, first = memit.lines[0], memit.lines[1]
    # the largest accumulated change over the edited parameters; 0 for the unedited model
    assert rc.largest_change(first) == max(first["weights"][n]["change"] for n in CHANGED)
    assert rc.largest_change(unedited) == 0.0
    assert rc.largest_change({"edits": 100, "weights": {}}) is None  # method none: nothing edited
    assert rc.CHANGE.value(first) == (rc.largest_change(first), None)
    es = next(m for m in rc.EDITED if m.key == "ES")
    assert es.value(unedited) == (None, None)
    assert es.value(first) == (first["edited"]["ES"]["mean"], first["edited"]["ES"]["ci95"])
    # a key turned off (no PIQA) has no value and no column
    for line in memit.lines:
        del line["general"]["piqa"]
    assert "PIQA" not in [m.key for m in rc.metrics_of([memit])]
    # generation scores appear where the lines have them; KnowEdit scores only with portability/locality
    memit.lines[1]["edited"] |= {"GES": {"mean": 50.0, "ci95": 5.0, "n": 100}, "KE_EDIT": {"mean": 90.0}}
    keys = [m.key for m in rc.metrics_of([memit])]
    assert "GES" in keys and "GPS" not in keys and "KE_EDIT" not in keys
    memit.lines[1]["edited"]["KE_LOC"] = {"mean": 70.0, "ci95": 4.0, "n": 100}
    keys = [m.key for m in rc.metrics_of([memit])]
    assert keys.index("NS") < keys.index("GES") < keys.index("KE_EDIT") < keys.index("KE_LOC")


def test_parse_points():
    assert rc.parse_points("1000, 100,500,100") == [100, 500, 1000]
    for bad in ("100,x", "", "1.5", "-100", "²"):
        with pytest.raises(ValueError, match="not a number of edits"):
            rc.parse_points(bad)


def test_the_figure_has_a_panel_per_metric_and_marks_the_collapse(runs, tmp_path):
    from attnedit.analysis.plots import curve_figure

    memit, alpha = _streams(runs)
    panels = rc.panels([memit, alpha])
    assert [p.title for p in panels] == [m.title for m in rc.metrics_of([memit, alpha])]
    assert panels[0].curves["alphaedit"].band is not None and panels[-1].curves["alphaedit"].band is None
    fig = curve_figure(panels, stopped=["alphaedit"])
    axes = fig.axes
    assert len(axes) == len(panels)
    for ax, panel in zip(axes, panels, strict=True):
        crosses = [line for line in ax.get_lines() if line.get_marker() == "X"]
        curve = panel.curves["alphaedit"]
        finite = np.flatnonzero(np.isfinite(curve.y))
        assert len(crosses) == 1  # only the collapsed stream's line, at its last value
        assert crosses[0].get_xdata()[0] == curve.x[finite[-1]] == alpha.edits[-1]
        assert crosses[0].get_ydata()[0] == curve.y[finite[-1]]
    assert axes[[p.title for p in panels].index("perplexity")].get_yscale() == "log"
    assert not [
        line for ax in curve_figure(panels).axes for line in ax.get_lines() if line.get_marker() == "X"
    ]
    path = rc.figure([memit, alpha], tmp_path / "fig" / "curves.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_report_cli_writes_the_curve_files(runs, tmp_path):
    out = tmp_path / "rep"
    result = CliRunner().invoke(
        app, ["report", *map(str, runs.values()), "--out", str(out), "--at", "100,250"]
    )
    assert result.exit_code == 0, result.output
    paths = json.loads(result.output.strip().splitlines()[-1])
    for name in ("report.md", "report.csv", "report.json", "curves.md", "curves.json", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert paths["curves_png"] == str(out / "curves.png")
    assert (out / "curves.png").read_bytes()[:8] == PNG
    expected = rc.curve_table(_streams(runs), at=[100, 250])
    assert (out / "curves.md").read_text() == rc.markdown_curves(expected) + "\n"
    assert json.loads((out / "curves.json").read_text()) == json.loads(json.dumps(rc.curves_json(expected)))
    assert "Stream checkpoints" not in result.output  # written to files, not printed


def test_report_cli_prints_the_curve_table_without_out(runs):
    result = CliRunner().invoke(app, ["report", *map(str, runs.values())])
    assert result.exit_code == 0, result.output
    table, _, curves = result.output.partition("Stream checkpoints")
    assert "| memit [memit-batch] |" in table and "| rome |" in table
    assert rc.markdown_curves(rc.curve_table(_streams(runs))) in curves


def test_report_cli_without_streams_and_bad_at(runs, tmp_path, caplog, monkeypatch):
    plain = [str(runs["batch"]), str(runs["rome0"]), str(runs["rome1"])]
    monkeypatch.setattr("attnedit.cli.main.setup_logging", lambda *a: None)  # keeps caplog's handler
    with caplog.at_level(logging.WARNING, logger="attnedit"):
        result = CliRunner().invoke(app, ["report", *plain, "--out", str(tmp_path / "rep"), "--at", "100"])
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "rep").glob("curves.*"))
    assert "Stream checkpoints" not in result.output
    assert any("--at" in r.getMessage() and "curves.jsonl" in r.getMessage() for r in caplog.records)
    bad = CliRunner().invoke(app, ["report", *plain, "--at", "100,lots"])
    assert bad.exit_code == 2 and "--at" in bad.output and "'lots'" in bad.output


def test_a_torn_last_line_is_left_out(runs):
    with (runs["memit"] / CURVES).open("a") as fh:
        fh.write('{"edits": 1100, "edi')  # a write in progress
    assert read_curves(runs["memit"])[-1]["edits"] == 1000


# -- the runs browser ------------------------------------------------------------------------------------


def test_runs_browser_serves_a_stream_s_curves(runs, tmp_path):
    from attnedit.serve.runs_browser import RunNotFoundError, RunsBrowser

    outside = write_run_dir(tmp_path.parent / f"{tmp_path.name}-outside", "secret", lines=stream_lines(2))
    (tmp_path / "escape").symlink_to(outside, target_is_directory=True)
    browser = RunsBrowser(tmp_path)
    listed = {r["path"]: r["curves"] for r in browser.list_runs()}
    assert listed == {
        "alpha-seq": True,
        "memit-batch": False,
        "memit-seq": True,
        "rome-0": False,
        "rome-1": False,
    }
    body = browser.curves("alpha-seq")
    lines = read_curves(runs["alpha"])
    assert body["lines"] == lines and body["label"] == "alphaedit" and body["path"] == "alpha-seq"
    assert body["collapsed"] == lines[-1]["collapsed"]
    run = rc.RunCurves("alphaedit", str(runs["alpha"]), lines)
    assert [m["key"] for m in body["metrics"]] == [m.key for m in rc.metrics_of([run])]
    for metric, served in zip(rc.metrics_of([run]), body["metrics"], strict=True):
        assert [list(p) for p in served["points"]] == [list(p) for p in rc.series(run, metric)]
    assert browser.curves("memit-batch") == {
        "path": "memit-batch", "label": "memit", "collapsed": None, "metrics": [], "lines": [],
    }  # fmt: skip
    for path in ("escape", "../" + outside.name, "alpha-seq/../escape", "/" + str(outside).lstrip("/"), "x"):
        with pytest.raises(RunNotFoundError):
            browser.curves(path)
    # a linked curves file is not followed
    (runs["rome0"] / CURVES).symlink_to(outside / CURVES)
    assert browser.curves("rome-0")["lines"] == []
    # NaN (a collapsed perplexity) as null
    nan = stream_lines(1)
    nan[-1]["general"]["ppl"] = float("nan")
    (runs["batch"] / CURVES).write_text("".join(json.dumps(line) + "\n" for line in nan))
    ppl = next(m for m in browser.curves("memit-batch")["metrics"] if m["key"] == "ppl")
    assert ppl["points"][-1] == [100, None, None]


def test_runs_in_directories_of_the_same_name_are_told_apart(tmp_path):
    """Rows of one label whose run directories share their name are labelled by as much of their path
    as tells them apart; two shards of a stream with checkpoints each get their line."""
    a = write_run_dir(tmp_path / "a" / "run", "memit", lines=stream_lines(2))
    b = write_run_dir(tmp_path / "b" / "run", "memit", every=50, lines=stream_lines(4, every=50))
    shards = [
        write_run_dir(
            tmp_path / "s" / f"part-{i}", "pmet", method="pmet", shard=(i, 2), lines=stream_lines(1)
        )
        for i in range(2)
    ]
    rows = collect([a, b, *shards])
    assert [r.label for r in rows] == ["memit [a/run]", "memit [b/run]", "pmet"]
    streams = rc.stream_curves(rows)
    assert [c.label for c in streams] == ["memit [a/run]", "memit [b/run]", "pmet [part-0]", "pmet [part-1]"]
    assert [c.run_dir for c in streams] == [str(a), str(b), *map(str, shards)]
    assert list(rc.panels(streams)[0].curves) == [c.label for c in streams]  # one line each
