"""An evaluation run's settings, manifest and identity: ``RunConfig`` (with its ``Shard``), the manifest
a run directory records (``build_manifest``), the fields a run directory must match to be continued
(``run_identity``), and the pooled ``summary.json`` (``write_summary``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnedit.core.data import Dataset, EditCase
from attnedit.core.datasets import DATASETS
from attnedit.core.models import ModelBundle
from attnedit.core.version import __version__
from attnedit.editing.spec import Editor
from attnedit.evaluation.evaluator import EvalConfig
from attnedit.evaluation.general import GeneralConfig
from attnedit.evaluation.metrics import summarize
from attnedit.evaluation.records import CaseRecord, Summary
from attnedit.runs.rundir import RunDir, data_manifest, environment_manifest, model_manifest

MODES = ("single", "batch", "sequential")
SUMMARY = "summary.json"


@dataclass(frozen=True)
class Shard:
    """One of ``count`` contiguous blocks of a run's cases (``--shard index/count``)."""

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
class StreamConfig:
    """A sequential run's checkpoints (``--checkpoint-every``): every ``checkpoint_every`` edits the edits
    so far (a seeded sample of at most ``sample``) are scored again and general ability (``general``) is
    measured against the unedited model; the stream stops when the model collapses (a non-finite weight
    or score, or perplexity above ``collapse_factor`` times the unedited model's)."""

    checkpoint_every: int | None = None
    sample: int = 100
    general: GeneralConfig = field(default_factory=GeneralConfig)
    collapse_factor: float = 10.0

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be at least 1, not {self.checkpoint_every}")
        if self.sample < 1:
            raise ValueError(f"--checkpoint-sample must be at least 1, not {self.sample}")
        if not self.collapse_factor > 1:
            raise ValueError(f"--collapse-factor must be above 1, not {self.collapse_factor}")

    def manifest(self) -> dict[str, Any] | None:
        """What a run directory records (None without checkpoints: a plain sequential run)."""
        if self.checkpoint_every is None:
            return None
        return {
            "checkpoint_every": self.checkpoint_every,
            "sample": self.sample,
            "general": self.general.model_dump(),
            "collapse_factor": self.collapse_factor,
        }


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
    params: dict[str, Any] = field(default_factory=dict)  # overrides of preset fields
    # SADR settings over the preset's sadr block (X+sadr methods)
    sadr: dict[str, Any] = field(default_factory=dict)
    # keep every edit as DIR/edits/HASH.safetensors (HASH: of the group's requests); sequential mode always
    # keeps its edits, as DIR/edits/NNNNN.safetensors (NNNNN: the position in the sequence)
    save_edits: bool = False
    # fluency generation: cases decoded in one batch (a speed setting: not part of a run's identity; the
    # greedy FL does not depend on it, KnowEdit's sampled KE_FLU does: docs/reliability.md)
    generation_cases: int = 16
    # a directory of target-optimisation groups shared by runs (``editing.target_cache.target_cache``): a run
    # whose groups are there (the same model, settings and rows, e.g. IntAttn-Edit after MEMIT on the same
    # batch) takes their targets instead of optimising them. A speed setting: not part of a run's identity
    targets_cache: str | None = None
    repair: bool = False  # move unreadable record lines to the quarantine file before the run (--repair)
    # sequential mode: checkpoints along the stream (``sequential``)
    stream: StreamConfig = field(default_factory=StreamConfig)

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
        if self.stream.checkpoint_every is not None and self.mode != "sequential":
            raise ValueError("--checkpoint-every needs --mode sequential (checkpoints are along a stream)")
        if self.mode == "sequential" and self.targets_cache:
            raise ValueError(
                "--targets-cache needs --mode single or batch: a sequential edit's targets are optimised on "
                "the model with the earlier edits applied, so they are not shared"
            )


def registered_data(name: str, dataset: Dataset) -> dict[str, Any]:
    """For data given by a registered name: ``{"data_set": {name, pinned sha256, whether the file read is
    the pinned upstream file}}`` (a local copy in ``$ATTNEDIT_DATA`` may differ); else nothing."""
    registered = DATASETS.get(name)
    if registered is None or Path(name).is_file():
        return {}
    pinned = registered.files[0].sha256
    return {"data_set": {"name": name, "pinned_sha256": pinned, "upstream": dataset.sha256 == pinned}}


def build_manifest(
    config: RunConfig, bundle: ModelBundle, dataset: Dataset, editor: Editor
) -> dict[str, Any]:
    """The run's manifest: model, method, hyper-parameters, data, range, mode, seed, evaluation
    settings and versions (``run_identity`` names the fields a resumed run must match)."""
    return {
        "attnedit_version": __version__,
        "model": model_manifest(bundle),
        "method": editor.name,
        "label": config.label or editor.name,
        "hyperparameters": editor.hyperparameters(),
        "data": data_manifest(dataset) | registered_data(config.data, dataset),
        "limit": config.limit,
        "first": config.first,
        "mode": config.mode,
        "batch_size": config.batch_size,
        "shard": asdict(config.shard),
        "seed": config.seed,
        "eval": config.eval.manifest(),
        "ppl_corpus": config.ppl_corpus,
        "stream": config.stream.manifest(),
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
    "stream",
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
