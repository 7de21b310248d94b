"""Single and batch mode on Ray actors (``--backend ray``): each actor builds its ``UnitWorker`` once
(``EvalWorkerFactory``) and computes ``run_unit``s, this process writing their records and edits
(``executors.fan_out``); units that failed on every try are recorded in the manifest (``report_failed``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from attnedit.core.data import EditCase
from attnedit.core.deltas import WeightEdit
from attnedit.core.models import ModelBundle, load_model
from attnedit.editing.registry import make_editor
from attnedit.evaluation.evaluator import Evaluator
from attnedit.evaluation.records import CaseRecord
from attnedit.runs.config import RunConfig
from attnedit.runs.executors import FailedUnit, RayOptions, UnitsFailedError, fan_out
from attnedit.runs.rundir import MANIFEST, RunDir, seed_everything
from attnedit.runs.saved_edits import group_edit_path
from attnedit.runs.units import RunState, Unit, UnitWorker, plan_units, run_unit

# what a Ray actor returns for a unit: its records, and the edits the driver saves (--save-edits)
UnitResult = tuple[list[CaseRecord], list[tuple[list[EditCase], WeightEdit]]]


def check_backend(config: RunConfig, ray: RayOptions | None) -> None:
    """Sequential mode's cases depend on each other (each edit builds on the previous ones): local only."""
    if ray is not None and config.mode == "sequential":
        raise ValueError(
            "--backend ray: sequential mode runs locally only (its edits build on each other); "
            "drop --backend ray, or use --mode single or batch"
        )


def report_failed(run_dir: RunDir[CaseRecord], manifest: dict[str, Any], failed: list[FailedUnit]) -> None:
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
class EvalWorkerFactory:
    """Builds a Ray actor's worker: loads the run's model (checked against the manifest's fingerprint),
    editor and evaluator once, seeded as the local run is."""

    config: RunConfig
    manifest: dict[str, Any]

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

    def __call__(self, unit: Unit) -> UnitResult:
        records: list[CaseRecord] = []
        kept = run_unit(self.worker, unit, lambda finished, _counted: records.extend(finished))
        return records, kept


def run_groups_on_ray(state: RunState, groups: list[list[EditCase]], options: RayOptions) -> list[FailedUnit]:
    """Single and batch mode on Ray actors: the same units as the local loop (``runner``), this process
    writing each unit's records (and, with --save-edits, its edits) once the unit has returned."""
    config, worker = state.config, state.worker
    units = plan_units(groups, state.done, config.generation_cases, worker.evaluator.config.fluency)

    def on_result(unit: Unit, result: UnitResult) -> None:
        records, kept = result
        for group, edit in kept:
            edit.save(group_edit_path(state.run_dir.path, group))
        state.write(records)

    factory = EvalWorkerFactory(config, worker.manifest)
    report = fan_out(units, factory, on_result, lambda unit: unit.case_ids, options)
    return report.failed
