"""The unit of single and batch mode, wherever it is computed (this process or a Ray actor): per group
edit -> score its cases -> revert (``run_unit``), the units a run's groups make (``plan_units``), what
computes them (``UnitWorker``) and what the case loops of a run share (``RunState``); ``edit_each``, the
same per case in memory without a run directory (benchmarks)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Never, cast

import torch
from tqdm.auto import tqdm

from attnedit.core.data import EditCase
from attnedit.core.deltas import AppliedEdit, WeightEdit
from attnedit.core.models import ModelBundle
from attnedit.editing.spec import Editor
from attnedit.editing.target_cache import target_cache
from attnedit.evaluation.evaluator import Evaluator
from attnedit.evaluation.records import CaseRecord, EditInfo, Reference
from attnedit.runs.config import RunConfig
from attnedit.runs.rundir import RunDir, provenance
from attnedit.runs.saved_edits import group_edit_path, saved_edit

logger = logging.getLogger(__name__)


@dataclass
class UnitWorker:
    """What computes the records of a unit: the model, editor and evaluator, the run's settings and
    manifest (for provenance) and ``out``, the run directory where edits are saved and re-applied from
    (None on a remote worker, which has no run directory: its batch edits are recomputed on resume, and
    with --save-edits they are returned to the driver, which saves them)."""

    bundle: ModelBundle
    editor: Editor
    evaluator: Evaluator
    config: RunConfig
    manifest: dict[str, Any]
    out: Path | None

    def chunks(self, cases: list[EditCase]) -> list[list[EditCase]]:
        """The cases scored before their fluency is generated and they are written (one by one
        without fluency, ``generation_cases`` at a time with it)."""
        step = self.config.generation_cases if self.evaluator.config.fluency else 1
        return [cases[i : i + step] for i in range(0, len(cases), step)]

    def score(
        self,
        case: EditCase,
        reference: Reference | None,
        seconds_edit: float,
        *,
        edit: EditInfo | None = None,
        edits_applied: int | None = None,
    ) -> CaseRecord:
        """A case's record without fluency, timed (``seconds_eval``), plus its share of the edit time and
        the edit's report (single, batch) or the number of edits applied (sequential)."""
        return self.score_many([case], [reference], [seconds_edit], edit=edit, edits_applied=edits_applied)[0]

    def score_many(
        self,
        cases: list[EditCase],
        references: list[Reference | None],
        seconds_edit: list[float],
        *,
        edit: EditInfo | None = None,
        edits_applied: int | None = None,
    ) -> list[CaseRecord]:
        """``score`` of several cases on the same model, scored together (``Evaluator.score_many``;
        ``seconds_eval`` is the call's time divided among them)."""
        t0 = time.perf_counter()
        records = self.evaluator.score_many(cases, references)
        seconds = (time.perf_counter() - t0) / max(len(cases), 1)
        for case, record, own in zip(cases, records, seconds_edit, strict=True):
            record["seconds_eval"] = seconds
            record["seconds_edit"] = own
            if edit is not None:
                record["edit"] = edit
            if edits_applied is not None:
                record["edits_applied"] = edits_applied
            keys = provenance(self.manifest, case)  # what the record is computed with
            record["method"] = keys["method"]
            record["hparams_hash"] = keys["hparams_hash"]
            record["request_hash"] = keys["request_hash"]
        return records


@dataclass
class RunState:
    """What the case loops of ``runner.run`` share: the run directory (which writes the records), what
    is done, the worker (model, editor, evaluator), the records so far and the progress bar."""

    run_dir: RunDir[CaseRecord]
    done: set[str]
    worker: UnitWorker
    records: list[CaseRecord]
    bar: tqdm[Never]  # counts cases, iterates nothing

    @property
    def config(self) -> RunConfig:
        return self.worker.config

    def write(self, finished: list[CaseRecord], counted: bool = False) -> None:
        """Append records; ``counted``: the progress bar already advanced for them when scored."""
        for record in finished:
            self.run_dir.append(record)
            self.records.append(record)
            if not counted:
                self.bar.update(1)


@dataclass
class Unit:
    """A work unit of single and batch mode: groups (their index in the run and their cases) with the
    cases of each still to do. A batch group is a unit of its own; single-case groups whose fluency is
    decoded together (``generation_cases`` of them) form one unit, so that a unit's records are the same
    wherever it is computed."""

    groups: list[tuple[int, list[EditCase], list[EditCase]]]

    @property
    def case_ids(self) -> list[str]:
        """The ids of the cases the unit computes."""
        return [c.case_id for _, _, todo in self.groups for c in todo]


def plan_units(
    groups: list[list[EditCase]], done: set[str], generation_cases: int, fluency: bool
) -> list[Unit]:
    """The units of the groups not done yet, in order. A one-case group's fluency is generated later on
    the unedited model with the case's deltas, together with the next ones (up to ``generation_cases``);
    such groups share a unit. A larger group generates with its edit in place: a unit of its own."""
    units: list[Unit] = []
    pending: list[tuple[int, list[EditCase], list[EditCase]]] = []
    for k, group in enumerate(groups):
        todo = [c for c in group if c.case_id not in done]
        if not todo:
            continue
        if fluency and len(group) == 1:
            pending.append((k, group, todo))
            if len(pending) >= generation_cases:
                units.append(Unit(pending))
                pending = []
        else:
            units.append(Unit([(k, group, todo)]))
    if pending:
        units.append(Unit(pending))
    return units


