"""Analysis runs (``attnedit analyze ...``): the run directory of one analysis over a data set.

Layout::

    manifest.json   model fingerprint, analysis and its options, method, hyper-parameters, data sha256, seed
    cases.jsonl     one JSON line per finished case (appended and fsynced one by one)
    NAME.json       every case's record plus the aggregates the figures show (NAME = the analysis)
    *.png           the figures

Resuming: the same command again skips the cases already in ``cases.jsonl`` (a torn last line is cut off);
a directory holding a run with other settings is refused, as ``attnedit eval`` does.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnedit.analysis.aggregate import POSITIONS
from attnedit.analysis.engine import json_ready

logger = logging.getLogger(__name__)

CASES = "cases.jsonl"
MANIFEST = "manifest.json"
# what must match to continue in an output directory; the case range (--first, --limit) need not: records
# are per case, so a run can be extended to more cases, and only the selected cases are aggregated
IDENTITY = ("analysis", "model", "method", "hyperparameters", "data", "seed", "options")


class AnalysisConflictError(RuntimeError):
    """The output directory holds an analysis run with different settings."""





@dataclass
class Setting:
    """What one ``attnedit analyze`` invocation runs; ``method=None`` analyses the unedited model only."""

    analysis: str
    data: str
    model: str
    out: Path
    first: int = 0
    limit: int | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)
    method: str | None = None
    preset: str | None = None
    params: dict = field(default_factory=dict)


@dataclass
class Session:
    setting: Setting
    cases: list
    bundle: Any
    editor: Any
    records: dict[str, dict]  # case_id -> record, those already in cases.jsonl


def _manifest(setting: Setting, bundle: Any, dataset: Any, editor: Any) -> dict:
    from attnedit import __version__
    from attnedit.runs.runner import data_manifest, environment_manifest, model_manifest

    return {
        "attnedit_version": __version__,
        "analysis": setting.analysis,
        "model": model_manifest(bundle),
        "method": editor.name if editor is not None else "none",
        "hyperparameters": editor.hyperparameters() if editor is not None else {},
        "data": data_manifest(dataset),
        "first": setting.first,
        "limit": setting.limit,
        "seed": setting.seed,
        "options": setting.options,
        **environment_manifest(),
    }


def start(setting: Setting) -> Session:
    """Load data, model and editor; write (or check) the manifest; read the finished cases."""
    import numpy as np
    import torch

    from attnedit.core.data import load_cases
    from attnedit.core.models import load_model
    from attnedit.editing.registry import make_editor
    from attnedit.runs.runner import check_resumable, records_of_cases, write_manifest

    if setting.first < 0:
        raise ValueError("--first must be at least 0")
    if setting.limit is not None and setting.limit < 1:
        raise ValueError("--limit must be at least 1")
    random.seed(setting.seed)
    np.random.seed(setting.seed)
    torch.manual_seed(setting.seed)
    dataset = load_cases(setting.data)
    cases = dataset.cases[setting.first :]
    cases = cases[: setting.limit] if setting.limit else cases
    if not cases:
        raise ValueError(f"{dataset.path}: no cases from index {setting.first} ({len(dataset)} cases)")
    bundle = load_model(setting.model)
    editor = None
    if setting.method is not None:
        if setting.method == "none":
            raise ValueError(f"analyze {setting.analysis} needs an edit: give --method (e.g. rome)")
        editor = make_editor(setting.method, bundle.name, setting.preset, setting.params)
    manifest = json.loads(json.dumps(_manifest(setting, bundle, dataset, editor)))
    out = setting.out
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(out, manifest, IDENTITY, AnalysisConflictError)
    write_manifest(out, manifest)  # with the current case range
    ids = [c.case_id for c in cases]
    records = {r["case_id"]: r for r in records_of_cases(out / CASES, ids, repair=True)}
    if records:
        logger.info("resuming %s: %d of %d cases already done", out, len(records), len(cases))
    return Session(setting, cases, bundle, editor, records)


def run_cases(session: Session, compute: Callable[[Any], dict]) -> list[dict]:
    """``compute`` each case not done yet, appending its record; all records in case order."""
    from tqdm.auto import tqdm

    from attnedit.runs.runner import append_record

    done = session.records
    bar = tqdm(
        total=len(session.cases), initial=len(done), desc=f"analyze {session.setting.analysis}", unit="case"
    )
    with open(session.setting.out / CASES, "a", encoding="utf-8") as fh, bar:
        for case in session.cases:
            if case.case_id in done:
                continue
            try:
                record = compute(case)
            except (ValueError, KeyError, IndexError) as err:
                raise ValueError(f"case {case.case_id} ({case.source}): {err}") from err
            record = json_ready({"case_id": case.case_id, "source": case.source, **record})
            append_record(fh, record, allow_nan=False)
            done[case.case_id] = record
            bar.update(1)
    return [done[c.case_id] for c in session.cases]


def finish(session: Session, records: list[dict], aggregate: dict, figures: Sequence[Path]) -> Path:
    """Write NAME.json (atomically); returns its path."""
    out, name = session.setting.out, session.setting.analysis
    result = {
        "analysis": name,
        "manifest": MANIFEST,
        "n_cases": len(records),
        "positions": list(POSITIONS),
        "aggregate": aggregate,
        "figures": [Path(f).name for f in figures],
        "cases": records,
    }
    path = out / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_ready(result), allow_nan=False))
    tmp.replace(path)
    return path



def subject_span(bundle: Any, prompt: str, subject: str, n_tokens: int) -> list[int]:
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


