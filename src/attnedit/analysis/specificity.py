"""The prompts of the specificity tasks an analysis measures (Distract-Neighborhood, Relation)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from attnedit.core.data import EditCase
from attnedit.evaluation.metrics import comparisons

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecificityPrompts:
    """Prompts of an edit case's specificity tasks with their (o_true, o_edit) targets."""

    subject: str  # the edited subject (in the prompt, or in the prepended edit sentence)
    metrics: tuple[str, ...]  # per prompt: DNS (Distract Neighborhood), RS (Relation), ...
    prompts: tuple[str, ...]
    targets: tuple[tuple[str, str], ...]


def specificity_prompts(case: EditCase, metrics: Sequence[str] = ("DNS", "RS")) -> SpecificityPrompts:
    """The prompts the metric table scores for ``metrics`` (``metrics.comparisons``): the distracted
    prompt is ``"{request prompt} {o_new}. {neighbour prompt}"``; targets are (o_true, o_edit)."""
    chosen = [c for c in comparisons(case) if c.metric in metrics]
    return SpecificityPrompts(
        subject=case.request.subject,
        metrics=tuple(c.metric for c in chosen),
        prompts=tuple(c.prompt for c in chosen),
        targets=tuple((c.right, c.wrong) for c in chosen),
    )
