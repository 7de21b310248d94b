"""Stream curves: the checkpoint lines of sequential runs (``OUT/curves.jsonl``, written by
``runs.sequential``) side by side, as ``attnedit report`` writes them: a table at chosen edit counts
(``curves.md``/``curves.json``) and one figure panel per metric (``curves.png``, drawn by
``analysis.plots.curve_grid``). The inspector's runs browser serves the same series.

A checkpoint line holds the scores of a seeded sample of the edits so far (``edited``: ES, PS, NS, ...,
each ``{"mean", "ci95", "n"}``, empty at 0 edits), general ability (``general``: PIQA accuracy,
perplexity, known facts kept, fluency; any may be absent), per edited parameter the norm of its weights
and of the stream's accumulated change (``weights``), timings, and ``collapsed`` on the line where the
stream stopped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnedit.analysis.plots import Curve, CurvePanel, curve_grid
from attnedit.evaluation.metrics import GENERATION_METRICS, KNOWEDIT_METRICS
from attnedit.runs.report import ReportRow, distinct_names
from attnedit.runs.rundir import read_curves

logger = logging.getLogger(__name__)

DEFAULT_POINTS = 6
"""Checkpoints a curve table shows without ``--at``: at most this many, evenly spaced, the last included."""
MISSING = "–"
"""A table row of a run that has no checkpoint at that number of edits."""


@dataclass(frozen=True)
class CurveMetric:
    """One curve: where a checkpoint line keeps it (``section``/``name``), its table column (``key``),
    its panel title, the digits it is printed with and whether its axis is logarithmic."""

    key: str
    title: str
    section: str  # "edited", "general" or "weights" (the largest accumulated change)
    name: str
    digits: int
    log: bool = False

    def value(self, line: Mapping[str, Any]) -> tuple[float | None, float | None]:
        """``(mean, ci95)`` of this metric on a checkpoint line (ci95 only for the scores of the edits);
        ``(None, None)`` where the line has none."""
        if self.section == "edited":
            entry = (line.get("edited") or {}).get(self.name) or {}
            return _number(entry.get("mean")), _number(entry.get("ci95"))
        if self.section == "general":
            return _number((line.get("general") or {}).get(self.name)), None
        return largest_change(line), None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def largest_change(line: Mapping[str, Any]) -> float | None:
    """The largest norm of the accumulated change over the edited parameters of a checkpoint line: 0 at 0
    edits (the unedited model), None where the line names no edited parameter (method ``none``)."""
    changes = [_number(w.get("change")) for w in (line.get("weights") or {}).values() if isinstance(w, dict)]
    found = [c for c in changes if c is not None]
    if found:
        return max(found)
    return 0.0 if int(line.get("edits", -1)) == 0 else None


EDITED = tuple(
    CurveMetric(name, f"{name} (edits so far, %)", "edited", name, 1)
    for name in ("ES", "PS", "NS", *GENERATION_METRICS, *KNOWEDIT_METRICS)
)
GENERAL = (
    CurveMetric("PIQA", "PIQA accuracy", "general", "piqa", 3),
    CurveMetric("ppl", "perplexity", "general", "ppl", 2, log=True),
    CurveMetric("known", "known facts kept", "general", "known", 3),
    CurveMetric("fluency", "fluency (n-gram entropy)", "general", "fluency", 2),
)
CHANGE = CurveMetric("change", "largest change norm", "weights", "change", 2)
METRICS = (*EDITED, *GENERAL, CHANGE)
"""Every curve, in the order of the table's columns and the figure's panels."""


@dataclass
class RunCurves:
    """One stream's checkpoint lines (in order of edits) and the row label it is shown under."""

    label: str
    run_dir: str
    lines: list[dict[str, Any]]

    @property
    def edits(self) -> list[int]:
        return [int(line["edits"]) for line in self.lines]

    @property
    def collapsed(self) -> str | None:
        """Why the stream stopped (its last line's ``collapsed``), or None."""
        return self.lines[-1].get("collapsed") if self.lines else None

    def at(self, edits: int) -> dict[str, Any] | None:
        """The checkpoint line after ``edits`` edits, or None."""
        return next((line for line in self.lines if int(line["edits"]) == edits), None)


