"""The inspector's read-only runs browser: run directories under one root, their summaries and records,
an edit stream's checkpoints (``runs.curves``) and the report of several of them (``runs.report``, as
``attnedit report`` prints it).

Every path a browser sends is resolved strictly under the root: absolute paths, ``..`` parts and
anything that resolves outside the root (a symbolic link out of it) are refused as not found, so that
nothing outside the root can be read or even probed for existence. Nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, cast

from attnedit.analysis.engine import json_ready
from attnedit.evaluation.metrics import COMPARISON_METRICS, GENERATION_METRICS, KNOWEDIT_METRICS, case_counts
from attnedit.evaluation.records import CaseRecord
from attnedit.runs.curves import RunCurves, metrics_of, series
from attnedit.runs.report import collect, columns, markdown_table, paired, paired_table
from attnedit.runs.rundir import (
    CURVES,
    MANIFEST,
    RESULTS,
    RunConflictError,
    RunDir,
    read_curves,
    read_results,
)

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"  # an evaluation run's pooled metrics (runs.runner)
ANALYSIS_RECORDS = "cases.jsonl"  # an analysis run's records (runs.analysis_runs)
MAX_RUNS = 500  # run directories listed at most
MAX_DEPTH = 6  # directory levels searched under the root
MAX_REPORT_RUNS = 50  # run directories in one report at most


class RunNotFoundError(LookupError):
    """A run path that is not a run directory under the root (or not allowed): answered as 404."""


class ReportError(ValueError):
    """Run directories that make no report (not evaluation runs, a shard twice, an unknown ``against``
    label); ``field`` names the query parameter: answered as 422."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class RunsBrowser:
    """Lists and reads the run directories under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve(strict=True)

    def _inside(self, path: Path) -> bool:
        return path == self.root or path.is_relative_to(self.root)

    def resolve(self, relative: str) -> Path:
        """The run directory ``relative`` names under the root, or ``RunNotFoundError``."""
        if not relative or "\\" in relative or "\x00" in relative:
            raise RunNotFoundError(relative)
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or any(p in ("..", ".") for p in parts) or not parts:
            raise RunNotFoundError(relative)
        path = (self.root / Path(*parts)).resolve()
        if not self._inside(path) or not path.is_dir() or not (path / MANIFEST).is_file():
            raise RunNotFoundError(relative)
        return path

    def _record_file(self, path: Path) -> Path | None:
        for name in (RESULTS, ANALYSIS_RECORDS):
            candidate = path / name
            if candidate.is_file() and self._inside(candidate.resolve()):
                return candidate
        return None

    def _curves_file(self, path: Path) -> Path | None:
        """The run's checkpoint file (an edit stream's), or None; a symbolic link is not followed."""
        candidate = path / CURVES
        return candidate if candidate.is_file() and not candidate.is_symlink() else None

    def _read_json(self, path: Path) -> Any:
        if path.is_symlink() or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("%s: unreadable (%s)", path, err)
            return None

    def list_runs(self) -> list[dict]:
        """Every run directory under the root (a directory with a manifest), without following links."""
        runs = []
        for current, dirs, files in os.walk(self.root, followlinks=False):
            here = Path(current)
            depth = len(here.relative_to(self.root).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
            if MANIFEST not in files or here == self.root:
                continue
            manifest = RunDir(here).read_manifest() if not (here / MANIFEST).is_symlink() else None
            if not isinstance(manifest, dict):
                continue
            records = self._record_file(here)
            runs.append(
                {
                    "path": here.relative_to(self.root).as_posix(),
                    "kind": "analysis" if manifest.get("analysis") else "evaluation",
                    "label": manifest.get("label") or manifest.get("method") or manifest.get("analysis"),
                    "method": manifest.get("method"),
                    "model": (manifest.get("model") or {}).get("name"),
                    "data": (manifest.get("data") or {}).get("path"),
                    "created": manifest.get("created"),
                    "records": records.name if records else None,
                    "curves": self._curves_file(here) is not None,
                    "summary": json_ready(self._read_json(here / SUMMARY)),
                }
            )
            if len(runs) >= MAX_RUNS:
                break
        return runs

    def records(self, relative: str) -> dict:
        """The run's manifest and its records (all of them, in file order; NaN as null)."""
        path = self.resolve(relative)
        manifest = RunDir[dict[str, Any]](path).read_manifest()
        file = self._record_file(path)
        records = read_results(file) if file is not None else []
        for record in records:
            record.update(case_scores(record))
        return {
            "path": path.relative_to(self.root).as_posix(),
            "manifest": json_ready(manifest),
            "summary": json_ready(self._read_json(path / SUMMARY)),
            "records": json_ready(records),
        }

    def curves(self, relative: str) -> dict:
        """An edit stream's checkpoints: its ``curves.jsonl`` lines in order of edits (none for a run
        without checkpoints), why it stopped (``collapsed``) and per metric that has values the points
        ``[edits, mean, ci95]`` that ``attnedit report`` draws (``runs.curves``); NaN as null."""
        path = self.resolve(relative)
        manifest = RunDir[dict[str, Any]](path).read_manifest() or {}
        file = self._curves_file(path)
        try:
            lines = read_curves(path) if file is not None else []
        except (OSError, ValueError, RunConflictError) as err:  # an unreadable line
            raise ReportError("path", str(err)) from None
        run = RunCurves(manifest.get("label") or manifest.get("method") or path.name, str(path), lines)
        metrics = [
            {"key": m.key, "title": m.title, "digits": m.digits, "log": m.log, "points": series(run, m)}
            for m in metrics_of([run])
        ]
        return {
            "path": path.relative_to(self.root).as_posix(),
            "label": run.label,
            "collapsed": run.collapsed,
            "metrics": json_ready(metrics),
            "lines": json_ready(lines),
        }

    def report(
        self, relatives: list[str], against: str | None = None, magnitudes: bool = False, extra: bool = False
    ) -> dict:
        """The report of the runs ``relatives`` names under the root, as ``attnedit report`` makes it
        (``runs.report``): its columns and rows (label, run paths, cases, the pooled summary) and its
        markdown table; with ``against``, every other row minus that row on their shared cases."""
        if not relatives:
            raise ReportError("runs", "give at least one run")
        if len(relatives) > MAX_REPORT_RUNS:
            raise ReportError("runs", f"at most {MAX_REPORT_RUNS} runs in one report")
        paths = [self.resolve(r) for r in relatives]  # each confined to the root, as ``records``
        try:
            rows = collect(paths)
        except (KeyError, TypeError) as err:  # a manifest without the fields of an evaluation run
            raise ReportError("runs", f"not an evaluation run directory (its manifest lacks {err})") from None
        except (OSError, ValueError, RunConflictError) as err:  # a shard twice, a linked or torn file
            raise ReportError("runs", str(err)) from None
        cols = columns(magnitudes, extra, rows)
        out: dict[str, Any] = {
            "columns": list(cols),
            "rows": [
                {
                    "label": row.label,
                    "runs": [Path(d).relative_to(self.root).as_posix() for d in row.run_dirs],
                    "cases": row.summary["_cases"],
                    "complete": row.summary["_complete_shards"],
                    "summary": json_ready(row.summary),
                }
                for row in rows
            ],
            "markdown": markdown_table(rows, cols),
        }
        if against is not None:
            try:
                differences = paired(rows, against, magnitudes)
            except ValueError as err:
                raise ReportError("against", str(err)) from None
            out.update(
                against=against,
                paired=json_ready(differences),
                paired_markdown=paired_table(differences, against),
            )
        return out


def case_scores(record: dict[str, Any]) -> dict[str, float]:
    """One evaluation record's own scores as flat fields the page can sort and filter on: per comparison
    score (``ES``, ``DNS``, ``ES@fr``...) the share of its prompts the case gets right, per KnowEdit metric
    the case's value (EasyEdit's averaging), per generation score (``GES``, ``GPS``) the share of its
    prompts whose greedy answer gives the target; scores without prompts are left out."""
    comparisons = record.get("comparisons")
    if not isinstance(comparisons, dict):
        return {}  # an analysis record
    names = [key for key in comparisons if key.partition("@")[0] in {m.score for m in COMPARISON_METRICS}]
    names += [key for key in record.get("knowedit", {}) if key.partition("@")[0] in KNOWEDIT_METRICS]
    names += [
        key for key in record.get("generation_score", {}) if key.partition("@")[0] in GENERATION_METRICS
    ]
    evaluated = cast(CaseRecord, record)  # it has comparisons: an evaluation record, as written
    out = {}
    for name in names:
        ((value, prompts),) = case_counts([evaluated], name)
        if prompts:
            out[name] = round(float(value / prompts), 4)
    return out
