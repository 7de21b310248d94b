"""The resumable evaluation runner: per case, edit -> evaluate -> revert, one JSON line per case.

Layout of a run directory (a ``rundir.RunDir``, which implements it)::

    manifest.json   model, method, hyper-parameters, data file hash, versions, seed, shard, and the
                    case range (and ids) of the latest invocation
    results.jsonl   one line per finished case (appended, flushed and fsynced one by one)
    summary.json    pooled metrics of the selected cases

Resuming (the same command again, even after ``kill -9``): a torn last line is cut off, cases
already in ``results.jsonl`` are skipped, so every case appears exactly once. The run holds the
directory's lock: a second process on the same ``--out`` is refused (``RunLockedError``). A single-mode
run may also be given another case range (``--first``/``--limit``): cases already done are reused, and
the summary and reports cover the new range only (``selected_records``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from attnedit import __version__
from attnedit.core.data import Dataset, EditCase, load_cases, load_texts
from attnedit.core.deltas import AppliedEdit, EditIntegrityError, WeightEdit
from attnedit.core.models import ModelBundle, load_model
from attnedit.editing.registry import Editor, make_editor
from attnedit.editing.target_cache import target_cache
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import summarize
from attnedit.evaluation.records import CaseRecord, Reference, Summary
from attnedit.runs.executors import FailedUnit, RayOptions, UnitsFailedError
from attnedit.runs.rundir import (
    MANIFEST,
    RunDir,
    data_manifest,
    environment_manifest,
    model_manifest,
    provenance,
    seed_everything,
    short_hash,
)

logger = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")
EDITS = "edits"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"--shard {text!r}: need 0 <= i < n")
        return cls(i, n)

    def select(self, cases: list[EditCase]) -> list[EditCase]:
        """Contiguous block ``index`` of ``count`` near-equal blocks."""
        bounds = np.linspace(0, len(cases), self.count + 1).round().astype(int)
        return cases[bounds[self.index] : bounds[self.index + 1]]


@dataclass
class RunConfig:
    data: str
    out: str
    model: str = "smollm2-135m"
    # where and in which precision the model's weights live (the dtype is part of the manifest's model,
    # so of the run's identity; the device is recorded only); targets and solvers stay float32/float64
    device: str = "cpu"
    dtype: str = "float32"
    method: str = "none"
    limit: int | None = None
    first: int = 0  # skip the cases before this index (then --limit counts from here)
    shard: Shard = field(default_factory=Shard)
    data_format: str | None = None
    skip_invalid: bool = False
    # multilingual data: the edit language of every method (None: the data's default, "en"), and the
    # wrapper of its question prompts (None: the loader's default); both recorded in the manifest's data
    language: str | None = None
    question_template: str | None = None
    seed: int = 0
    ppl_corpus: str | None = None
    ppl_limit: int | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    label: str | None = None  # row name in reports (default: the method)
    mode: str = "single"  # single: edit one case, evaluate, revert; batch: N cases per edit;
    # sequential: edits (of batch_size cases each) accumulate, evaluation after the last one
    batch_size: int = 1
    preset: str | None = None
    params: dict = field(default_factory=dict)  # overrides of preset fields
    sadr: dict = field(default_factory=dict)  # SADR settings over the preset's sadr block (X+sadr methods)
    # keep every edit as DIR/edits/HASH.safetensors (HASH: of the group's requests); sequential mode always
    # keeps its edits, as DIR/edits/NNNNN.safetensors (NNNNN: the position in the sequence)
    save_edits: bool = False
    # fluency generation: cases decoded in one batch (a speed setting: not part of a run's identity; the
    # greedy FL does not depend on it, KnowEdit's sampled KE_FLU does: docs/reliability.md)
    generation_cases: int = 16
    # a directory of target-optimisation groups shared by runs (``editing.optimise.target_cache``): a run
    # whose groups are there (the same model, settings and rows, e.g. IntAttn-Edit after MEMIT on the same
    # batch) takes their targets instead of optimising them. A speed setting: not part of a run's identity
    targets_cache: str | None = None
    repair: bool = False  # move unreadable record lines to the quarantine file before the run (--repair)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1 (or None for every case), not {self.limit}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.first < 0:
            raise ValueError("--first must be at least 0")
        if self.generation_cases < 1:
            raise ValueError("--generation-cases must be at least 1")
        if self.mode == "single" and self.batch_size != 1:
            raise ValueError("--batch-size needs --mode batch or sequential")
        if self.mode == "sequential" and self.targets_cache:
            raise ValueError(
                "--targets-cache needs --mode single or batch: a sequential edit's targets are optimised on "
                "the model with the earlier edits applied, so they are not shared"
            )


def build_manifest(config: RunConfig, bundle: ModelBundle, dataset: Dataset, editor: Editor) -> dict:
    return {
        "attnedit_version": __version__,
        "model": model_manifest(bundle),
        "method": editor.name,
        "label": config.label or editor.name,
        "hyperparameters": editor.hyperparameters(),
        "data": data_manifest(dataset),
        "limit": config.limit,
        "first": config.first,
        "mode": config.mode,
        "batch_size": config.batch_size,
        "shard": asdict(config.shard),
        "seed": config.seed,
        "eval": config.eval.manifest(),
        "ppl_corpus": config.ppl_corpus,
        "generation_cases": config.generation_cases,
        "targets_cache": config.targets_cache,
        "device": str(bundle.device),
        **environment_manifest(),
    }


# fields that must match for a run directory to be resumed
_IDENTITY = (
    "model",
    "method",
    "label",
    "hyperparameters",
    "data",
    "limit",
    "first",
    "mode",
    "batch_size",
    "shard",
    "seed",
    "eval",
    "ppl_corpus",
)


_RANGE = ("limit", "first")


def run_identity(mode: str) -> tuple[str, ...]:
    """The manifest fields a run directory must match to be continued. A single-mode record depends on
    its case alone, so such a run may be extended (or narrowed) to another case range: its records are
    kept per case and only the selected ones aggregated. A batch or sequential edit depends on which
    cases share it, so there the range is part of the identity."""
    return tuple(k for k in _IDENTITY if mode != "single" or k not in _RANGE)


def write_summary(run_dir: RunDir[CaseRecord], records: list[CaseRecord]) -> Summary:
    """Pool ``records`` (``metrics.summarize``) into the run's ``summary.json``; returns the summary."""
    summary = summarize(records)
    run_dir.write_json(SUMMARY, summary, indent=1)
    return summary


