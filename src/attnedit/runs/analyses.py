"""Analysis runs (``attnedit analyze ...``): the run directory of one analysis over a data set.

Layout::

    manifest.json   model fingerprint, analysis and its options, method, hyper-parameters, data sha256, seed
    cases.jsonl     one JSON line per finished case (appended and fsynced one by one)
    NAME.json       every case's record plus the aggregates the figures show (NAME = the analysis)
    *.png           the figures

Resuming: the same command again skips the cases already in ``cases.jsonl`` (a torn last line is cut off);
a directory holding a run with other settings is refused, as ``attnedit eval`` does (both are a
``rundir.RunDir``).

This module is the machinery every analysis shares (``start``, ``run_cases``, ``finish``); the analyses
themselves (per-case records, aggregation, figures) are ``analysis_runs.run_NAME``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from attnedit.analysis.aggregate import POSITIONS, AnalysisRecord
from attnedit.analysis.engine import json_ready
from attnedit.core.version import __version__
from attnedit.runs.executors import RayOptions
from attnedit.runs.rundir import (
    MANIFEST,
    RunConflictError,
    RunDir,
    data_manifest,
    environment_manifest,
    model_manifest,
    provenance,
)

if TYPE_CHECKING:
    from attnedit.core.data import Dataset, EditCase
    from attnedit.core.deltas import AppliedEdit
    from attnedit.core.models import ModelBundle
    from attnedit.editing.spec import Editor

logger = logging.getLogger(__name__)

CASES = "cases.jsonl"
# what must match to continue in an output directory; the case range (--first, --limit) need not: records
# are per case, so a run can be extended to more cases, and only the selected cases are aggregated
IDENTITY = ("analysis", "model", "method", "hyperparameters", "data", "seed", "options")


class AnalysisConflictError(RunConflictError):
    """The output directory holds an analysis run with different settings."""


@dataclass(frozen=True)
class Setting:
    """What an analysis run reads and where it writes, whatever the analysis: data, model, output
    directory, case range, seed and, for the analyses of an edit, the method. ``method=None``: the
    unedited model only (causal tracing)."""

    data: str
    model: str
    out: Path
    first: int = 0
    limit: int | None = None
    seed: int = 0
    method: str | None = None
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # preset overrides of the method, values as text
    sadr: dict[str, Any] = field(default_factory=dict)  # SADR settings of X+sadr methods
    repair: bool = False  # first move unreadable record lines to the quarantine file (--repair)
    language: str | None = None  # multilingual data: the edit language (core.data.load_cases)
    question_template: str | None = None  # multilingual data: the question prompts' wrapper
    # where the cases are computed: None here, else on Ray actors (``executors.fan_out``), one case a unit
    ray: RayOptions | None = None


@dataclass
class Session:
    """A started analysis run: the analysis, its setting and options (as in the manifest), the cases,
    model and editor, the finished records and the run directory that writes them."""

    analysis: str
    setting: Setting
    options: dict[str, Any]
    cases: list[EditCase]
    bundle: ModelBundle
    editor: Editor | None  # None: the analyses of the unedited model
    records: dict[str, AnalysisRecord]  # case_id -> record, those already in cases.jsonl
    run_dir: RunDir[AnalysisRecord]
    manifest: dict[str, Any]


def _manifest(
    analysis: str,
    setting: Setting,
    options: dict[str, Any],
    bundle: ModelBundle,
    dataset: Dataset,
    editor: Editor | None,
) -> dict[str, Any]:
    return {
        "attnedit_version": __version__,
        "analysis": analysis,
        "model": model_manifest(bundle),
        "method": editor.name if editor is not None else "none",
        "hyperparameters": editor.hyperparameters() if editor is not None else {},
        "data": data_manifest(dataset),
        "first": setting.first,
        "limit": setting.limit,
        "seed": setting.seed,
        "options": options,
        **environment_manifest(),
    }


def start(analysis: str, setting: Setting, options: dict[str, Any], *, edit: bool) -> Session:
    """Load data, model and (``edit``: the analysis needs one) editor; write (or check) the manifest,
    which records ``analysis`` and its ``options``; read the finished cases."""
    from attnedit.core.data import load_cases
    from attnedit.core.models import load_model
    from attnedit.editing.registry import make_editor

    if setting.first < 0:
        raise ValueError("--first must be at least 0")
    if setting.limit is not None and setting.limit < 1:
        raise ValueError("--limit must be at least 1")
    # records hold no NaN: the NAME.json they are copied into is strict JSON
    run_dir = RunDir[AnalysisRecord](setting.out, CASES, allow_nan=False)
    run_dir.seed_everything(setting.seed)
    dataset = load_cases(setting.data, language=setting.language, question_template=setting.question_template)
    cases = dataset.cases[setting.first :]
    cases = cases[: setting.limit] if setting.limit else cases
    if not cases:
        raise ValueError(f"{dataset.path}: no cases from index {setting.first} ({len(dataset)} cases)")
    bundle = load_model(setting.model)
    editor: Editor | None = None
    if edit:
        if setting.method is None or setting.method == "none":
            raise ValueError(f"analyze {analysis} needs an edit: give --method (e.g. rome)")
        editor = make_editor(setting.method, bundle, setting.preset, setting.params, sadr=setting.sadr)
    elif setting.method is not None:
        raise ValueError(f"analyze {analysis} analyses the unedited model: it takes no method")
    manifest = json.loads(json.dumps(_manifest(analysis, setting, options, bundle, dataset, editor)))
    run_dir.open(manifest, IDENTITY, AnalysisConflictError)  # with the current case range
    try:
        if setting.repair:
            moved = run_dir.quarantine()
            logger.warning("--repair: %d unreadable line(s) of %s moved aside", moved, run_dir.records_path)
        ids = [c.case_id for c in cases]
        records = {r["case_id"]: r for r in run_dir.records(ids, repair=True)}
        run_dir.check_provenance(manifest, cases)
    except BaseException:
        run_dir.close()  # a run that cannot start leaves the directory unlocked
        raise
    if records:
        logger.info("resuming %s: %d of %d cases already done", run_dir.path, len(records), len(cases))
    return Session(analysis, setting, options, cases, bundle, editor, records, run_dir, manifest)


# one case's record: f(bundle, editor, case) (editor None for the analyses of the unedited model); a
# module-level function (or a ``functools.partial`` of one), so that it reaches Ray actors by reference
CaseRecordFn: TypeAlias = "Callable[[ModelBundle, Editor | None, EditCase], AnalysisRecord]"


def edit_case(editor: Editor | None, bundle: ModelBundle, case: EditCase) -> AppliedEdit:
    """``case``'s edit, for the analyses of an edit (``start(..., edit=True)`` made their editor)."""
    assert editor is not None, "an analysis of an edit runs with an editor"
    return editor.apply(bundle, [case])


