"""The work behind ``attnedit edit``: build a request, edit, the answers before and after
(``evaluation.answers``)."""

from __future__ import annotations

from pathlib import Path

from attnedit.core.data import EditCase, EditRequest, Probe, load_cases
from attnedit.core.deltas import WeightEdit
from attnedit.core.models import load_model
from attnedit.core.scoring import generate
from attnedit.core.tokens import fill_prompt
from attnedit.editing.registry import make_editor
from attnedit.evaluation.answers import Answer, probe_answers


def edit_case_from_args(
    model: str,
    subject: str | None,
    prompt: str | None,
    target_new: str | None,
    target_true: str | None,
    paraphrase: str | None,
    neighbor: str | None,
    request_file: Path | None,
    index: int,
) -> tuple[EditCase, list[tuple[str, str]]]:
    """The case to edit and the (label, prompt) probes to show; from flags or one record of a file."""
    if request_file is not None:
        cases = load_cases(str(request_file)).cases
        if not 0 <= index < len(cases):
            raise ValueError(f"--index {index} out of range: {request_file} has {len(cases)} cases")
        case = cases[index]
        probes = [("edit prompt", case.request.text)]
        if case.paraphrase:
            probes.append(("paraphrase", case.paraphrase[0].prompt))
        if case.neighborhood:
            probes.append(("neighbour", case.neighborhood[0].prompt))
        return case, probes
    if not (subject and prompt and target_new):
        missing = [
            f"--{n}"
            for n, v in (("subject", subject), ("prompt", prompt), ("target-new", target_new))
            if not v
        ]
        raise ValueError(f"give {', '.join(missing)} (or --file DATA --index N)")
    text, _ = fill_prompt(prompt, subject)
    request = EditRequest(
        prompt=prompt, subject=subject, target_new=target_new, target_true=target_true or ""
    )
    case = EditCase(case_id="cli", request=request, rewrite=(Probe(text, target_new),))
    probes = [("edit prompt", text)]
    if paraphrase:
        probes.append(("paraphrase", paraphrase))
    if neighbor:
        probes.append(("neighbour", neighbor))
    return case, probes


def run_single_edit(
    case: EditCase,
    probes: list[tuple[str, str]],
    method: str,
    model: str,
    preset: str | None,
    overrides: dict[str, str],
    sadr: dict[str, object] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[list[Answer], list[Answer], WeightEdit]:
    """Edit ``case`` with ``method`` (``overrides``: the preset's fields; ``sadr``: SADR settings of
    ``X+sadr`` methods) on ``model`` loaded on ``device`` in ``dtype``; the answers to ``probes``
    before and after, and the edit (left applied)."""
    bundle = load_model(model, dtype=dtype, device=device)
    if not case.request.target_true:
        # the current object: the model's own greedy answer on the edit prompt
        answer = generate(bundle.model, bundle.tokenizer, [case.request.text], max_new_tokens=4)[0]
        words = answer.strip().split()
        object_true = words[0].strip(".,;:") if words else ""
        request = EditRequest(case.request.prompt, case.request.subject, case.request.target_new, object_true)
        case = EditCase(case_id=case.case_id, request=request, rewrite=case.rewrite)
    editor = make_editor(method, bundle, preset, overrides, sadr=sadr)
    before = probe_answers(bundle, probes, case.request)
    applied = editor.apply(bundle, [case])
    after = probe_answers(bundle, probes, case.request)
    return before, after, applied.edit
