"""Edited models out as standard Hugging Face checkpoints (``attnedit export``, ``attnedit edit --export``,
``attnedit.export``).

``export(model, edits, out)`` loads the base model as ``load_model`` does (in the dtype of the edits'
deltas, on the CPU), applies the saved edits (``WeightEdit.load``) in the order given, and writes ``out``:

* ``config.json`` and ``model.safetensors`` (``save_pretrained(safe_serialization=True)``),
  ``generation_config.json`` and the tokenizer: a directory ``AutoModelForCausalLM.from_pretrained``
  loads with plain transformers. Biases an edit created are written so that it loads them
  (``core.checkpoint.standard_model``: Llama with attention biases, GPT-J's fold into the MLP bias);
* ``README.md``, the model card: the base model and its fingerprint, the architecture change if any, and
  every edit in order (file and sha256, method, preset and hyper-parameters, requests, scores);
* ``attnedit_export.json``: the same facts for programs.

Checks, before anything is written: every edit file verifies (``WeightEdit.load``); an edit recorded on
another model (another fingerprint) is refused in one line naming the file, the edit's model and the
given one; each edit must fit the weights as the edits before it left it (its per-parameter base hashes:
a sequence of edits in the order it was made, or edits of different weights). The directory is written
under a temporary name next to ``out`` and renamed into place, so ``out`` is never a half-written
checkpoint; an existing non-empty ``out`` is refused unless ``overwrite``.

Scores: an edit file inside a run directory's ``edits/`` folder (``attnedit eval --save-edits``,
``runs.saved_edits``) was evaluated by that run: the card shows the pooled metrics of the run's records
of the edit's requests (matched by request hash, method and hyper-parameter hash, as the run writes
them), with how they were measured (single or batch mode: this edit alone on the base model; sequential
mode: after the run's edits up to then). ``attnedit edit --export`` passes the answers it printed
instead. An edit without either has no scores in the card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from attnedit.core.checkpoint import StandardModel, standard_model
from attnedit.core.deltas import EditMismatchError, WeightEdit
from attnedit.core.models import EMBEDDED_MODELS, ModelBundle, load_model
from attnedit.core.version import __version__
from attnedit.evaluation.answers import Answer, answers_table
from attnedit.evaluation.metrics import summarize
from attnedit.evaluation.records import CaseRecord
from attnedit.runs.rundir import MANIFEST, RESULTS, RunDir, short_hash
from attnedit.runs.saved_edits import EDITS

logger = logging.getLogger(__name__)

CARD = "README.md"
RECORD = "attnedit_export.json"
FORMAT = "attnedit-export/1"
# the pooled metrics a card shows of an evaluated edit (those the run's records have)
CARD_METRICS = ("ES", "PS", "NS", "RS", "DNS", "AvgS", "EM", "PM", "NM", "FL", "KE_EDIT", "KE_PORT", "KE_LOC")


class ExportError(ValueError):
    """An export refused: an edit of another model, edits that do not fit each other, an output
    directory in the way. The message is one line naming the file or directory."""


@dataclass(frozen=True)
class EditScores:
    """How an edit scored, for the model card: where the numbers come from (one sentence) and a markdown
    table of them."""

    source: str
    table: str


@dataclass(frozen=True)
class ExportedEdit:
    """One edit of an export: its file, its contents, the file's sha256, its scores when known."""

    path: Path
    edit: WeightEdit
    sha256: str
    scores: EditScores | None = None


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote: the checkpoint directory, the base model, the saved architecture, the edits in
    the order applied, and what differs from the edited model (``core.checkpoint.StandardModel``)."""

    path: Path
    model: str
    fingerprint: str
    architecture: str
    source_architecture: str
    dtype: str
    edits: list[ExportedEdit]
    notes: list[str]
    caveats: list[str]


# --- checks before any work ---------------------------------------------------------------------------------


def check_output(
    out: str | Path, overwrite: bool = False, remedy: str = "choose another directory or pass overwrite=True"
) -> Path:
    """``out`` can receive the checkpoint: absent, an empty directory, or (``overwrite``) a directory to
    replace; a file, a symbolic link or a non-empty directory otherwise is an ``ExportError`` (``remedy``:
    what to do about a non-empty one)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out} exists and is not a directory: choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: {remedy}")
    return out