def compute_case(
    record: CaseRecordFn, bundle: ModelBundle, editor: Editor | None, case: EditCase
) -> AnalysisRecord:
    """``record`` of one case; a bad input names the case (here and on a Ray actor alike)."""
    try:
        return record(bundle, editor, case)
    except (ValueError, KeyError, IndexError) as err:
        raise ValueError(f"case {case.case_id} ({case.source}): {err}") from err


def run_cases(session: Session, record: CaseRecordFn) -> list[AnalysisRecord]:
    """``record`` each case not done yet (here, or on Ray actors with ``setting.ray``), appending its
    record; all records in case order."""
    from tqdm.auto import tqdm

    done = session.records
    bar = tqdm(total=len(session.cases), initial=len(done), desc=f"analyze {session.analysis}", unit="case")

    def write(case: EditCase, computed: AnalysisRecord) -> None:
        keys = {"case_id": case.case_id, "source": case.source, **provenance(session.manifest, case)}
        finished = json_ready({**keys, **computed})
        session.run_dir.append(finished)
        done[case.case_id] = finished
        bar.update(1)

    todo = [case for case in session.cases if case.case_id not in done]
    try:
        with bar:
            if session.setting.ray is not None:
                _run_cases_on_ray(session, record, todo, write)
            else:
                for case in todo:
                    write(case, compute_case(record, session.bundle, session.editor, case))
    except BaseException:
        session.run_dir.close()  # the records so far stay; the directory is free for the rerun
        raise
    return [done[c.case_id] for c in session.cases]


