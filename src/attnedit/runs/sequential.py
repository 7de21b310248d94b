"""Sequential mode: a stream of edits. The edits of every group accumulate on the model; every case is
evaluated on the final model. With checkpoints (``StreamConfig.checkpoint_every``) the stream is also
measured along the way.

Files in the run directory (besides the manifest and the records)::

    edits/NNNNN.safetensors   the edit of group NNNNN (its deltas, the requests, their digests)
    stream/state.json         groups done, the sha256 of the edited weights after them, the editor's
                              state file, whether the model collapsed (written atomically after each group)
    stream/editor-NNNNN.safetensors  a stream editor's state after group NNNNN (AlphaEdit's C_prev)
    curves.jsonl              one line per checkpoint (``edits`` 0 is the unedited model)

Resuming (the same command again, even after ``kill -9``): the saved edits of the groups done are
re-applied in order, the weights' sha256 checked against the state, the editor's state loaded, and the
stream goes on from the next group, each group computed under a seed of its own (``group_seed``), so the
resumed stream ends with the same weights and records as an uninterrupted one. A checkpoint whose line is
missing is measured when the stream passes it again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from attnedit.core.data import EditCase
from attnedit.core.deltas import AppliedEdit, WeightEdit, tensors_digest
from attnedit.editing.spec import StatefulEditor, after_group
from attnedit.evaluation.general import GeneralAbility
from attnedit.evaluation.metrics import GENERATION_METRICS, KNOWEDIT_METRICS, summarize
from attnedit.evaluation.records import CaseRecord, Reference
from attnedit.runs.rundir import (
    CURVES,
    RunConflictError,
    append_line,
    read_curves,
    seed_everything,
)
from attnedit.runs.saved_edits import saved_edit, sequential_edit_path
from attnedit.runs.units import RunState

STREAM = "stream"
STATE = "state.json"
EDITED_METRICS = ("ES", "PS", "NS", "AvgS", *GENERATION_METRICS, *KNOWEDIT_METRICS)
"""The scores of the edits so far that a checkpoint keeps (those the data have)."""
CHECKPOINT_BOOTSTRAP = 200
SCORE_BLOCK = 64
"""Cases scored in one call on the final model, at least (rounded up to a multiple of the fluency
decoding batch; an interrupted run recomputes at most these)."""


class StreamCollapsedError(RuntimeError):
    """The model collapsed during a stream (a non-finite weight or score, or perplexity blown up)."""


class StreamStateError(RunConflictError):
    """A stream's saved state that cannot be continued exactly."""


def group_seed(seed: int, k: int) -> int:
    """The seed group ``k`` of a stream is computed under (so a resumed stream computes it alike)."""
    return seed * 1_000_003 + k


def curves_path(out: Path) -> Path:
    """The checkpoints of the run in ``out``."""
    return out / CURVES