def read_edits(paths: Sequence[str | Path]) -> list[ExportedEdit]:
    """The edit files, verified (``WeightEdit.load``), with their sha256 and the scores their run directory
    holds (``run_scores``); ``ExportError`` when none is given or their deltas mix dtypes."""
    if not paths:
        raise ExportError("give at least one edit file")
    edits = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ExportError(f"{path}: no such edit file")
        edit = WeightEdit.load(path)
        edits.append(ExportedEdit(path, edit, _file_sha256(path), run_scores(path, edit)))
    edits_dtype(edits)
    return edits


def edits_dtype(edits: Sequence[ExportedEdit]) -> torch.dtype:
    """The dtype the edits were computed in (that of their deltas, the weights' dtype; float32 for edits
    without deltas): the base model is loaded in it, so that the base hashes match."""
    found: dict[torch.dtype, Path] = {}
    for item in edits:
        for delta in item.edit.deltas.values():
            found.setdefault(delta.dtype, item.path)
    if len(found) > 1:
        listed = ", ".join(f"{path} ({str(dtype).removeprefix('torch.')})" for dtype, path in found.items())
        raise ExportError(f"the edits were computed on weights of different dtypes: {listed}")
    return next(iter(found), torch.float32)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- scores -------------------------------------------------------------------------------------------------


def answer_scores(probes: list[tuple[str, str]], before: list[Answer], after: list[Answer]) -> EditScores:
    """The answers ``attnedit edit`` printed as an edit's scores."""
    return EditScores(
        "the answers `attnedit edit` printed when it made the edit: the greedy continuation, P(new) and "
        "P(true) of each probe before and after it, on the model it edited",
        answers_table(probes, before, after),
    )


def run_scores(path: Path, edit: WeightEdit) -> EditScores | None:
    """The scores of an edit file kept in a run directory (``RUN/edits/*.safetensors``): the pooled metrics
    of the run's records of the edit's requests, when the run is of the same model, method and
    hyper-parameters; None for any other file (or a run without such records)."""
    run = path.parent.parent
    if path.parent.name != EDITS or not (run / MANIFEST).is_file():
        return None
    run_dir = RunDir[CaseRecord](run)
    manifest = run_dir.read_manifest() or {}
    model = manifest.get("model", {})
    if edit.model_fingerprint and model.get("fingerprint") not in (None, edit.model_fingerprint):
        logger.info("%s: its run %s is of another model; no scores", path, run)
        return None
    wanted = {short_hash(asdict(request)) for request in edit.requests}
    hparams = short_hash(edit.hyperparameters)
    records = [
        r
        for r in run_dir.records()
        if r.get("request_hash") in wanted
        and r.get("method", edit.method) == edit.method
        and r.get("hparams_hash", hparams) == hparams
    ]
    if not records:
        logger.info("%s: its run %s holds no records of its requests (in %s); no scores", path, run, RESULTS)
        return None
    mode = manifest.get("mode", "single")
    if mode == "sequential":
        applied = sorted({int(r["edits_applied"]) for r in records if "edits_applied" in r})
        how = f"on the model with the run's sequential edits applied ({', '.join(map(str, applied))} edits)"
    else:
        how = "with this edit alone applied to the base model"
    ids = ", ".join(r["case_id"] for r in records)
    source = (
        f"run `{run.name}` ({manifest.get('method', edit.method)}, {mode} mode, data "
        f"`{Path(str(manifest.get('data', {}).get('path', '?'))).name}`): the pooled metrics of its "
        f"{len(records)} record(s) of this edit's requests (case {ids}), measured {how}"
    )
    return EditScores(source, _summary_table(records))


def _summary_table(records: list[CaseRecord]) -> str:
    """Percent, 95% interval and count of the card's metrics the records have."""
    summary: dict[str, Any] = dict(summarize(records))
    lines = ["| metric | mean | 95% CI | n |", "|---|---|---|---|"]
    for name in CARD_METRICS:
        entry = summary.get(name)
        if not entry or not entry.get("n") or not math.isfinite(entry.get("mean", math.nan)):
            continue
        ci = entry.get("ci95")
        shown = f"± {ci:.1f}" if isinstance(ci, float) and math.isfinite(ci) else ""
        lines.append(f"| {name} | {entry['mean']:.1f} | {shown} | {entry['n']} |")
    return "\n".join(lines)


# --- the export ---------------------------------------------------------------------------------------------


