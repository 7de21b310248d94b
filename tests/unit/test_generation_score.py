"""The generation scores GES/GPS (docs/metrics.md): the match rule, per-prompt token budgets of the greedy
decoder, the evaluator's scores on tiny models against transformers' own greedy continuation, the
per-case-then-over-cases summary, paired differences and the report's columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import hf_greedy

from attnedit.core.data import EditCase, EditRequest, Probe
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import generate
from attnedit.core.tokens import encode_prompt, encode_target
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import (
    GENERATION_MARGIN,
    case_counts,
    generation_hit,
    generation_probes,
    paired_difference,
    summarize,
)

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Michel Rocard is",
    "Toko Yasuda plays the",
    "Rome is the capital of",
    "Autonomous University of Madrid is in",
    "The name of the country of citizenship of Isabel May is",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """torch on one thread for this module."""


def test_generation_hit_is_an_exact_prefix_after_leading_whitespace():
    assert generation_hit(" Rome, the capital", "Rome")
    assert generation_hit("\n  Rome.", " Rome ")  # the target's own surrounding whitespace is stripped
    assert generation_hit("Rome", "Rome")
    assert generation_hit(" New York City", "New York")
    assert not generation_hit(" rome", "Rome")  # no case folding
    assert not generation_hit(" the city of Rome", "Rome")  # the answer must come first
    assert not generation_hit(" Ro", "Rome")  # a cut-off answer is not the answer
    assert not generation_hit(" New  York", "New York")  # inner whitespace is exact
    assert generation_hit(" Romeo", "Rome")  # a prefix: what follows the target is not read


def test_generation_probes_are_the_rewrite_and_paraphrase_prompts_with_o_new():
    case = EditCase(
        "c",
        EditRequest("{} is in", "X", "Rome", "Paris"),
        rewrite=(Probe("X is in", "Rome"),),
        paraphrase=(Probe("One finds X in", "Rome"), Probe("X stands in", "Rome")),
        neighborhood=(Probe("Y is in", "Paris"),),
    )
    probes = generation_probes(case)
    assert [(p.prompt, p.target) for p in probes["GES"]] == [("X is in", "Rome")]
    assert [(p.prompt, p.target) for p in probes["GPS"]] == [
        ("One finds X in", "Rome"),
        ("X stands in", "Rome"),
    ]


def test_generate_takes_a_token_budget_per_prompt(tiny):
    budgets = [1, 4, 2, 3]
    together = generate(tiny.model, tiny.tokenizer, PROMPTS[:4], max_new_tokens=budgets, adapter=tiny.adapter)
    alone = [
        generate(tiny.model, tiny.tokenizer, [p], max_new_tokens=b, adapter=tiny.adapter)[0]
        for p, b in zip(PROMPTS[:4], budgets, strict=True)
    ]
    assert together == alone
    # transformers' generate (no adapter) cuts the rows the same way
    assert generate(tiny.model, tiny.tokenizer, PROMPTS[:4], max_new_tokens=budgets) == together
    with pytest.raises(ValueError, match="2 token budgets for 4 prompts"):
        generate(tiny.model, tiny.tokenizer, PROMPTS[:4], max_new_tokens=[1, 2])


def _own_answer(bundle: ModelBundle) -> tuple[str, str]:
    """A prompt and a target the model's greedy continuation of it starts with, read off transformers' own
    greedy decoding: the text of its first ``n`` tokens (the fewest giving a clean non-blank text that
    the longer continuation extends; random tiny models also emit stray bytes), where the target's own
    token count plus the margin covers those ``n`` tokens."""
    for prompt in PROMPTS:
        for n in range(1, 6):
            short, longer = (hf_greedy(bundle, [prompt], k)[0] for k in (n, n + GENERATION_MARGIN + 4))
            target = short.strip()
            if not target or not longer.startswith(short) or not target.isprintable():
                continue
            if len(encode_target(bundle.tokenizer, prompt, target)) + GENERATION_MARGIN >= n:
                return prompt, target
    pytest.fail(f"no clean greedy answer of {bundle.name} to any prompt")


def _case(case_id: str, rewrite: str, paraphrases: list[str], new: str) -> EditCase:
    return EditCase(
        case_id,
        EditRequest("{} is in", "X", new, "Paris"),
        rewrite=(Probe(rewrite, new),),
        paraphrase=tuple(Probe(p, new) for p in paraphrases),
    )


def test_the_models_own_greedy_answer_scores_100_and_another_0(tiny):
    """A target chosen as the model's greedy answer (by transformers' ``generate``) is generated: GES and
    GPS 1 per prompt; a target it does not generate: 0; a case mixing both paraphrases: half."""
    prompt, answer = _own_answer(tiny)
    other = next(p for p in PROMPTS if not hf_greedy(tiny, [p], 8)[0].lstrip().startswith(answer))
    wrong = "Zzyzx"
    assert not any(t.lstrip().startswith(wrong) for t in hf_greedy(tiny, [prompt, other], 8))
    evaluator = Evaluator(tiny, EvalConfig(fluency=False))
    right = evaluator.evaluate(_case("right", prompt, [prompt], answer))
    assert right["generation_score"] == {"GES": [1.0], "GPS": [1.0]}
    assert right["generated_answers"]["GES"][0].lstrip().startswith(answer)
    miss = evaluator.evaluate(_case("wrong", prompt, [prompt], wrong))
    assert miss["generation_score"] == {"GES": [0.0], "GPS": [0.0]}
    # the other paraphrase is answered otherwise (chosen so by transformers' continuation)
    mixed = evaluator.evaluate(_case("mixed", prompt, [prompt, other], answer))
    assert mixed["generation_score"] == {"GES": [1.0], "GPS": [1.0, 0.0]}
    # GPS over the cases: per case the mean over its prompts (1, 0, 0.5), then the mean over cases
    summary = summarize([right, miss, mixed])
    assert summary["GES"]["mean"] == pytest.approx(100 * 2 / 3) and summary["GES"]["n"] == 3
    assert summary["GPS"]["mean"] == pytest.approx(50.0)
    # switched off: no generation score, the same comparisons
    off = Evaluator(tiny, EvalConfig(fluency=False, generation_score=False)).evaluate(
        _case("mixed", prompt, [prompt, other], answer)
    )
    assert "generation_score" not in off and "generated_answers" not in off
    assert off["comparisons"] == mixed["comparisons"]


def test_the_token_budget_is_the_targets_count_plus_the_margin(tiny, monkeypatch):
    """The decoder is asked for each prompt's target token count plus ``GENERATION_MARGIN`` tokens, all
    of a case's prompts (and its translations') in one batch."""
    import attnedit.evaluation.evaluator as evaluator_module

    calls = []

    def spy(model, tokenizer, prompts, **kw):
        calls.append((list(prompts), kw["max_new_tokens"], kw["batch_size"]))
        return generate(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(evaluator_module, "generate", spy)
    french = EditCase(
        "c", EditRequest("{} est à", "X", "Rome", "Paris"), rewrite=(Probe("X est à", "Rome"),), language="fr"
    )
    case = EditCase(
        "c",
        EditRequest("{} is in", "X", "New York City", "Paris"),
        rewrite=(Probe("X is in", "New York City"),),
        paraphrase=(Probe("One finds X in", "New York City"),),
        language="en",
        translations={"fr": french},
    )
    record = Evaluator(tiny, EvalConfig(fluency=False)).evaluate(case)
    ((prompts, budgets, batch),) = calls
    assert prompts == ["X is in", "One finds X in", "X est à"] and batch == 3
    tok = tiny.tokenizer
    for prompt, target, budget in zip(prompts, ["New York City"] * 2 + ["Rome"], budgets, strict=True):
        target_ids = encode_prompt(tok, f"{prompt} {target}")[len(encode_prompt(tok, prompt)) :]
        assert budget == len(target_ids) + GENERATION_MARGIN
    assert set(record["generation_score"]) == {"GES", "GPS", "GES@fr"}
    assert "GES@fr" in summarize([record]) and summarize([record])["GPS@fr"]["n"] == 0


def _record(case_id: str, **scores: list[float]) -> dict:
    return {"case_id": case_id, "comparisons": {}, "generation_score": scores}


def test_summary_averages_per_case_then_over_cases():
    records = [
        _record("0", GES=[1.0], GPS=[1.0, 1.0, 1.0, 0.0]),
        _record("1", GES=[0.0], GPS=[0.0]),
        _record("2", GES=[1.0], GPS=[]),  # no paraphrases: not a GPS case
        {"case_id": "3", "comparisons": {}},  # no generation score (off, or an older record)
    ]
    summary = summarize(records)
    per_case = [0.75, 0.0]
    assert summary["GPS"]["mean"] == pytest.approx(100 * np.mean(per_case))  # not pooled 3 / 5
    assert summary["GPS"]["ci95"] == pytest.approx(100 * 1.96 * np.std(per_case, ddof=1) / math.sqrt(2))
    assert summary["GPS"]["n"] == 2
    assert summary["GES"]["mean"] == pytest.approx(100 * 2 / 3) and summary["GES"]["n"] == 3
    assert summarize(records[3:])["GES"] == {"mean": None, "ci95": None, "n": 0}
    counts = case_counts(records, "GPS")
    assert counts.tolist() == [[0.75, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


def test_paired_generation_scores_match_the_summaries():
    base = [_record(str(i), GES=[float(i % 2)], GPS=[1.0, float(i % 3 == 0)]) for i in range(8)]
    better = [_record(str(i), GES=[1.0], GPS=[1.0, 1.0]) for i in reversed(range(8))]
    out = paired_difference(base, better, ("GES", "GPS"), resamples=300)
    for name in ("GES", "GPS"):
        assert out[name]["base"] == pytest.approx(summarize(base)[name]["mean"])
        assert out[name]["other"] == pytest.approx(100.0)
        assert out[name]["diff_ci"][0] >= 0 and out[name]["cases"] == 8


def test_report_columns_show_the_generation_scores_and_dash_without_them():
    from attnedit.runs.report import TABLE_COLUMNS, ReportRow, columns, markdown_table, paired, paired_table

    with_score = [_record(str(i), GES=[1.0], GPS=[float(i % 2)]) for i in range(4)]
    for r in with_score:
        r["comparisons"] = {"ES": {"right_nll": [1.0], "wrong_nll": [2.0]}}
    old = [{"case_id": r["case_id"], "comparisons": r["comparisons"]} for r in with_score]
    rows = [
        ReportRow(label, [], {}, {**summarize(records), "_cases": len(records)}, records)
        for label, records in (("new", with_score), ("old", old), ("new2", with_score))
    ]
    assert {"GES", "GPS"} <= set(TABLE_COLUMNS)
    cols = columns(rows=rows)
    table = markdown_table(rows, cols).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    ges = header.index("GES")
    cells = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[2:]
    }
    assert cells["new"][ges] == "100.0 ± 0.0" and cells["old"][ges] == "-"
    assert cells["new"][header.index("GPS")].startswith("50.0 ± ")
    # paired differences: GES/GPS where both runs have them; a run without them is compared on the rest
    diffs = paired(rows, "new")
    assert {"ES", "GES", "GPS"} <= set(diffs["new2"]) and diffs["new2"]["GPS"]["diff"] == 0
    assert "ES" in diffs["old"] and not {"GES", "GPS"} & set(diffs["old"])
    assert "GES" in paired_table(diffs, "new").splitlines()[0]