@dataclass
class AnalysisWorkerFactory:
    """Builds a Ray actor's worker for an analysis: the setting's model (checked against the manifest's
    fingerprint) and editor, loaded once, seeded as the local run is."""

    setting: Setting
    fingerprint: str
    record: CaseRecordFn

    def __call__(self, device: str) -> _RemoteCases:
        from attnedit.core.models import load_model
        from attnedit.editing.registry import make_editor
        from attnedit.runs.rundir import seed_everything

        setting = self.setting
        seed_everything(setting.seed)
        bundle = load_model(setting.model, device=device)
        if bundle.fingerprint != self.fingerprint:
            raise ValueError(f"worker: model {setting.model!r} is not the driver's (fingerprint differs)")
        editor: Editor | None = None
        if setting.method is not None and setting.method != "none":
            editor = make_editor(setting.method, bundle, setting.preset, setting.params, sadr=setting.sadr)
        return _RemoteCases(bundle, editor, self.record)


@dataclass
class _RemoteCases:
    """A Ray actor's units: one case each, its record computed by the analysis's per-case function."""

    bundle: ModelBundle
    editor: Editor | None
    record: CaseRecordFn

    def prepare(self, case: EditCase) -> None:
        """The editor's one-time work for the case (``Editor.prepare``); nothing without an editor."""
        if self.editor is not None:
            self.editor.prepare(self.bundle, [case])

    def __call__(self, case: EditCase) -> AnalysisRecord:
        return compute_case(self.record, self.bundle, self.editor, case)


def _run_cases_on_ray(
    session: Session,
    record: CaseRecordFn,
    todo: list[EditCase],
    write: Callable[[EditCase, AnalysisRecord], None],
) -> None:
    """The cases on Ray actors, one a unit; this process writes each record once it has returned."""
    from attnedit.runs.executors import UnitsFailedError, fan_out

    options = session.setting.ray
    assert options is not None
    factory = AnalysisWorkerFactory(session.setting, session.manifest["model"]["fingerprint"], record)
    report = fan_out(todo, factory, write, lambda case: [case.case_id], options)
    if report.failed:
        listed = [asdict(f) for f in report.failed]
        stamped = {**(session.run_dir.read_manifest() or session.manifest), "failed_units": listed}
        session.run_dir.write_json(MANIFEST, stamped, indent=1)
        ids = [i for f in report.failed for i in f.case_ids]
        raise UnitsFailedError(
            f"{len(ids)} case(s) failed on every try ({', '.join(ids)}; see failed_units in "
            f"{session.run_dir.manifest_path}); the other cases are written: run the same command again"
        )


def finish(
    session: Session, records: list[AnalysisRecord], aggregate: dict[str, Any], figures: Sequence[Path]
) -> Path:
    """Write NAME.json (atomically); returns its path."""
    name = session.analysis
    result = {
        "analysis": name,
        "manifest": MANIFEST,
        "n_cases": len(records),
        "positions": list(POSITIONS),
        "aggregate": aggregate,
        "figures": [Path(f).name for f in figures],
        "cases": records,
    }
    path = session.run_dir.write_json(f"{name}.json", json_ready(result), allow_nan=False)
    session.run_dir.close()  # the lock taken by ``start`` (an error before this: released at exit)
    return path


def subject_span(bundle: ModelBundle, prompt: str, subject: str, n_tokens: int) -> list[int]:
    """[first, last] token of the subject's first occurrence in ``prompt``; [-1, -1] when absent."""
    from attnedit.core.tokens import SubjectNotFoundError, locate_subject

    if subject not in prompt:
        return [-1, -1]
    try:
        span = locate_subject(bundle.tokenizer, prompt, subject)
    except SubjectNotFoundError:
        return [-1, -1]
    if len(span.input_ids) != n_tokens:
        return [-1, -1]
    return [span.first_token, span.last_token]