def export(
    model: str,
    edits: Sequence[str | Path],
    out: str | Path,
    *,
    overwrite: bool = False,
    scores: Sequence[EditScores | None] | None = None,
) -> Exported:
    """Write ``model`` with ``edits`` applied in order as a standard Hugging Face checkpoint in ``out``
    (see the module docstring). ``scores``: per edit, scores to show in its place in the card (None:
    those its run directory holds, if any)."""
    out = check_output(out, overwrite)
    items = read_edits(edits)
    if scores is not None:
        if len(scores) != len(items):
            raise ValueError(f"scores: {len(scores)} entries for {len(items)} edits")
        items = [
            ExportedEdit(item.path, item.edit, item.sha256, given or item.scores)
            for item, given in zip(items, scores, strict=True)
        ]
    dtype = edits_dtype(items)
    bundle = load_model(model, dtype=dtype, device="cpu")
    check_base(bundle, items)
    created = apply_in_order(bundle, items)
    standard = standard_model(bundle.model, bundle.adapter, created)
    for note in standard.notes:
        logger.info("%s", note)
    for caveat in standard.caveats:
        logger.warning("%s", caveat)
    result = Exported(
        path=out,
        model=bundle.name,
        fingerprint=bundle.fingerprint,
        architecture=standard.architecture,
        source_architecture=standard.source_architecture,
        dtype=str(dtype).removeprefix("torch."),
        edits=items,
        notes=standard.notes,
        caveats=standard.caveats,
    )
    write_atomically(out, lambda tmp: _write_checkpoint(tmp, bundle, standard, result), overwrite)
    logger.debug("wrote %s: %s with %d edit(s) as %s", out, bundle.name, len(items), standard.architecture)
    return result


def check_base(bundle: ModelBundle, items: Sequence[ExportedEdit]) -> None:
    """Refuse an edit recorded on another model than ``bundle``'s (another fingerprint), in one line naming
    the edit file, its model and the given model. Edits without a recorded fingerprint (older files) are
    checked by their base hashes only, when applied."""
    for item in items:
        edit = item.edit
        if edit.model_fingerprint and edit.model_fingerprint != bundle.fingerprint:
            raise ExportError(
                f"{item.path} is an edit of {edit.model_label()}, not of the given model {bundle.name!r} "
                f"(fingerprint {bundle.fingerprint}): export it with --model set to the model it was made on"
            )
        if edit.model_name and edit.model_name != bundle.name:
            logger.info(
                "%s was made on %r, which has the same weights as %r", item.path, edit.model_name, bundle.name
            )


def apply_in_order(bundle: ModelBundle, items: Sequence[ExportedEdit]) -> list[str]:
    """Apply the edits in order, each checked against the weights the ones before it left (its base
    hashes); the names of the parameters they created. A misfit is an ``ExportError`` naming the file."""
    created: list[str] = []
    for k, item in enumerate(items):
        try:
            item.edit.apply(bundle.model, check=True).keep()
        except EditMismatchError as err:
            where = f"the given model {bundle.name!r}" + (f" after the {k} edit(s) before it" if k else "")
            raise ExportError(f"{item.path} does not fit {where}: {err.problem}") from None
        created.extend(item.edit.created)
    return created