def run(
    config: RunConfig,
    bundle: ModelBundle | None = None,
    editor: Editor | None = None,
    progress: bool = True,
    ray: RayOptions | None = None,
) -> Summary:
    """Run (or resume) an evaluation; returns the summary. ``ray``: compute the units on Ray actors
    (``executors.fan_out``; each loads ``config.model`` itself), this process writing the records.
    Raises ``UnitsFailedError`` (after writing the other records, the summary and the manifest's
    ``failed_units``) when some units failed on every try."""
    check_backend(config, ray)
    run_dir = RunDir[CaseRecord](config.out)
    run_dir.seed_everything(config.seed)
    dataset = load_cases(
        config.data, config.data_format, config.skip_invalid, config.language, config.question_template
    )
    cases = dataset.cases[config.first :]
    cases = cases[: config.limit] if config.limit else cases
    cases = config.shard.select(cases)
    bundle = bundle or load_model(config.model, dtype=config.dtype, device=config.device)
    editor = editor or make_editor(config.method, bundle, config.preset, config.params, sadr=config.sadr)
    if config.ppl_corpus:
        config.eval.ppl_texts = load_texts(config.ppl_corpus, config.ppl_limit)
    manifest = {**build_manifest(config, bundle, dataset, editor), "case_ids": [c.case_id for c in cases]}
    run_dir.open(manifest, run_identity(config.mode))  # takes the directory's lock
    try:
        return _run_locked(run_dir, manifest, cases, bundle, editor, config, progress, ray)
    finally:
        run_dir.close()


def _run_locked(
    run_dir: RunDir[CaseRecord],
    manifest: dict,
    cases: list[EditCase],
    bundle: ModelBundle,
    editor: Editor,
    config: RunConfig,
    progress: bool,
    ray: RayOptions | None = None,
) -> Summary:
    """The body of ``run`` while it holds the run directory's lock."""
    if config.repair:
        moved = run_dir.quarantine()
        logger.warning("--repair: %d unreadable line(s) of %s moved aside", moved, run_dir.records_path)
    records = run_dir.records(manifest["case_ids"], repair=True)
    run_dir.check_provenance(manifest, cases)
    done = {r["case_id"] for r in records}
    if done:
        logger.info("resuming %s: %d of %d cases already done", run_dir.path, len(done), len(cases))
    evaluator = Evaluator(bundle, config.eval)
    # batches are cut from the full case list, so a resumed run edits exactly the same groups
    groups = [cases[i : i + config.batch_size] for i in range(0, len(cases), config.batch_size)]
    bar = tqdm(
        total=len(cases),
        initial=len(done),
        desc=f"{config.mode} {manifest['label']}",
        unit="case",
        disable=not progress,
    )
    failed: list[FailedUnit] = []
    with bar:
        worker = UnitWorker(bundle, editor, evaluator, config, manifest, run_dir.path)
        state = _Loop(run_dir, done, worker, records, bar)
        if config.mode == "sequential":
            _run_sequential(state, groups)
        elif ray is not None:
            failed = _run_groups_on_ray(state, groups, ray)
        else:
            _run_groups(state, groups)
    order = {case_id: i for i, case_id in enumerate(manifest["case_ids"])}
    records.sort(key=lambda r: order[r["case_id"]])  # case order, as reports read them
    summary = write_summary(run_dir, records)
    if failed:
        report_failed(run_dir, manifest, failed)
    return summary


