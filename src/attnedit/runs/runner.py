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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from attnedit import __version__
from attnedit.core.data import Dataset, EditCase, load_cases, load_texts
from attnedit.core.deltas import AppliedEdit, EditIntegrityError, WeightEdit
from attnedit.core.models import ModelBundle, load_model
from attnedit.editing.registry import Editor, make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import summarize
from attnedit.evaluation.records import CaseRecord, Reference, Summary
from attnedit.runs.rundir import (
    RunDir,
    data_manifest,
    environment_manifest,
    model_manifest,
    provenance,
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
    # fluency generation: cases decoded in one batch (a speed setting: not part of a run's identity)
    generation_cases: int = 16
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
    config: RunConfig, bundle: ModelBundle | None = None, editor: Editor | None = None, progress: bool = True
) -> Summary:
    """Run (or resume) an evaluation; returns the summary."""
    run_dir = RunDir[CaseRecord](config.out)
    run_dir.seed_everything(config.seed)
    dataset = load_cases(
        config.data, config.data_format, config.skip_invalid, config.language, config.question_template
    )
    cases = dataset.cases[config.first :]
    cases = cases[: config.limit] if config.limit else cases
    cases = config.shard.select(cases)
    bundle = bundle or load_model(config.model)
    editor = editor or make_editor(config.method, bundle, config.preset, config.params, sadr=config.sadr)
    if config.ppl_corpus:
        config.eval.ppl_texts = load_texts(config.ppl_corpus, config.ppl_limit)
    manifest = {**build_manifest(config, bundle, dataset, editor), "case_ids": [c.case_id for c in cases]}
    run_dir.open(manifest, run_identity(config.mode))  # takes the directory's lock
    try:
        return _run_locked(run_dir, manifest, cases, bundle, editor, config, progress)
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
    with bar:
        state = _Loop(run_dir, done, bundle, editor, evaluator, records, bar, config, manifest)
        (_run_sequential if config.mode == "sequential" else _run_groups)(state, groups)
    order = {case_id: i for i, case_id in enumerate(manifest["case_ids"])}
    records.sort(key=lambda r: order[r["case_id"]])  # case order, as reports read them
    return write_summary(run_dir, records)


@dataclass
class _Loop:
    """What the case loops of ``run`` share: the run directory (which writes the records), what is done,
    the model, editor and evaluator, the records so far and the progress bar."""

    run_dir: RunDir[CaseRecord]
    done: set[str]
    bundle: ModelBundle
    editor: Editor
    evaluator: Evaluator
    records: list[CaseRecord]
    bar: tqdm
    config: RunConfig
    manifest: dict

    @property
    def out(self) -> Path:
        """The run directory's path (where edits are saved)."""
        return self.run_dir.path

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

    def finish_in_place(self, cases: list[EditCase], records: list[CaseRecord]) -> None:
        """Add fluency generated by the model as it is now (edit applied), then write the records."""
        if self.evaluator.config.fluency:
            self.evaluator.add_fluency(cases, records)
        self.write(records)

    def write(self, finished: list[CaseRecord], counted: bool = False) -> None:
        """Append records; ``counted``: the progress bar already advanced for them when scored."""
        for record in finished:
            self.run_dir.append(record)
            self.records.append(record)
            if not counted:
                self.bar.update(1)


def _run_groups(state: _Loop, groups: list[list[EditCase]]) -> None:
    """Single and batch mode: per group edit -> score -> revert.

    Fluency: a batch edit generates for its cases while it is applied; single-case edits are collected
    (``config.generation_cases`` at a time) and generated together on the unedited model with each
    row's own deltas (``Evaluator.add_fluency``), since one decoding batch costs about what one case
    costs. Records are written once their generations are done; an interruption loses at most that
    many unwritten cases, which the resumed run recomputes.
    """
    evaluator, config, done = state.evaluator, state.config, state.done
    fluency = evaluator.config.fluency
    pending: list[tuple[EditCase, CaseRecord, dict]] = []

    def flush() -> None:
        if pending:
            cases, finished, deltas = (list(x) for x in zip(*pending, strict=True))
            evaluator.add_fluency(cases, finished, deltas)
            state.write(finished, counted=True)
            pending.clear()
            state.bar.set_postfix_str("")

    for k, group in enumerate(groups):
        todo = [c for c in group if c.case_id not in done]
        if not todo:
            continue
        references = {c.case_id: evaluator.reference(c) for c in todo if c.locality}
        edit, seconds_edit, checkpoint = _edit_group(state.out, k, group, state.bundle, state.editor, config)
        try:
            deltas = edit.edit.deltas
            defer = fluency and len(group) == 1
            for chunk in state.chunks(todo):
                scored = [
                    state.score(
                        case,
                        references.get(case.case_id),
                        seconds_edit=seconds_edit / len(group),
                        edit=_edit_info(edit.edit, group.index(case)),
                    )
                    for case in chunk
                ]
                if defer:  # the bar counts edited cases; the postfix says how many await their fluency
                    pending.extend((case, record, deltas) for case, record in zip(chunk, scored, strict=True))
                    state.bar.update(len(chunk))
                    state.bar.set_postfix_str(f"{len(pending)} awaiting fluency")
                else:  # a batch edit: generate with it in place
                    state.finish_in_place(chunk, scored)
        finally:
            edit.revert()
        if checkpoint is not None and not config.save_edits:
            checkpoint.unlink()
        if len(pending) >= config.generation_cases:
            flush()
    flush()


def _edit_group(
    out: Path, k: int, group: list[EditCase], bundle: ModelBundle, editor: Editor, config: RunConfig
) -> tuple[AppliedEdit, float, Path | None]:
    """Edit one group (single or batch mode). A batch edit is saved before its cases are evaluated
    (kept with --save-edits, removed after the group otherwise), so an interrupted run re-applies it
    instead of recomputing it; a single-case edit is saved only with --save-edits. An empty edit
    (method ``none``) is never saved. The file is named by the group's requests (``group_edit_path``),
    so a run extended to other cases keeps the edits of the earlier ones."""
    path = group_edit_path(out, group)
    loaded = _saved_edit(path, group)
    if loaded is not None:
        logger.info("group %d: re-applying the saved edit %s", k, path)
        return loaded.apply(bundle.model), float(loaded.info.get("seconds", float("nan"))), path
    t0 = time.perf_counter()
    applied = editor.apply(bundle, group)
    seconds = time.perf_counter() - t0
    if not applied.edit.deltas or not (config.save_edits or len(group) > 1):
        return applied, seconds, None
    applied.edit.info["seconds"] = seconds
    applied.edit.save(path)
    return applied, seconds, path


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


def _run_sequential(state: _Loop, groups: list[list[EditCase]]) -> None:
    """Apply every group's edit on top of the previous ones (saved, so a resumed run re-applies them),
    then evaluate every case on the final model (fluency ``config.generation_cases`` cases per
    decoding batch); all edits are reverted at the end."""
    evaluator, done, bundle, out = state.evaluator, state.done, state.bundle, state.out
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
                edit = state.editor.apply(bundle, group)
                applied.append(edit)
                if edit.edit.deltas:  # an empty edit (method none) is not saved
                    edit.edit.save(path)
            for case in group:
                seconds[case.case_id] = (time.perf_counter() - t0) / len(group)
        for chunk in state.chunks(todo):
            finished = [
                state.score(
                    case,
                    references.get(case.case_id),
                    seconds_edit=seconds[case.case_id],
                    edits_applied=len(applied),
                )
                for case in chunk
            ]
            state.finish_in_place(chunk, finished)
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