# a unit's records are handed over as they are finished: (records, counted) where counted says that
# ``scored`` already reported them; ``scored(n, waiting)``: n cases scored, ``waiting`` awaiting fluency
Emit = Callable[[list[CaseRecord], bool], None]
Scored = Callable[[int, int], None]


def run_unit(
    worker: UnitWorker, unit: Unit, emit: Emit, scored: Scored | None = None
) -> list[tuple[list[EditCase], WeightEdit]]:
    """THE unit of single and batch mode, wherever it runs: per group edit -> score -> revert.

    Fluency: a batch edit generates for its cases while it is applied; the unit's single-case edits are
    generated together afterwards on the unedited model with each row's own deltas
    (``Evaluator.add_fluency``), since one decoding batch costs about what one case costs. Records are
    emitted once their generations are done. Returns the edits to keep that could not be saved here
    (``worker.out`` None with --save-edits): the caller saves them.
    """
    evaluator, config = worker.evaluator, worker.config
    fluency = evaluator.config.fluency
    pending: list[tuple[EditCase, CaseRecord, dict[str, torch.Tensor]]] = []
    kept: list[tuple[list[EditCase], WeightEdit]] = []
    for k, group, todo in unit.groups:
        references = {c.case_id: evaluator.reference(c) for c in todo if c.locality}
        edit, seconds_edit, checkpoint = _edit_group(
            worker.out, k, group, worker.bundle, worker.editor, config
        )
        try:
            deltas = edit.edit.deltas
            defer = fluency and len(group) == 1
            for chunk in worker.chunks(todo):
                records = [
                    worker.score(
                        case,
                        references.get(case.case_id),
                        seconds_edit=seconds_edit / len(group),
                        edit=_edit_info(edit.edit, group.index(case)),
                    )
                    for case in chunk
                ]
                if defer:
                    pending.extend(
                        (case, record, deltas) for case, record in zip(chunk, records, strict=True)
                    )
                    if scored is not None:
                        scored(len(chunk), len(pending))
                else:  # a batch edit: generate with it in place
                    if fluency:
                        evaluator.add_fluency(chunk, records)
                    emit(records, False)
        finally:
            edit.revert()
        if checkpoint is not None and not config.save_edits:
            checkpoint.unlink()
        if worker.out is None and config.save_edits and edit.edit.deltas:
            kept.append((group, edit.edit))
    if pending:
        cases, finished, deltas_of = (list(x) for x in zip(*pending, strict=True))
        evaluator.add_fluency(cases, finished, deltas_of)
        emit(finished, scored is not None)
    return kept


def _edit_group(
    out: Path | None, k: int, group: list[EditCase], bundle: ModelBundle, editor: Editor, config: RunConfig
) -> tuple[AppliedEdit, float, Path | None]:
    """Edit one group (single or batch mode). A batch edit is saved before its cases are evaluated
    (kept with --save-edits, removed after the group otherwise), so an interrupted run re-applies it
    instead of recomputing it; a single-case edit is saved only with --save-edits. An empty edit
    (method ``none``) is never saved. The file is named by the group's requests (``group_edit_path``),
    so a run extended to other cases keeps the edits of the earlier ones. ``out`` None (a remote
    worker): nothing is read or saved here (with --save-edits the edit's time is noted for the driver)."""
    if out is None:
        t0 = time.perf_counter()
        with target_cache(config.targets_cache):
            applied = editor.apply(bundle, group)
        seconds = time.perf_counter() - t0
        if config.save_edits:
            applied.edit.info["seconds"] = seconds
        return applied, seconds, None
    path = group_edit_path(out, group)
    loaded = saved_edit(path, group)
    if loaded is not None:
        logger.info("group %d: re-applying the saved edit %s", k, path)
        return loaded.apply(bundle.model), float(loaded.info.get("seconds", float("nan"))), path
    # a batch's targets are kept group by group until its edit is saved (in the shared cache when there is
    # one): an interrupted run resumes them
    own = path.with_name(path.stem + ".targets") if len(group) > 1 and not config.targets_cache else None
    t0 = time.perf_counter()
    with target_cache(config.targets_cache or own):
        applied = editor.apply(bundle, group)
    seconds = time.perf_counter() - t0
    saved = bool(applied.edit.deltas) and (config.save_edits or len(group) > 1)
    if saved:
        applied.edit.info["seconds"] = seconds
        applied.edit.save(path)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)
    return applied, seconds, path if saved else None


def _edit_info(edit: WeightEdit, index: int) -> EditInfo:
    """Optimisation steps and final loss of one request of an edit (when the method reports them)."""
    info = edit.info
    picked = {}
    for key in ("steps", "final_loss", "loss_parts"):
        value = info.get(key)
        picked[key] = value[index] if isinstance(value, list) and index < len(value) else value
    # the method's report (``editing.base.target_info``: per request, or one for all)
    return cast(EditInfo, {k: v for k, v in picked.items() if v is not None})


def edit_each(
    bundle: ModelBundle, editor: Editor, evaluator: Evaluator, cases: list[EditCase]
) -> tuple[list[CaseRecord], list[float]]:
    """Edit -> evaluate -> revert per case in memory (no run directory): records and edit seconds."""
    records, seconds = [], []
    for case in cases:
        t0 = time.perf_counter()
        edit = editor.apply(bundle, [case])
        seconds.append(time.perf_counter() - t0)
        try:
            records.append(evaluator.evaluate(case))
        finally:
            edit.revert()
    return records, seconds
