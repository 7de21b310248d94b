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

The run's settings, manifest and identity are ``config``; the unit of single and batch mode
``units.run_unit``; its saved edits ``saved_edits``; Ray actors ``ray_eval``; sequential mode
``sequential``. This module is the entry point, ``run``, and the local loop.
"""

from __future__ import annotations

import logging
from typing import Any

from tqdm.auto import tqdm

from attnedit.core.data import EditCase, load_cases, load_texts
from attnedit.core.models import ModelBundle, load_model
from attnedit.editing.registry import make_editor
from attnedit.editing.spec import Editor
from attnedit.evaluation.evaluator import Evaluator
from attnedit.evaluation.records import CaseRecord, Summary
from attnedit.runs.config import RunConfig, build_manifest, run_identity, write_summary
from attnedit.runs.executors import FailedUnit, RayOptions
from attnedit.runs.ray_eval import check_backend, report_failed, run_groups_on_ray
from attnedit.runs.rundir import RunDir
from attnedit.runs.sequential import run_sequential
from attnedit.runs.units import RunState, UnitWorker, plan_units, run_unit

logger = logging.getLogger(__name__)


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
    manifest: dict[str, Any],
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
        state = RunState(run_dir, done, worker, records, bar)
        if config.mode == "sequential":
            run_sequential(state, groups)
        elif ray is not None:
            failed = run_groups_on_ray(state, groups, ray)
        else:
            _run_groups(state, groups)
    order = {case_id: i for i, case_id in enumerate(manifest["case_ids"])}
    records.sort(key=lambda r: order[r["case_id"]])  # case order, as reports read them
    summary = write_summary(run_dir, records)
    if failed:
        report_failed(run_dir, manifest, failed)
    return summary


def _run_groups(state: RunState, groups: list[list[EditCase]]) -> None:
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
