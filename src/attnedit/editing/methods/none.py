"""Method ``none``: the unedited model (the baseline row of the papers' tables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attnedit.core.data import EditCase
from attnedit.core.deltas import AppliedEdit, WeightEdit
from attnedit.core.models import ModelBundle
from attnedit.editing.spec import MethodSpec, register


@dataclass
class NoEdit:
    """Evaluates the unedited model: an empty edit, handled like any other."""

    name: str = "none"
    preset: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def hyperparameters(self) -> dict[str, Any]:
        return {}

    def prepare(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """Nothing to prepare."""

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """An empty edit (no deltas): the model is untouched, and the result is handled like any edit."""
        edit = WeightEdit(
            deltas={},
            method=self.name,
            hyperparameters={},
            requests=[case.request for case in cases],
            base_hashes={},
            model_fingerprint=bundle.fingerprint,
            model_name=bundle.name,
        )
        return edit.apply(bundle.model)


SPEC = register(
    MethodSpec(
        name="none",
        summary="the unedited model (the baseline row)",
        build=lambda params, terms: NoEdit(),
        sadr=False,
    )
)