def write_atomically(out: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a new directory next to ``out`` and rename it to ``out``: ``out`` is either
    what it was or complete, never half-written (a failure removes the temporary directory). An existing
    ``out`` is replaced only if empty or with ``overwrite``; it is moved aside until the rename is done."""
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    aside: Path | None = None
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's is private (0700): give it a new directory's mode
        write(tmp)
        for file in tmp.rglob("*"):  # some writers make private files (0600): give each a new file's mode
            if file.is_file():
                file.chmod(0o666 & ~_umask())
        _fsync_tree(tmp)
        if out.is_dir():
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(aside / out.name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not out.exists():
            (aside / out.name).rename(out)  # the old directory back in its place
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and ``root`` itself to disk (before the rename makes them final)."""
    for path in [*root.rglob("*"), root]:
        if path.is_file() or path == root:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_checkpoint(tmp: Path, bundle: ModelBundle, standard: StandardModel, result: Exported) -> None:
    """The checkpoint's files in ``tmp``: weights and configuration, generation settings, tokenizer, the
    model card and the export record."""
    standard.model.save_pretrained(tmp, safe_serialization=True)
    if not (tmp / "generation_config.json").is_file():  # models that cannot generate save none
        standard.model.generation_config.save_pretrained(tmp)
    bundle.tokenizer.save_pretrained(tmp)
    (tmp / CARD).write_text(model_card(result))
    (tmp / RECORD).write_text(json.dumps(export_record(result), indent=2) + "\n")


# --- the model card and the export record -------------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    return name not in EMBEDDED_MODELS and not Path(name).exists()


def _cell(text: str) -> str:
    """``text`` as one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or " "


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def model_card(result: Exported) -> str:
    """The checkpoint's ``README.md``: metadata header, base model, architecture, edits in order."""
    methods = list(dict.fromkeys(item.edit.method for item in result.edits))
    header = ["---", "library_name: transformers"]
    if _is_hub_id(result.model):
        header.append(f"base_model: {result.model}")
    header += ["tags:", "- attnedit", "- knowledge-editing", *(f"- {m}" for m in methods), "---", ""]
    base = EMBEDDED_MODELS.get(result.model)
    described = f" ({base.description})" if base is not None else ""
    lines = [
        *header,
        f"# {result.path.name}",
        "",
        f"`{result.model}`{described} with {len(result.edits)} knowledge edit(s) applied in order by "
        f"attnedit {__version__}. It is a standard Hugging Face checkpoint:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{result.path.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{result.path.name}")',
        "```",
        "",
        "## Base model",
        "",
        f"- model: `{result.model}`",
        f"- fingerprint: `{result.fingerprint}` (attnedit's fingerprint of its weights; every edit below "
        "records the fingerprint of the model it was made on)",
        f"- architecture: {result.source_architecture}, weights in {result.dtype}",
        "",
        "## Architecture",
        "",
    ]
    if result.notes or result.caveats:
        if result.architecture != result.source_architecture:
            lines += [f"Saved as **{result.architecture}** (the base is {result.source_architecture}).", ""]
        lines += [f"- {note}" for note in [*result.notes, *result.caveats]] + [""]
    else:
        lines += [f"{result.architecture}, as the base model: the edits change existing weights only.", ""]
    lines += ["## Edits", "", "Applied in this order, each to the weights the ones before it left.", ""]
    for k, item in enumerate(result.edits, 1):
        lines += _edit_section(k, item)
    return "\n".join(lines).rstrip() + "\n"


def _edit_section(k: int, item: ExportedEdit) -> list[str]:
    edit = item.edit
    hyper = edit.hyperparameters
    preset = hyper.get("preset")
    shown = {key: value for key, value in hyper.items() if key not in ("preset", "stats", "terms")}
    summary = ", ".join(f"{key}={_short(value, 40)}" for key, value in shown.items())
    lines = [
        f"### {k}. `{item.path.name}`",
        "",
        f"- method: **{edit.method}**" + (f", preset `{preset}`" if preset else ""),
        f"- made on: {edit.model_label()}",
        f"- file sha256: `{item.sha256}`",
        f"- changes: {', '.join(f'`{n}`' for n in edit.deltas) or 'nothing'}"
        + (f"; creates {', '.join(f'`{n}`' for n in edit.created)}" if edit.created else ""),
    ]
    if summary:
        lines.append(f"- settings: {summary}")
    if hyper.get("terms"):
        lines.append(f"- loss terms: {_short(hyper['terms'], 200)}")
    if hyper.get("stats"):
        lines.append(f"- statistics: {_short(hyper['stats'], 200)}")
    lines += [
        "",
        "| subject | prompt | new | true |",
        "|---|---|---|---|",
        *(
            f"| {_cell(r.subject)} | {_cell(r.prompt)} | {_cell(r.target_new)} | {_cell(r.target_true)} |"
            for r in edit.requests
        ),
        "",
        "<details><summary>hyper-parameters</summary>",
        "",
        "```json",
        json.dumps(hyper, indent=2, default=str),
        "```",
        "",
        "</details>",
        "",
    ]
    if item.scores is not None:
        lines += [f"Scores: {item.scores.source}.", "", item.scores.table, ""]
    else:
        lines += ["Scores: none recorded (no evaluation run kept and scored this edit file).", ""]
    return lines


def export_record(result: Exported) -> dict[str, Any]:
    """``attnedit_export.json``: what the card says, for programs."""
    return {
        "format": FORMAT,
        "attnedit_version": __version__,
        "base": {
            "model": result.model,
            "fingerprint": result.fingerprint,
            "architecture": result.source_architecture,
            "dtype": result.dtype,
        },
        "architecture": result.architecture,
        "notes": result.notes,
        "caveats": result.caveats,
        "edits": [
            {
                "file": item.path.name,
                "sha256": item.sha256,
                "method": item.edit.method,
                "model_name": item.edit.model_name,
                "model_fingerprint": item.edit.model_fingerprint,
                "requests": [asdict(r) for r in item.edit.requests],
                "hyperparameters": item.edit.hyperparameters,
                "parameters": sorted(item.edit.deltas),
                "created": item.edit.created,
                "scores": None if item.scores is None else asdict(item.scores),
            }
            for item in result.edits
        ],
    }