def stream_curves(rows: Sequence[ReportRow]) -> list[RunCurves]:
    """The curves of the report rows' run directories that have them, labelled by their row (a row whose
    several directories have curves, e.g. shards, one entry each, named ``label [directory]``)."""
    out = []
    for row in rows:
        found = [(d, lines) for d in row.run_dirs if (lines := read_curves(d))]
        names = distinct_names([d for d, _ in found])
        for (d, lines), name in zip(found, names, strict=True):
            out.append(RunCurves(row.label if len(found) == 1 else f"{row.label} [{name}]", d, lines))
    seen: dict[str, int] = {}
    for c in out:  # a figure's lines are named by label: one each, whatever the rows' labels are
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c.label = f"{c.label} ({seen[c.label]})"
    return out


def metrics_of(curves: Sequence[RunCurves]) -> list[CurveMetric]:
    """The metrics some checkpoint of ``curves`` has a value of; the KnowEdit scores only with
    portability or locality probes (every case has KE_EDIT, so that alone says nothing), as the report's
    columns."""

    def has(metric: CurveMetric) -> bool:
        return any(metric.value(line)[0] is not None for c in curves for line in c.lines)

    knowedit = any(has(m) for m in EDITED if m.name in ("KE_PORT", "KE_LOC"))
    return [m for m in METRICS if has(m) and (knowedit or m.name not in KNOWEDIT_METRICS)]


def parse_points(text: str) -> list[int]:
    """``--at 100,500,1000`` -> the edit counts, ascending, each once; ValueError naming a bad one."""
    points = set()
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()):
            raise ValueError(f"{part!r} is not a number of edits; give counts such as 100,500,1000")
        points.add(int(part))
    return sorted(points)


def evenly_spaced(values: Sequence[int], count: int = DEFAULT_POINTS) -> list[int]:
    """At most ``count`` of the ascending ``values``, evenly spaced by position, first and last included."""
    if len(values) <= count:
        return list(values)
    if count == 1:
        return [values[-1]]
    return sorted({values[round(i * (len(values) - 1) / (count - 1))] for i in range(count)})


@dataclass
class CurveTable:
    """The checkpoints of several streams at chosen numbers of edits: one row per run and point."""

    points: list[int]
    at: list[int] | None
    metrics: list[CurveMetric]
    rows: list[tuple[RunCurves, int, dict[str, Any] | None]]  # run, edits, its line (None: no checkpoint)


def curve_table(curves: Sequence[RunCurves], at: Sequence[int] | None = None) -> CurveTable:
    """The rows of the curve table. ``at``: these edit counts for every run (a run without a checkpoint
    there gets a row of ``MISSING``); without it, up to ``DEFAULT_POINTS`` evenly spaced among every run's
    checkpoints (the largest count included), plus each run's own last checkpoint where it stopped before
    (a collapse)."""
    if at is not None:
        points = sorted(set(at))
    else:
        points = evenly_spaced(sorted({e for c in curves for e in c.edits}))
    rows = []
    for c in curves:
        mine = points if at is not None or not c.lines else sorted(set(points) | {c.edits[-1]})
        rows += [(c, edits, c.at(edits)) for edits in mine]
    return CurveTable(points, None if at is None else points, metrics_of(curves), rows)


def _cell(metric: CurveMetric, line: Mapping[str, Any]) -> str:
    mean, ci = metric.value(line)
    if mean is None:
        return "-"
    if ci is None or not math.isfinite(ci):
        return f"{mean:.{metric.digits}f}"
    return f"{mean:.{metric.digits}f} ± {ci:.{metric.digits}f}"


