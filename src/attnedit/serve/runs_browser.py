"""The inspector's read-only runs browser: run directories under one root, their summaries and records.

Every path a browser sends is resolved strictly under the root: absolute paths, ``..`` parts and
anything that resolves outside the root (a symbolic link out of it) are refused as not found, so that
nothing outside the root can be read or even probed for existence. Nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

from attnedit.analysis.engine import json_ready
from attnedit.runs.rundir import MANIFEST, RESULTS, RunDir, read_results

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"  # an evaluation run's pooled metrics (runs.runner)
ANALYSIS_RECORDS = "cases.jsonl"  # an analysis run's records (runs.analysis_runs)
MAX_RUNS = 500  # run directories listed at most
MAX_DEPTH = 6  # directory levels searched under the root


class RunNotFoundError(LookupError):
    """A run path that is not a run directory under the root (or not allowed): answered as 404."""


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
                    "summary": json_ready(self._read_json(here / SUMMARY)),
                }
            )
            if len(runs) >= MAX_RUNS:
                break
        return runs

    def records(self, relative: str) -> dict:
        """The run's manifest and its records (all of them, in file order; NaN as null)."""
        path = self.resolve(relative)
        run = RunDir(path)
        manifest = run.read_manifest()
        file = self._record_file(path)
        records = read_results(file) if file is not None else []
        return {
            "path": path.relative_to(self.root).as_posix(),
            "manifest": json_ready(manifest),
            "summary": json_ready(self._read_json(path / SUMMARY)),
            "records": json_ready(records),
        }
