"""A run directory: the one implementation behind evaluation runs (``attnedit eval``) and analysis runs
(``attnedit analyze``).

Layout (the record file's name is the caller's: ``results.jsonl`` for evaluations, ``cases.jsonl`` for
analyses)::

    manifest.json   the settings of the latest invocation, with the directory's first ``created`` stamp
    RECORDS.jsonl   one JSON line per finished case, appended, flushed and fsynced one by one
    NAME.json       summaries and results, written atomically (a temporary file renamed over it)

    .lock           held (``fcntl.flock``) by the one process writing the directory; holds its pid

Resuming: a manifest that differs from the existing one in an identity field is refused; a torn last
line (an interrupted write: no trailing newline) is cut off; cases already recorded are not computed
again. Any other unreadable line stops the run with an error naming the file and the line: a valid record
is never deleted. Every record is written by ``RunDir.append``, so whoever holds the ``RunDir`` (a case
loop, or a driver receiving finished records from workers) is the one writer of the record file, and
``open`` takes the directory's lock so that no second process writes it at the same time (the OS releases
the lock when the process ends, however it ends).

Safety: the manifest and the record file are never followed through a symbolic link, and a record file
that is not ours (no manifest beside it, or lines that are not records) is refused, never truncated.

Reading a run (``records``, ``selected_records``, ``read_manifest``) needs neither torch nor a model.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from attnedit.evaluation.records import CaseRecord

if TYPE_CHECKING:
    from attnedit.core.data import Dataset, EditCase
    from attnedit.core.models import ModelBundle

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RESULTS = "results.jsonl"
CURVES = "curves.jsonl"  # a stream's checkpoints (``runs.sequential``), one line each
LOCK = ".lock"

# identity fields newer than some run directories, with the value an older manifest implies
ADDED_LATER: dict[str, Any] = {"first": 0, "stream": None}
# keys of an identity field's mapping that are newer than some run directories, likewise
ADDED_LATER_PARTS: dict[str, dict[str, Any]] = {
    "eval": {"knowedit_sampling": "batch", "generation_score": False}
}
# parts of an identity field that do not identify a run: the data are known by their sha256 and the
# model by its fingerprint (of its weights; a local model's name is its path), so the same file or
# weights reached by another path (moved, copied, relative or absolute, another $ATTNEDIT_CACHE)
# continue the run
NOT_IDENTITY: dict[str, tuple[str, ...]] = {"data": ("path",), "model": ("name", "source")}


def _identity_value(key: str, value: Any) -> Any:
    """``value`` of the identity field ``key`` without its parts that do not identify a run."""
    if isinstance(value, Mapping) and key in NOT_IDENTITY:
        return {k: v for k, v in value.items() if k not in NOT_IDENTITY[key]}
    return value


R = TypeVar("R", bound=Mapping[str, Any])


class RunConflictError(RuntimeError):
    """The output directory holds a run with different settings."""


class RunLockedError(RunConflictError):
    """Another process is writing the run directory (it holds the directory's lock)."""


class UnsafeRunFileError(RunConflictError):
    """A run file is a symbolic link, or the record file is not one of ours: refused, never written."""


class CorruptRecordsError(ValueError):
    """A line of a record file (other than a torn last line) is not a readable record."""


class MixedRecordsError(RunConflictError):
    """A record was computed with other settings (method, hyper-parameters, request) than the run's."""


def short_hash(value: Any) -> str:
    """16 hex digits of the sha256 of ``value`` as canonical JSON (sorted keys, no spaces): the same
    settings give the same hash whatever their key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def provenance(manifest: Mapping[str, Any], case: EditCase | None = None) -> dict[str, str]:
    """What a record is computed with: the method and a hash of the hyper-parameters (from the run's
    manifest) and, given the case (a ``core.data.EditCase``), a hash of its edit request. Added to every
    record an evaluation or an analysis writes and checked on resume (``RunDir.check_provenance``)."""
    keys = {"method": manifest["method"], "hparams_hash": short_hash(manifest["hyperparameters"])}
    if case is not None:
        keys["request_hash"] = short_hash(asdict(case.request))
    return keys


def _link_refused(path: Path) -> UnsafeRunFileError:
    return UnsafeRunFileError(f"{path} is a symbolic link: refused (run files are never followed)")


def _open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link (``O_NOFOLLOW``) with an ``UnsafeRunFileError``."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _link_refused(path) from None
        raise


def seed_everything(seed: int) -> int:
    """Seed Python's, NumPy's and torch's generators; returns ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def model_manifest(bundle: ModelBundle) -> dict[str, Any]:
    """The model part of every manifest (runs and analyses) of a ``core.models.ModelBundle``."""
    return {
        "name": bundle.name,
        "source": bundle.source,
        "fingerprint": bundle.fingerprint,
        "family": bundle.adapter.family,
        "dtype": str(next(bundle.model.parameters()).dtype),
    }


def data_manifest(dataset: Dataset) -> dict[str, Any]:
    """The data part of every manifest of a ``core.data.Dataset``: path, format, content hash, record
    count, skipped records; for multilingual data also the edit language, the question template and the
    cases whose translated prompt lacks the subject (per language). Part of a run's identity."""
    data: dict[str, Any] = {
        "path": dataset.path,
        "format": dataset.format,
        "sha256": dataset.sha256,
        "records": len(dataset) + len(dataset.skipped),
        "skipped": dataset.skipped,
    }
    if dataset.language:  # only then: manifests of monolingual data stay as they were
        data |= {
            "language": dataset.language,
            "question_template": dataset.question_template,
            "subject_missing": dataset.subject_missing,
        }
    return data


def environment_manifest() -> dict[str, Any]:
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


def _parse_record(line: bytes, key: str = "case_id", kind: type = str) -> dict[str, Any]:
    """One record line: a JSON object whose ``key`` is a ``kind`` (``ValueError`` otherwise)."""
    record: object = json.loads(line)  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(record, dict) or not isinstance(record.get(key), kind):
        raise ValueError(f"not a record (a JSON object with a {key})")
    return record


def read_results(
    path: Path, repair: bool = False, key: str = "case_id", kind: type = str
) -> list[dict[str, Any]]:
    """Records of a JSON-lines file in file order (each a JSON object whose ``key`` is a ``kind``: a case's
    ``case_id`` string by default).

    Only a torn last line (no trailing newline: an interrupted write) is dropped, and cut off the file if
    ``repair`` (only the run's writer may repair: for a reader, the tail may be a write in progress). Any
    other line that is not a record raises ``CorruptRecordsError`` naming the file and the line number,
    and nothing is cut: a valid record after a bad line is never lost. A symbolic link is refused.
    """
    if path.is_symlink():
        raise _link_refused(path)
    if not path.is_file():
        return []
    fd = _open_nofollow(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline (or is empty)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_parse_record(line, key, kind))
        except ValueError as err:
            raise CorruptRecordsError(
                f"{path}, line {number}: not a readable record ({err}); no record was removed: fix or "
                f"delete that line, or rerun with --repair (moves every unreadable line to "
                f"{path.name}{QUARANTINE_SUFFIX}, keeps every valid record)"
            ) from None
    if torn:
        logger.warning("%s: dropping %d bytes of an interrupted write (a torn last line)", path, len(torn))
        if repair:
            fd = _open_nofollow(path, os.O_RDWR)
            try:
                os.ftruncate(fd, len(data) - len(torn))
                os.fsync(fd)
            finally:
                os.close(fd)
    return records


QUARANTINE_SUFFIX = ".quarantine"


def append_line(path: Path, record: Mapping[str, Any], allow_nan: bool = True) -> None:
    """Append ``record`` to a JSON-lines file as one line, flushed and fsynced (an interruption leaves at
    most a torn last line, which ``read_results(..., repair=True)`` cuts off); a link is refused."""
    line = json.dumps(record, ensure_ascii=False, allow_nan=allow_nan) + "\n"
    fd = _open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "wb") as fh:
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