def check_backend(config: RunConfig, ray: RayOptions | None) -> None:
    """Sequential mode's cases depend on each other (each edit builds on the previous ones): local only."""
    if ray is not None and config.mode == "sequential":
        raise ValueError(
            "--backend ray: sequential mode runs locally only (its edits build on each other); "
            "drop --backend ray, or use --mode single or batch"
        )


def report_failed(run_dir: RunDir, manifest: dict, failed: list[FailedUnit]) -> None:
    """Record the failed units in the manifest (``failed_units``: case ids, error, tries) and raise
    ``UnitsFailedError``; a rerun of the same command computes them again (and rewrites the manifest)."""
    listed = [asdict(f) for f in failed]
    stamped = {**(run_dir.read_manifest() or manifest), "failed_units": listed}
    run_dir.write_json(MANIFEST, stamped, indent=1)
    ids = [i for f in failed for i in f.case_ids]
    raise UnitsFailedError(
        f"{len(ids)} case(s) failed on every try ({', '.join(ids)}; see failed_units in "
        f"{run_dir.manifest_path}); the other cases are written: run the same command again to retry them"
    )


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
    manifest: dict
    out: Path | None

    def chunks(self, cases: list[EditCase]) -> list[list[EditCase]]:
        """The cases scored before their fluency is generated and they are written (one by one
        without fluency, ``generation_cases`` at a time with it)."""
        step = self.config.generation_cases if self.evaluator.config.fluency else 1
        return [cases[i : i + step] for i in range(0, len(cases), step)]

    def score(self, case: EditCase, reference: Reference | None, **extra: object) -> CaseRecord:
        """A case's record without fluency, timed (``seconds_eval``), plus ``extra`` fields."""
        t0 = time.perf_counter()
        record = self.evaluator.score(case, reference)
        record["seconds_eval"] = time.perf_counter() - t0
        record.update(extra)  # seconds_edit with edit (single, batch) or edits_applied (sequential)
        record.update(provenance(self.manifest, case))
        return record


@dataclass
class _Loop:
    """What the case loops of ``run`` share: the run directory (which writes the records), what is done,
    the worker (model, editor, evaluator), the records so far and the progress bar."""

    run_dir: RunDir[CaseRecord]
    done: set[str]
    worker: UnitWorker
    records: list[CaseRecord]
    bar: tqdm

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
    pending: list[tuple[EditCase, CaseRecord, dict]] = []
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


def _run_groups(state: _Loop, groups: list[list[EditCase]]) -> None:
    """Single and batch mode in this process: ``run_unit`` for each unit, records written as emitted.
    An interruption loses at most the cases of the unit in progress, which the resumed run recomputes."""
    config, fluency = state.config, state.worker.evaluator.config.fluency

    def scored(n: int, waiting: int) -> None:  # the bar counts edited cases; the postfix, those waiting
        state.bar.update(n)
        state.bar.set_postfix_str(f"{waiting} awaiting fluency")

    def emit(records: list[CaseRecord], counted: bool) -> None:
        state.write(records, counted=counted)
        if counted:
            state.bar.set_postfix_str("")

    for unit in plan_units(groups, state.done, config.generation_cases, fluency):
        run_unit(state.worker, unit, emit, scored)


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
    loaded = _saved_edit(path, group)
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


def group_edit_path(out: Path, group: list[EditCase]) -> Path:
    """Where the edit of one group of a single or batch run is saved: ``OUT/edits/HASH.safetensors``,
    HASH the ``short_hash`` of the group's requests in order (one file per group, whatever the range)."""
    return out / EDITS / f"{short_hash([asdict(case.request) for case in group])}.safetensors"


def _saved_edit(path: Path, group: list[EditCase]) -> WeightEdit | None:
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


