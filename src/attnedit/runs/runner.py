"""The resumable evaluation runner: per case, edit -> evaluate -> revert, one JSON line per case.

Layout of a run directory::

    manifest.json   model, method, hyper-parameters, data file hash, versions, seed, shard, and the
                    case range (and ids) of the latest invocation
    results.jsonl   one line per finished case (appended, flushed and fsynced one by one)
    summary.json    pooled metrics of the selected cases

Resuming (the same command again, even after ``kill -9``): a torn last line is cut off, cases
already in ``results.jsonl`` are skipped, so every case appears exactly once. A single-mode run may
also be given another case range (``--first``/``--limit``): cases already done are reused, and the
summary and reports cover the new range only (``selected_records``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from attnedit import __version__
from attnedit.core.data import Dataset, EditCase, load_cases, load_texts
from attnedit.core.deltas import AppliedEdit, WeightEdit
from attnedit.core.models import ModelBundle, load_model
from attnedit.editing.registry import Editor, make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import summarize

logger = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")
RESULTS = "results.jsonl"
EDITS = "edits"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"


class RunConflictError(RuntimeError):
    """The output directory holds a run with different settings."""


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
    save_edits: bool = False  # keep every edit as DIR/edits/NNNNN.safetensors (always in sequential mode)
    # fluency generation: cases decoded in one batch (a speed setting: not part of a run's identity)
    generation_cases: int = 16

    def __post_init__(self) -> None:
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


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_manifest(bundle: ModelBundle) -> dict:
    """The model part of every manifest (runs and analyses)."""
    return {
        "name": bundle.name,
        "source": bundle.source,
        "fingerprint": bundle.fingerprint,
        "family": bundle.adapter.family,
        "dtype": str(next(bundle.model.parameters()).dtype),
    }


def data_manifest(dataset: Dataset) -> dict:
    """The data part of every manifest: path, format, content hash, record count, skipped records."""
    return {
        "path": dataset.path,
        "format": dataset.format,
        "sha256": dataset.sha256,
        "records": len(dataset) + len(dataset.skipped),
        "skipped": dataset.skipped,
    }


def environment_manifest() -> dict:
    """Library versions and the torch thread count."""
    return {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
    }


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


_ADDED_LATER = {"first": 0}  # identity fields newer than some run directories: their implied value
_RANGE = ("limit", "first")


def run_identity(mode: str) -> tuple[str, ...]:
    """The manifest fields a run directory must match to be continued. A single-mode record depends on
    its case alone, so such a run may be extended (or narrowed) to another case range: its records are
    kept per case and only the selected ones aggregated. A batch or sequential edit depends on which
    cases share it, so there the range is part of the identity."""
    return tuple(k for k in _IDENTITY if mode != "single" or k not in _RANGE)


def write_manifest(out: Path, manifest: dict) -> None:
    """Write ``manifest`` (this invocation's settings and case range) atomically, keeping the directory's
    first ``created`` stamp."""
    path = out / MANIFEST
    created = json.loads(path.read_text()).get("created") if path.is_file() else None
    tmp = path.with_name(path.name + ".tmp")
    stamped = {**manifest, "created": created or time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp.write_text(json.dumps(stamped, indent=1))
    tmp.replace(path)


def records_of_cases(path: Path, case_ids: Sequence, repair: bool = False) -> list[dict]:
    """The records in ``path`` of the cases ``case_ids`` that have one, in the order of ``case_ids``
    (a file extended to another case range holds others, and not necessarily in case order)."""
    by_id = {r["case_id"]: r for r in read_results(path, repair=repair)}
    return [by_id[i] for i in case_ids if i in by_id]


def selected_records(run_dir: str | Path) -> list[dict]:
    """The records of a run directory's current case range (the manifest's ``case_ids``; all records for
    runs written before the range was recorded), in case order."""
    run_dir = Path(run_dir)
    ids = json.loads((run_dir / MANIFEST).read_text()).get("case_ids")
    if ids is None:
        return read_results(run_dir / RESULTS)
    return records_of_cases(run_dir / RESULTS, ids)


def check_resumable(
    out: Path,
    manifest: dict,
    identity: Sequence[str] = _IDENTITY,
    error: type[Exception] = RunConflictError,
) -> None:
    """Refuse to continue in ``out`` when its manifest differs from ``manifest`` in an identity field."""
    path = out / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for key in identity:
        if old.get(key, _ADDED_LATER.get(key)) != manifest.get(key):
            raise error(
                f"{out} holds a run with different {key!r}: {old.get(key)!r} != {manifest.get(key)!r}; "
                "use another --out directory"
            )


def read_results(path: Path, repair: bool = False) -> list[dict]:
    """Records of a results file; a torn last line (interrupted write) is dropped (and cut if ``repair``)."""
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


def append_record(fh, record: dict, allow_nan: bool = True) -> None:
    """One JSON line, flushed and fsynced (an interrupted run loses at most a torn last line)."""
    fh.write(json.dumps(record, ensure_ascii=False, allow_nan=allow_nan) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def write_summary(out: Path, records: list[dict]) -> dict:
    summary = summarize(records)
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / SUMMARY)
    return summary


def run(
    config: RunConfig, bundle: ModelBundle | None = None, editor: Editor | None = None, progress: bool = True
) -> dict:
    """Run (or resume) an evaluation; returns the summary."""
    _set_seed(config.seed)
    out = Path(config.out)
    dataset = load_cases(config.data, config.data_format, config.skip_invalid)
    cases = dataset.cases[config.first :]
    cases = cases[: config.limit] if config.limit else cases
    cases = config.shard.select(cases)
    bundle = bundle or load_model(config.model)
    editor = editor or make_editor(config.method, bundle, config.preset, config.params, sadr=config.sadr)
    if config.ppl_corpus:
        config.eval.ppl_texts = load_texts(config.ppl_corpus, config.ppl_limit)
    manifest = {**build_manifest(config, bundle, dataset, editor), "case_ids": [c.case_id for c in cases]}
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(out, manifest, run_identity(config.mode))
    write_manifest(out, manifest)

    results_path = out / RESULTS
    records = records_of_cases(results_path, manifest["case_ids"], repair=True)
    done = {r["case_id"] for r in records}
    if done:
        logger.info("resuming %s: %d of %d cases already done", out, len(done), len(cases))
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
    with open(results_path, "a", encoding="utf-8") as fh, bar:
        state = _Loop(out, done, bundle, editor, evaluator, fh, records, bar, config)
        (_run_sequential if config.mode == "sequential" else _run_groups)(state, groups)
    order = {case_id: i for i, case_id in enumerate(manifest["case_ids"])}
    records.sort(key=lambda r: order[r["case_id"]])  # case order, as reports read them
    return write_summary(out, records)


@dataclass
class _Loop:
    """What the case loops of ``run`` share: the run directory, what is done, the model, editor and
    evaluator, the open results file, the records so far and the progress bar."""

    out: Path
    done: set
    bundle: ModelBundle
    editor: Editor
    evaluator: Evaluator
    fh: IO[str]
    records: list[dict]
    bar: tqdm
    config: RunConfig

    def chunks(self, cases: list[EditCase]) -> list[list[EditCase]]:
        """The cases scored before their fluency is generated and they are written (one by one
        without fluency, ``generation_cases`` at a time with it)."""
        step = self.config.generation_cases if self.evaluator.config.fluency else 1
        return [cases[i : i + step] for i in range(0, len(cases), step)]

    def score(self, case: EditCase, reference: dict | None, **extra: object) -> dict:
        """A case's record without fluency, timed (``seconds_eval``), plus ``extra`` fields."""
        t0 = time.perf_counter()
        record = self.evaluator.score(case, reference)
        record["seconds_eval"] = time.perf_counter() - t0
        record.update(extra)
        return record

    def finish_in_place(self, cases: list[EditCase], records: list[dict]) -> None:
        """Add fluency generated by the model as it is now (edit applied), then write the records."""
        if self.evaluator.config.fluency:
            self.evaluator.add_fluency(cases, records)
        self.write(records)

    def write(self, finished: list[dict], counted: bool = False) -> None:
        """Append records; ``counted``: the progress bar already advanced for them when scored."""
        for record in finished:
            append_record(self.fh, record)
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
    pending: list[tuple[EditCase, dict, dict]] = []

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
    (method ``none``) is never saved."""
    path = out / EDITS / f"{k:05d}.safetensors"
    if path.is_file():
        loaded = WeightEdit.load(path)
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
            if path.is_file():
                applied.append(WeightEdit.load(path).apply(bundle.model))
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
) -> tuple[list[dict], list[float]]:
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