class RunDir(Generic[R]):
    """One run directory: its manifest, its per-case records (type ``R``) and its result files.

    ``records_name``: the JSON-lines file of per-case records (a plain file name: it lies in the
    directory); ``allow_nan``: whether a record may hold NaN or infinities (written as the non-standard
    ``NaN``/``Infinity`` JSON tokens Python reads back).

    ``open`` takes the directory's lock, held until ``close`` (or the end of the process); the ``RunDir``
    is a context manager that closes it.
    """

    def __init__(self, path: str | Path, records_name: str = RESULTS, allow_nan: bool = True):
        if Path(records_name).name != records_name or records_name in ("", ".", ".."):
            raise ValueError(
                f"the record file must be a plain name inside the run directory: {records_name!r}"
            )
        self.path = Path(path)
        self.records_name = records_name
        self.allow_nan = allow_nan
        self.seed: int | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> RunDir[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @property
    def locked(self) -> bool:
        """Whether this ``RunDir`` holds the directory's lock."""
        return self._lock_fd is not None

    def lock(self) -> None:
        """Take the directory's exclusive lock (``fcntl.flock`` on ``.lock``, which then holds our pid);
        ``RunLockedError`` naming the holder's pid when another process has it. The OS releases it when
        the process ends, however it ends (``kill -9`` included)."""
        if self._lock_fd is not None:
            return
        fd = _open_nofollow(self.path / LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.path} is being written by another process (pid {holder}); wait for it to finish "
                f"or use another --out directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the directory's lock (if held); the directory stays as it is."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest on disk, or None when there is none yet (a symbolic link is refused)."""
        path = self.manifest_path
        if not path.is_symlink() and not path.is_file():
            return None
        fd = _open_nofollow(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
        try:
            manifest: dict[str, Any] = json.loads(data)
        except ValueError as err:
            raise CorruptRecordsError(f"{path}: not a readable manifest ({err})") from None
        return manifest

    def check(
        self, manifest: Mapping[str, Any], identity: Sequence[str], error: type[Exception] = RunConflictError
    ) -> None:
        """Raise ``error`` when the manifest on disk differs from ``manifest`` in an identity field."""
        old = self.read_manifest()
        if old is None:
            return
        for key in identity:
            before = _identity_value(key, old.get(key, ADDED_LATER.get(key)))
            if isinstance(before, Mapping) and key in ADDED_LATER_PARTS:
                before = {**ADDED_LATER_PARTS[key], **before}
            if before != _identity_value(key, manifest.get(key)):
                raise error(
                    f"{self.path} holds a run with different {key!r}: {old.get(key)!r} != "
                    f"{manifest.get(key)!r}; use another --out directory"
                )

    def open(
        self, manifest: Mapping[str, Any], identity: Sequence[str], error: type[Exception] = RunConflictError
    ) -> dict[str, Any]:
        """Create the directory (or continue in it): take its lock (``lock``), check ``manifest`` against
        the one on disk in the ``identity`` fields, then write it with the directory's first ``created``
        stamp; the record file exists afterwards. Returns the manifest as written. A refusal releases the
        lock it took: a failed start leaves the directory unlocked."""
        if self.seed is not None and manifest.get("seed") != self.seed:
            raise ValueError(f"the manifest states seed {manifest.get('seed')!r}, the run seeded {self.seed}")
        if self.path.exists() and not self.path.is_dir():
            raise UnsafeRunFileError(f"{self.path} is not a directory; give --out a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        held = self.locked
        self.lock()
        try:
            old = self.read_manifest()
            self._check_records_are_ours(old)
            self.check(manifest, identity, error)
            created = old.get("created") if old else None
            stamped = {**manifest, "created": created or time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.write_json(MANIFEST, stamped, indent=1)
            os.close(_open_nofollow(self.records_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND))
        except BaseException:
            if not held:
                self.close()
            raise
        return stamped

    def _check_records_are_ours(self, manifest: Mapping[str, Any] | None) -> None:
        """Refuse a record file that is a symbolic link, or that has content but no manifest beside it
        (not written by a run: never truncated, never appended to)."""
        path = self.records_path
        if path.is_symlink():
            raise _link_refused(path)
        if manifest is None and path.exists() and (not path.is_file() or path.stat().st_size > 0):
            raise UnsafeRunFileError(
                f"{path} exists but {self.path} has no {MANIFEST}: not a run of ours, left untouched; "
                f"use another --out directory"
            )

    def records(self, case_ids: Sequence[str] | None = None, repair: bool = False) -> list[R]:
        """The records of the cases ``case_ids`` that have one, in the order of ``case_ids`` (a run
        extended to another case range holds others, not necessarily in case order); all records in file
        order without ``case_ids``. ``repair``: cut a torn last line off the file (the writer, resuming)."""
        found = cast("list[R]", read_results(self.records_path, repair=repair))  # the records append wrote
        if case_ids is None:
            return found
        by_id = {r["case_id"]: r for r in found}
        return [by_id[i] for i in case_ids if i in by_id]

    def check_provenance(self, manifest: Mapping[str, Any], cases: Sequence[EditCase]) -> None:
        """Refuse (``MixedRecordsError`` naming the file, line, case and the difference) a record whose
        provenance keys (``provenance``) differ from this run's: method and hyper-parameter hash for every
        record, the request hash of ``cases`` for the record of that case. A key a record lacks is not
        compared: records written before provenance was recorded were checked by the manifest's identity
        alone."""
        common = provenance(manifest)
        expected = {c.case_id: {"request_hash": provenance(manifest, c)["request_hash"]} for c in cases}
        if not self.records_path.is_file():
            return
        lines = self.records_path.read_bytes().split(b"\n")
        lines.pop()  # a torn last line is no record (the writer has cut it already)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _parse_record(line)
            want = {**common, **expected.get(record["case_id"], {})}
            for key, value in want.items():
                if key in record and record[key] != value:
                    raise MixedRecordsError(
                        f"{self.records_path}, line {number} (case {record['case_id']!r}): computed with "
                        f"{key} {record[key]!r}, this run uses {value!r}; such records must not be mixed: "
                        f"use another --out directory or remove that line"
                    )

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
        append_line(self.records_path, record, self.allow_nan)

    def write_json(self, name: str, data: Any, indent: int | None = None, allow_nan: bool = True) -> Path:
        """Write ``data`` to ``name`` in the directory atomically (a reader sees the old file or the new
        one, never a partial one); returns its path."""
        path = self.path / name
        if path.is_symlink():
            raise _link_refused(path)
        text = json.dumps(data, indent=indent, allow_nan=allow_nan)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)  # a leftover (or a planted link) is removed, never written through
        fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        tmp.replace(path)  # rename replaces the name itself, never a link's target
        return path

    def quarantine(self) -> int:
        """Move every unreadable line (other than a torn last line) of the record file to
        ``RECORDS.jsonl.quarantine`` (appended) and keep every readable record; returns how many lines
        were moved. The way forward from a ``CorruptRecordsError``; needs the directory's lock."""
        if not self.locked:
            self.lock()
        path = self.records_path
        if path.is_symlink():
            raise _link_refused(path)
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()
        good: list[bytes] = []
        bad: list[bytes] = []
        for line in lines:
            try:
                _parse_record(line)
                good.append(line)
            except ValueError:
                (bad if line.strip() else good).append(line)
        if not bad:
            return 0
        aside = path.with_name(path.name + QUARANTINE_SUFFIX)
        fd = _open_nofollow(aside, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in bad))
            fh.flush()
            os.fsync(fh.fileno())
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in good) + tail)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        logger.warning("%s: moved %d unreadable lines to %s%s", path, len(bad), path.name, QUARANTINE_SUFFIX)
        return len(bad)


def selected_records(run_dir: str | Path) -> list[CaseRecord]:
    """``RunDir(run_dir).selected_records()`` of an evaluation run directory."""
    return RunDir[CaseRecord](run_dir).selected_records()


def read_curves(run_dir: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """A stream's checkpoint lines (``CURVES``) in order of edits ([] without the file; a torn last line
    left out, and cut off the file if ``repair``: the stream's writer only, as ``read_results``)."""
    lines = read_results(Path(run_dir) / CURVES, repair, key="edits", kind=int)
    return sorted(lines, key=lambda line: int(line["edits"]))
