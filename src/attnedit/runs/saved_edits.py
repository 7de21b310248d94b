"""The edits a run keeps in its directory (``OUT/edits/``): where a group's edit is saved, and a saved
edit taken back only when it is intact and was computed for exactly the same requests."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from attnedit.core.data import EditCase
from attnedit.core.deltas import EditIntegrityError, WeightEdit
from attnedit.runs.rundir import short_hash

logger = logging.getLogger(__name__)

EDITS = "edits"


def group_edit_path(out: Path, group: list[EditCase]) -> Path:
    """Where the edit of one group of a single or batch run is saved: ``OUT/edits/HASH.safetensors``,
    HASH the ``short_hash`` of the group's requests in order (one file per group, whatever the range)."""
    return out / EDITS / f"{short_hash([asdict(case.request) for case in group])}.safetensors"


def sequential_edit_path(out: Path, k: int) -> Path:
    """Where the ``k``-th edit of a sequential run is saved: ``OUT/edits/NNNNN.safetensors`` (its
    position in the sequence, which is its meaning)."""
    return out / EDITS / f"{k:05d}.safetensors"


def saved_edit(path: Path, group: list[EditCase]) -> WeightEdit | None:
    """The saved edit at ``path`` when it is intact and was computed for exactly this group's requests,
    else None: the edit is then recomputed. (The method and hyper-parameters are the run's identity,
    checked when it opens.) A file of other requests (one copied or renamed there, or a sequential
    edit at this position of another range) or a damaged one is moved aside (``*.bad``, with a
    warning), never applied to this group."""
    if not path.is_file():
        return None
    try:
        saved = WeightEdit.load(path)
    except EditIntegrityError as err:
        problem = str(err)
    else:
        ids = [case.case_id for case in group]
        if saved.requests == [case.request for case in group]:
            return saved
        problem = f"{path} holds the edit of other requests than those of case(s) {ids}"
    aside = path.with_name(path.name + ".bad")
    path.replace(aside)
    logger.warning("%s; moved it to %s and recomputing the edit", problem, aside.name)
    return None
