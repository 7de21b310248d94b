"""A run directory: the one implementation behind evaluation runs (``attnedit eval``) and analysis runs
(``attnedit analyze``).

Layout (the record file's name is the caller's: ``results.jsonl`` for evaluations, ``cases.jsonl`` for
analyses)::

    manifest.json   the settings of the latest invocation, with the directory's first ``created`` stamp
    RECORDS.jsonl   one JSON line per finished case, appended, flushed and fsynced one by one
    NAME.json       summaries and results, written atomically (a temporary file renamed over it)

Resuming: a manifest that differs from the existing one in an identity field is refused; a torn last
line (an interrupted write) is cut off; cases already recorded are not computed again. Every record is
written by ``RunDir.append``, so whoever holds the ``RunDir`` (a case loop, or a driver receiving finished
records from workers) is the one writer of the record file.

Reading a run (``records``, ``selected_records``, ``read_manifest``) needs neither torch nor a model.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RESULTS = "results.jsonl"

# identity fields newer than some run directories, with the value an older manifest implies
ADDED_LATER: dict[str, Any] = {"first": 0}

R = TypeVar("R", bound=Mapping[str, Any])


class RunConflictError(RuntimeError):
    """The output directory holds a run with different settings."""


def seed_everything(seed: int) -> int:
    """Seed Python's, NumPy's and torch's generators; returns ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def model_manifest(bundle: Any) -> dict:
    """The model part of every manifest (runs and analyses) of a ``core.models.ModelBundle``."""
    return {
        "name": bundle.name,
        "source": bundle.source,
        "fingerprint": bundle.fingerprint,
        "family": bundle.adapter.family,
        "dtype": str(next(bundle.model.parameters()).dtype),
    }


def data_manifest(dataset: Any) -> dict:
    """The data part of every manifest of a ``core.data.Dataset``: path, format, content hash, record
    count, skipped records."""
    return {
        "path": dataset.path,
        "format": dataset.format,
        "sha256": dataset.sha256,
        "records": len(dataset) + len(dataset.skipped),
        "skipped": dataset.skipped,
    }


def environment_manifest() -> dict:
    """Library versions and the torch thread count."""
    import torch
    import transformers

    return {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
    }


def read_results(path: Path, repair: bool = False) -> list[dict]:
    """Records of a JSON-lines file in file order; a torn last line (interrupted write) is dropped, and cut
    off the file if ``repair`` (only the run's writer may repair: for a reader, the tail may be a write in
    progress)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, good_end, start = [], 0, 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            break  # unterminated tail: an interrupted write
        line = data[start:end]
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        good_end, start = end + 1, end + 1
    if good_end < len(data):
        logger.warning("%s: dropping %d bytes of an interrupted write", path, len(data) - good_end)
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(good_end)
    return records


class RunDir(Generic[R]):
    """One run directory: its manifest, its per-case records (type ``R``) and its result files.

    ``records_name``: the JSON-lines file of per-case records; ``allow_nan``: whether a record may hold
    NaN or infinities (written as the non-standard ``NaN``/``Infinity`` JSON tokens Python reads back).
    """

    def __init__(self, path: str | Path, records_name: str = RESULTS, allow_nan: bool = True):
        self.path = Path(path)
        self.records_name = records_name
        self.allow_nan = allow_nan
        self.seed: int | None = None

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def records_path(self) -> Path:
        return self.path / self.records_name

    def seed_everything(self, seed: int) -> int:
        """Seed every generator (``seed_everything``) and record ``seed``: ``open`` then refuses a
        manifest that states another one. Call it before anything random (loading, editing)."""
        self.seed = seed_everything(seed)
        return seed

    def read_manifest(self) -> dict | None:
        """The manifest on disk, or None when there is none yet."""
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else None

    def check(
        self, manifest: Mapping[str, Any], identity: Sequence[str], error: type[Exception] = RunConflictError
    ) -> None:
        """Raise ``error`` when the manifest on disk differs from ``manifest`` in an identity field."""
        old = self.read_manifest()
        if old is None:
            return
        for key in identity:
            if old.get(key, ADDED_LATER.get(key)) != manifest.get(key):
                raise error(
                    f"{self.path} holds a run with different {key!r}: {old.get(key)!r} != "
                    f"{manifest.get(key)!r}; use another --out directory"
                )

    def open(
        self, manifest: Mapping[str, Any], identity: Sequence[str], error: type[Exception] = RunConflictError
    ) -> dict:
        """Create the directory (or continue in it): check ``manifest`` against the one on disk in the
        ``identity`` fields, then write it with the directory's first ``created`` stamp; the record file
        exists afterwards. Returns the manifest as written."""
        if self.seed is not None and manifest.get("seed") != self.seed:
            raise ValueError(f"the manifest states seed {manifest.get('seed')!r}, the run seeded {self.seed}")
        self.path.mkdir(parents=True, exist_ok=True)
        self.check(manifest, identity, error)
        old = self.read_manifest()
        created = old.get("created") if old else None
        stamped = {**manifest, "created": created or time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.write_json(MANIFEST, stamped, indent=1)
        self.records_path.touch()
        return stamped

    def records(self, case_ids: Sequence[str] | None = None, repair: bool = False) -> list[R]:
        """The records of the cases ``case_ids`` that have one, in the order of ``case_ids`` (a run
        extended to another case range holds others, not necessarily in case order); all records in file
        order without ``case_ids``. ``repair``: cut a torn last line off the file (the writer, resuming)."""
        found: list[Any] = read_results(self.records_path, repair=repair)
        if case_ids is None:
            return found
        by_id = {r["case_id"]: r for r in found}
        return [by_id[i] for i in case_ids if i in by_id]

    def selected_records(self) -> list[R]:
        """The records of the current case range (the manifest's ``case_ids``; all records for runs
        written before the range was recorded), in case order."""
        manifest = self.read_manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}; not a run directory")
        return self.records(manifest.get("case_ids"))

    def append(self, record: R) -> None:
        """Append one record as a JSON line, flushed and fsynced (an interrupted run loses at most a torn
        last line, which the next ``records(..., repair=True)`` cuts off)."""
        line = json.dumps(record, ensure_ascii=False, allow_nan=self.allow_nan) + "\n"
        with open(self.records_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def write_json(self, name: str, data: Any, indent: int | None = None, allow_nan: bool = True) -> Path:
        """Write ``data`` to ``name`` in the directory atomically (a reader sees the old file or the new
        one, never a partial one); returns its path."""
        path = self.path / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=indent, allow_nan=allow_nan))
        tmp.replace(path)
        return path


def selected_records(run_dir: str | Path) -> list[dict]:
    """``RunDir(run_dir).selected_records()`` of an evaluation run directory."""
    return RunDir[dict](run_dir).selected_records()
