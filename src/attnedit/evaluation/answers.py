"""The model's answers to a few probe prompts, as shown before and after an edit (``attnedit edit``, the
inspector): the greedy continuation and the probabilities of the new and the true object."""

from __future__ import annotations

from dataclasses import dataclass

from attnedit.core.data import EditRequest
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import generate, score_targets


@dataclass(frozen=True)
class Answer:
    """One probe's answer on the model as it was when asked."""

    generated: str  # greedy continuation (a few tokens)
    p_new: float
    p_true: float


def probe_answers(bundle: ModelBundle, probes: list[tuple[str, str]], request: EditRequest) -> list[Answer]:
    """Greedy continuation, P(o_new) and P(o_true) of each (label, prompt) probe on the model as it is now."""
    prompts = [p for _, p in probes]
    generated = generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=8, adapter=bundle.adapter)
    pairs = [(p, t) for p in prompts for t in (request.target_new, request.target_true)]
    scores = score_targets(bundle.model, bundle.tokenizer, bundle.adapter, pairs)
    return [Answer(g.strip(), scores[2 * i].prob, scores[2 * i + 1].prob) for i, g in enumerate(generated)]


def answers_table(probes: list[tuple[str, str]], before: list[Answer], after: list[Answer]) -> str:
    """A markdown table of each probe's answers before and after an edit."""
    lines = [
        "| probe | prompt | before | after | P(new) before -> after | P(true) before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for (label, prompt), b, a in zip(probes, before, after, strict=True):
        lines.append(
            f"| {label} | {prompt} | {b.generated} | {a.generated} | "
            f"{b.p_new:.3f} -> {a.p_new:.3f} | {b.p_true:.3f} -> {a.p_true:.3f} |"
        )
    return "\n".join(lines)