def _edit_info(edit: WeightEdit, index: int) -> dict:
    """Optimisation steps and final loss of one request of an edit (when the method reports them)."""
    info = edit.info
    picked = {}
    for key in ("steps", "final_loss", "loss_parts"):
        value = info.get(key)
        picked[key] = value[index] if isinstance(value, list) and index < len(value) else value
    return {k: v for k, v in picked.items() if v is not None}


@dataclass
class EvalWorkerFactory:
    """Builds a Ray actor's worker: loads the run's model (checked against the manifest's fingerprint),
    editor and evaluator once, seeded as the local run is."""

    config: RunConfig
    manifest: dict

    def __call__(self, device: str) -> _RemoteUnits:
        config = self.config
        seed_everything(config.seed)
        bundle = load_model(config.model, dtype=config.dtype, device=device)
        expected = self.manifest["model"]["fingerprint"]
        if bundle.fingerprint != expected:
            raise ValueError(
                f"worker: model {config.model!r} has fingerprint {bundle.fingerprint[:16]}, the driver's "
                f"{expected[:16]}: every node must load the same model"
            )
        editor = make_editor(config.method, bundle, config.preset, config.params, sadr=config.sadr)
        evaluator = Evaluator(bundle, config.eval)
        return _RemoteUnits(UnitWorker(bundle, editor, evaluator, config, self.manifest, None))


@dataclass
class _RemoteUnits:
    """A Ray actor's units: ``run_unit`` without a run directory; returns the records and kept edits."""

    worker: UnitWorker

    @property
    def bundle(self) -> ModelBundle:
        return self.worker.bundle

    def prepare(self, unit: Unit) -> None:
        """The editor's one-time work for the unit's first group (``Editor.prepare``)."""
        _, group, _ = unit.groups[0]
        self.worker.editor.prepare(self.worker.bundle, group)

    def __call__(self, unit: Unit) -> tuple[list[CaseRecord], list[tuple[list[EditCase], WeightEdit]]]:
        records: list[CaseRecord] = []
        kept = run_unit(self.worker, unit, lambda finished, _counted: records.extend(finished))
        return records, kept


def _run_groups_on_ray(state: _Loop, groups: list[list[EditCase]], options: RayOptions) -> list[FailedUnit]:
    """Single and batch mode on Ray actors: the same units as ``_run_groups``, this process writing each
    unit's records (and, with --save-edits, its edits) once the unit has returned."""
    from attnedit.runs.executors import fan_out

    config, worker = state.config, state.worker
    units = plan_units(groups, state.done, config.generation_cases, worker.evaluator.config.fluency)

    def on_result(unit: Unit, result: tuple[list[CaseRecord], list]) -> None:
        records, kept = result
        for group, edit in kept:
            edit.save(group_edit_path(state.run_dir.path, group))
        state.write(records)

    factory = EvalWorkerFactory(config, worker.manifest)
    report = fan_out(units, factory, on_result, lambda unit: unit.case_ids, options)
    return report.failed


def _run_sequential(state: _Loop, groups: list[list[EditCase]]) -> None:
    """Apply every group's edit on top of the previous ones (saved, so a resumed run re-applies them),
    then evaluate every case on the final model (fluency ``config.generation_cases`` cases per
    decoding batch); all edits are reverted at the end."""
    worker, done = state.worker, state.done
    evaluator, bundle, out = worker.evaluator, worker.bundle, state.run_dir.path
    cases = [c for g in groups for c in g]
    todo = [c for c in cases if c.case_id not in done]
    if not todo:
        return
    references = {c.case_id: evaluator.reference(c) for c in todo if c.locality}
    applied: list[AppliedEdit] = []
    seconds: dict[str, float] = {}
    try:
        for k, group in enumerate(tqdm(groups, desc="sequential edits", unit="edit", leave=False)):
            path = out / EDITS / f"{k:05d}.safetensors"
            t0 = time.perf_counter()
            saved = _saved_edit(path, group)
            if saved is not None:
                applied.append(saved.apply(bundle.model))
            else:
                edit = worker.editor.apply(bundle, group)
                applied.append(edit)
                if edit.edit.deltas:  # an empty edit (method none) is not saved
                    edit.edit.save(path)
            for case in group:
                seconds[case.case_id] = (time.perf_counter() - t0) / len(group)
        for chunk in worker.chunks(todo):
            finished = [
                worker.score(
                    case,
                    references.get(case.case_id),
                    seconds_edit=seconds[case.case_id],
                    edits_applied=len(applied),
                )
                for case in chunk
            ]
            if evaluator.config.fluency:  # generated by the model with every edit applied
                evaluator.add_fluency(chunk, finished)
            state.write(finished)
    finally:
        for edit in reversed(applied):
            edit.revert()


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