@dataclass
class WeightTracker:
    """The edited parameters of a stream and the sum of their deltas (float32), for the norms of the
    weights and of their accumulated change, the check for non-finite values and the weights' digest."""

    changes: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, edit: WeightEdit) -> None:
        for name, delta in edit.deltas.items():
            delta = delta.float()
            self.changes[name] = self.changes[name] + delta if name in self.changes else delta.clone()

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {name: params[name].detach() for name in sorted(self.changes)}

    def norms(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Per edited parameter: ``norm`` (Frobenius, of the weights now) and ``change`` (of the sum of
        the stream's deltas)."""
        return {
            name: {"norm": float(p.float().norm()), "change": float(self.changes[name].norm())}
            for name, p in self._params(model).items()
        }

    def non_finite(self, model: nn.Module) -> list[str]:
        """The edited parameters holding a NaN or an infinity."""
        return [name for name, p in self._params(model).items() if not bool(torch.isfinite(p).all())]

    def digest(self, model: nn.Module) -> str:
        """sha256 of the edited parameters as they are now."""
        return tensors_digest(self._params(model))


@dataclass
class Stream:
    """One sequential run's loop: the groups, the saved state, the checkpoints."""

    state: RunState
    groups: list[list[EditCase]]
    references: dict[str, Reference]
    general: GeneralAbility | None
    applied: list[AppliedEdit] = field(default_factory=list)
    tracker: WeightTracker = field(default_factory=WeightTracker)
    seconds: dict[str, float] = field(default_factory=dict)
    seconds_edits: float = 0.0
    measured: set[int] = field(default_factory=set)  # the edit counts whose checkpoint line exists
    reference_ppl: float | None = None

    @property
    def out(self) -> Path:
        return self.state.run_dir.path

    @property
    def every(self) -> int | None:
        return self.state.config.stream.checkpoint_every

    # -- saved state --------------------------------------------------------------------------------------

    def read_state(self) -> dict[str, Any] | None:
        path = self.out / STREAM / STATE
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            int(saved["groups"])
        except (ValueError, KeyError, TypeError) as err:
            raise StreamStateError(
                f"{path}: not a stream state ({err}); start the stream in a new --out"
            ) from None
        return dict(saved)

    def write_state(self, groups: int, collapsed: str | None = None) -> None:
        (self.out / STREAM).mkdir(exist_ok=True)
        editor, model = self.state.worker.editor, self.state.worker.bundle.model
        editor_file = None
        if isinstance(editor, StatefulEditor) and collapsed is None:
            editor_file = f"editor-{groups - 1:05d}.safetensors"
            editor.save_state(self.out / STREAM / editor_file)
        state = {
            "groups": groups,
            "edits": sum(len(g) for g in self.groups[:groups]),
            "weights_sha256": self.tracker.digest(model),
            "editor_state": editor_file,
            "seconds_edits": self.seconds_edits,
            "collapsed": collapsed,
        }
        self.state.run_dir.write_json(f"{STREAM}/{STATE}", state, indent=1)
        for old in (self.out / STREAM).glob("editor-*.safetensors"):
            if old.name != editor_file and collapsed is None:
                old.unlink(missing_ok=True)

    def restore(self, saved: dict[str, Any]) -> None:
        """After re-applying the saved groups: the weights must be those the state records; the editor
        takes its saved state back."""
        worker = self.state.worker
        digest = self.tracker.digest(worker.bundle.model)
        if digest != saved["weights_sha256"]:
            raise StreamStateError(
                f"{self.out}: re-applying the {saved['groups']} saved edit(s) gives other weights than the "
                "stream had (another model build or torch version?); start the stream in a new --out"
            )
        self.seconds_edits = float(saved.get("seconds_edits", 0.0))
        editor_file = saved.get("editor_state")
        if isinstance(worker.editor, StatefulEditor):
            if editor_file is None:
                raise StreamStateError(f"{self.out}: the stream state names no editor state to resume from")
            try:
                worker.editor.load_state(self.out / STREAM / editor_file)
            except ValueError as err:
                raise StreamStateError(f"{err}; start the stream in a new --out") from None

    # -- checkpoints -------------------------------------------------------------------------------------

    def due(self, k: int) -> bool:
        """Whether a checkpoint follows group ``k`` (each ``every`` edits, and after the last group)."""
        if self.every is None:
            return False
        before = sum(len(g) for g in self.groups[:k])
        after = before + len(self.groups[k])
        return k == len(self.groups) - 1 or after // self.every > before // self.every

    def sample(self, edits: int) -> list[EditCase]:
        """The edits so far a checkpoint scores: a seeded order of the stream's cases (fixed for the
        stream), the first ``StreamConfig.sample`` of them that are applied."""
        cases = [c for g in self.groups for c in g]
        order = np.random.default_rng(self.state.config.seed).permutation(len(cases))
        size = self.state.config.stream.sample
        return [cases[i] for i in order if i < edits][:size]

    def checkpoint(self, k: int) -> None:
        """Measure the model after group ``k`` (``k`` -1: unedited) and append the curve line; raises
        ``StreamCollapsedError`` when it has collapsed."""
        edits = sum(len(g) for g in self.groups[: k + 1])
        if edits in self.measured:
            return
        worker = self.state.worker
        t0 = time.perf_counter()
        sample = self.sample(edits)
        refs = [self.references.get(c.case_id) for c in sample]
        records: list[CaseRecord] = worker.evaluator.score_many(sample, refs) if sample else []
        edited: dict[str, Any] = {}
        if records:
            summary = summarize(records, bootstrap=CHECKPOINT_BOOTSTRAP, seed=self.state.config.seed)
            edited = {
                n: summary[n] for n in EDITED_METRICS if n in summary and summary[n]["mean"] is not None
            }
        assert self.general is not None
        t_general = time.perf_counter()
        general = self.general.reference().values if k < 0 else self.general.measure()
        t_general = time.perf_counter() - t_general
        if k < 0:
            self.reference_ppl = general.get("ppl")
        line: dict[str, Any] = {
            "edits": edits,
            "groups": k + 1,
            "sample": len(sample),
            "edited": edited,
            "general": general,
            "weights": self.tracker.norms(worker.bundle.model),
            "seconds": time.perf_counter() - t0,
            "seconds_general": t_general,
            "seconds_edits": self.seconds_edits,
        }
        collapsed = self.collapse(general)
        if collapsed:
            line["collapsed"] = collapsed
        append_line(curves_path(self.out), line)
        self.measured.add(edits)
        if collapsed:
            self.stop(k + 1, collapsed)

    def collapse(self, general: dict[str, float]) -> str | None:
        """Why the model counts as collapsed, or None."""
        bad = self.tracker.non_finite(self.state.worker.bundle.model)
        if bad:
            return f"non-finite weights in {', '.join(bad)}"
        ppl, factor = general.get("ppl"), self.state.config.stream.collapse_factor
        if ppl is not None and math.isnan(ppl):
            return "perplexity is NaN"
        if ppl is not None and self.reference_ppl is not None and ppl > factor * self.reference_ppl:
            return f"perplexity {ppl:.1f} is above {factor:g} x the unedited model's {self.reference_ppl:.1f}"
        return None

    def stop(self, groups: int, reason: str) -> None:
        edits = sum(len(g) for g in self.groups[:groups])
        self.write_state(groups, collapsed=f"after {edits} edits: {reason}")
        raise StreamCollapsedError(
            f"the model collapsed after {edits} edits ({reason}); the stream stopped, its checkpoints are in "
            f"{curves_path(self.out)}"
        )

    # -- the loop ----------------------------------------------------------------------------------------

    def edit_group(self, k: int, group: list[EditCase]) -> None:
        """Compute (or re-apply, when its saved edit is intact) group ``k``'s edit on top of the others,
        under ``group_seed``; the editor's ``after_group``; the state saved."""
        worker, config = self.state.worker, self.state.config
        path = sequential_edit_path(self.out, k)
        seed_everything(group_seed(config.seed, k))
        t0 = time.perf_counter()
        saved = saved_edit(path, group)
        if saved is not None:
            applied = saved.apply(worker.bundle.model)
        else:
            applied = worker.editor.apply(worker.bundle, group)
            applied.edit.info["seconds"] = time.perf_counter() - t0
            if applied.edit.deltas:  # an empty edit (method none) is not saved
                applied.edit.save(path)
        self.applied.append(applied)
        self.tracker.add(applied.edit)
        # a stream's state (AlphaEdit's keys of earlier edits) from the model as it is now
        t1 = time.perf_counter()
        after_group(worker.editor, worker.bundle, group)
        seconds = float(applied.edit.info.get("seconds", t1 - t0))
        self.note_seconds(group, seconds)
        self.seconds_edits += seconds + time.perf_counter() - t1  # the edit and the editor's stream state
        bad = self.tracker.non_finite(worker.bundle.model)
        if bad:
            self.stop(k + 1, f"non-finite weights in {', '.join(bad)}")
        self.write_state(k + 1)

    def reapply(self, k: int, group: list[EditCase]) -> None:
        """Re-apply group ``k``'s saved edit (a group the saved state counts as done)."""
        saved = saved_edit(sequential_edit_path(self.out, k), group)
        if saved is None:
            raise StreamStateError(
                f"{self.out}: the stream state counts group {k} as done, but its saved edit "
                f"{sequential_edit_path(self.out, k).name} is missing or damaged; start the stream in a new "
                "--out"
            )
        self.applied.append(saved.apply(self.state.worker.bundle.model))
        self.tracker.add(saved)
        self.note_seconds(group, float(saved.info.get("seconds", float("nan"))))

    def note_seconds(self, group: list[EditCase], seconds: float) -> None:
        for case in group:
            self.seconds[case.case_id] = seconds / len(group)

    def run(self) -> None:
        saved = self.read_state()
        if saved is not None and saved.get("collapsed"):
            raise StreamCollapsedError(
                f"this stream stopped earlier: the model collapsed {saved['collapsed']}; its checkpoints are "
                f"in {curves_path(self.out)}"
            )
        done_groups = int(saved["groups"]) if saved is not None else 0
        editor = self.state.worker.editor
        if isinstance(editor, StatefulEditor):
            editor.reset_state()  # a stream starts from nothing; a resumed one loads its state below
        if self.every is not None:
            self.measured = {int(line["edits"]) for line in read_curves(self.out, repair=True)}
            if 0 not in self.measured:
                self.checkpoint(-1)
            else:  # the reference measures (and the known facts' answers) of the unedited model again
                assert self.general is not None
                self.reference_ppl = self.general.reference().values.get("ppl")
        bar = tqdm(self.groups, desc="sequential edits", unit="group", leave=False)
        for k, group in enumerate(bar):
            if k < done_groups:
                self.reapply(k, group)
                if k == done_groups - 1:
                    self.restore(saved or {})
            else:
                self.edit_group(k, group)
            if self.due(k):
                self.checkpoint(k)


def run_sequential(state: RunState, groups: list[list[EditCase]]) -> None:
    """A stream (``Stream``): every group's edit on top of the previous ones, checkpoints when asked,
    then every case evaluated on the final model (``SCORE_BLOCK`` cases scored in one call, fluency
    ``config.generation_cases`` cases per decoding batch); all edits are reverted at the end."""
    worker, done = state.worker, state.done
    evaluator, bundle = worker.evaluator, worker.bundle
    cases = [c for g in groups for c in g]
    todo = [c for c in cases if c.case_id not in done]
    if not todo:
        return
    every = state.config.stream.checkpoint_every
    # the unedited model's answers for locality (checkpoints, and a block of the final scoring, may score
    # any case of the stream)
    references = {c.case_id: evaluator.reference(c) for c in cases if c.locality}
    general = GeneralAbility(bundle, state.config.stream.general) if every is not None else None
    stream = Stream(state, groups, references, general)
    try:
        stream.run()
        # blocks of SCORE_BLOCK cases (a multiple of the fluency decoding batch) cut from the whole case
        # list, each scored in one call: a block an interruption left half-written is scored whole again
        # (only its missing records written), so every record is computed among the same cases as in an
        # uninterrupted run
        step = state.config.generation_cases
        size = step * -(-SCORE_BLOCK // step)
        for start in range(0, len(cases), size):
            block = cases[start : start + size]
            if all(c.case_id in done for c in block):
                continue
            finished = worker.score_many(
                block,
                [references.get(c.case_id) for c in block],
                [stream.seconds[c.case_id] for c in block],
                edits_applied=len(stream.applied),
            )
            if evaluator.config.fluency:  # generated by the model with every edit applied
                for i in range(0, len(block), step):
                    evaluator.add_fluency(block[i : i + step], finished[i : i + step])
            state.write([r for r in finished if r["case_id"] not in done])
    finally:
        for edit in reversed(stream.applied):
            edit.revert()