def markdown_curves(table: CurveTable) -> str:
    """Markdown: per run and point the metrics (``-``: no value at that checkpoint, ``–``: no checkpoint
    at that number of edits), and the reason on the line where a stream collapsed."""
    head = "| Run | edits | " + " | ".join(m.key for m in table.metrics) + " | stopped |"
    lines = [head, "|---|---:|" + "---:|" * len(table.metrics) + "---|"]
    for run, edits, line in table.rows:
        if line is None:
            cells = [MISSING] * len(table.metrics) + [""]
        else:
            cells = [_cell(m, line) for m in table.metrics] + [line.get("collapsed") or ""]
        lines.append(f"| {run.label} | {edits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves_json(table: CurveTable) -> dict[str, Any]:
    """curves.json: the points, the metrics and the table's rows (``values`` null where the run has no
    checkpoint at that point; a score of the edits as ``{"mean", "ci95"}``, others as numbers)."""

    def values(line: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in table.metrics:
            mean, ci = m.value(line)
            out[m.key] = {"mean": mean, "ci95": ci} if m.section == "edited" else mean
        return out

    runs: dict[str, RunCurves] = {r.run_dir: r for r, _, _ in table.rows}
    return {
        "at": table.at,
        "points": table.points,
        "metrics": [{"key": m.key, "title": m.title} for m in table.metrics],
        "runs": [
            {
                "label": r.label,
                "run_dir": r.run_dir,
                "checkpoints": r.edits,
                "collapsed": r.collapsed,
            }
            for r in runs.values()
        ],
        "rows": [
            {
                "label": run.label,
                "run_dir": run.run_dir,
                "edits": edits,
                "values": None if line is None else values(line),
                "collapsed": None if line is None else line.get("collapsed"),
            }
            for run, edits, line in table.rows
        ],
    }


def _finite(value: Any) -> Any:
    """A JSON-ready copy: NaN and infinities as None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def series(curves: RunCurves, metric: CurveMetric) -> list[tuple[int, float | None, float | None]]:
    """``(edits, mean, ci95)`` of one metric at every checkpoint of one stream."""
    return [(int(line["edits"]), *metric.value(line)) for line in curves.lines]


def panels(curves: Sequence[RunCurves]) -> list[CurvePanel]:
    """The figure's panels: one per metric (``metrics_of``) against the number of edits, one line per run
    (the scores of the edits with their 95% band)."""

    def curve(c: RunCurves, metric: CurveMetric) -> Curve:
        points = series(c, metric)
        nan = float("nan")
        band = [ci if ci is not None else nan for _, _, ci in points]
        return Curve(
            np.array([e for e, _, _ in points], dtype=float),
            np.array([v if v is not None else nan for _, v, _ in points], dtype=float),
            np.array(band, dtype=float) if metric.section == "edited" else None,
        )

    return [
        CurvePanel(metric.title, {c.label: curve(c, metric) for c in curves}, log=metric.log)
        for metric in metrics_of(curves)
    ]


def figure(curves: Sequence[RunCurves], path: str | Path, title: str = "") -> Path:
    """curves.png: ``panels`` in a grid, a cross where a stream collapsed (``analysis.plots.curve_grid``)."""
    stopped = [c.label for c in curves if c.collapsed]
    return curve_grid(panels(curves), path, stopped=stopped, title=title, xlabel="edits")


def write_curves(
    curves: Sequence[RunCurves], out_dir: str | Path, at: Sequence[int] | None = None
) -> dict[str, Path]:
    """curves.md, curves.json (the table at ``at``, ``curve_table``; non-finite numbers as null) and
    curves.png (``figure``; none when no checkpoint holds a value) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = curve_table(curves, at)
    paths = {"curves_md": out / "curves.md", "curves_json": out / "curves.json"}
    paths["curves_md"].write_text(markdown_curves(table) + "\n")
    paths["curves_json"].write_text(json.dumps(_finite(curves_json(table)), indent=1, allow_nan=False))
    if table.metrics:
        paths["curves_png"] = figure(curves, out / "curves.png")
    else:
        logger.warning("the streams' checkpoints hold no values to draw; no curves.png")
    return paths
