"""Metric definitions of guides/methods.md (Evaluation): prompt table, fluency, CIs, pooled summaries."""

from __future__ import annotations

import math
import statistics
from collections import Counter

import numpy as np
import pytest

from attnedit.core.data import CommonsenseProbe, EditCase, EditRequest, Probe
from attnedit.evaluation.metrics import (
    AVG_S_COMPONENTS,
    COMPARISON_METRICS,
    KNOWEDIT_METRICS,
    Comparison,
    comparisons,
    distracted,
    harmonic_mean,
    knowedit_probes,
    mean_ci,
    ngram_entropy,
    paired_difference,
    summarize,
)

NEW, TRUE = "Rome", "Paris"
EDIT_SENTENCE = "The Eiffel Tower is located in the city of Rome."


@pytest.fixture
def case() -> EditCase:
    return EditCase(
        case_id="7",
        request=EditRequest("The {} is located in the city of", "Eiffel Tower", NEW, TRUE),
        rewrite=(Probe("The Eiffel Tower is located in the city of", NEW),),
        paraphrase=(
            Probe("The Eiffel Tower stands in", NEW),
            Probe("You can visit the Eiffel Tower in", NEW),
        ),
        reasoning=(Probe("The Eiffel Tower is in the country of", "Italy"),),
        subject_alias=(Probe("The Tour Eiffel is located in the city of", NEW),),
        neighborhood=(Probe("The Louvre is located in", TRUE), Probe("Notre-Dame is located in", TRUE)),
        relation=(Probe("The Eiffel Tower is made of", "iron"),),
        commonsense=(
            CommonsenseProbe("Keep an avocado green.", "Leave the pit in.", "Leave it in the sun."),
        ),
        generation=("The Eiffel Tower is famous for",),
        portability=(Probe("The Eiffel Tower's country's capital is", "Rome", ("Roma",)),),
        locality=(Probe("The mother tongue of Michel Rocard is", "French"),),
    )


def test_comparisons_table(case):
    d = EDIT_SENTENCE + " "
    expected = [
        # ES / PS: right o_new, wrong o_true
        Comparison("ES", "The Eiffel Tower is located in the city of", NEW, TRUE),
        Comparison("PS", "The Eiffel Tower stands in", NEW, TRUE),
        Comparison("PS", "You can visit the Eiffel Tower in", NEW, TRUE),
        # NS / RS: right its own target, wrong o_new
        Comparison("NS", "The Louvre is located in", TRUE, NEW),
        Comparison("NS", "Notre-Dame is located in", TRUE, NEW),
        Comparison("RS", "The Eiffel Tower is made of", "iron", NEW),
        # distracted: the edit sentence, one space, the prompt
        Comparison("DNS", d + "The Louvre is located in", TRUE, NEW),
        Comparison("DNS", d + "Notre-Dame is located in", TRUE, NEW),
        Comparison("DRS", d + "The Eiffel Tower is made of", "iron", NEW),
        # reasoning / subject alias: right its target, wrong o_true
        Comparison("RES", "The Eiffel Tower is in the country of", "Italy", TRUE),
        Comparison("ALIAS", "The Tour Eiffel is located in the city of", NEW, TRUE),
        # commonsense: right vs wrong solution, plain and distracted
        Comparison("OS", "Keep an avocado green.", "Leave the pit in.", "Leave it in the sun."),
        Comparison("DOS", d + "Keep an avocado green.", "Leave the pit in.", "Leave it in the sun."),
    ]
    got = comparisons(case)
    assert Counter(got) == Counter(expected)
    assert len(got) == len(expected)
    # within a metric, the probe order is kept
    for metric in {c.metric for c in expected}:
        assert [c for c in got if c.metric == metric] == [c for c in expected if c.metric == metric]
    # every record key is a declared metric
    assert {c.metric for c in got} == {spec.score for spec in COMPARISON_METRICS}


def test_edit_sentence_and_distracted(case):
    assert case.request.edit_sentence == EDIT_SENTENCE
    assert distracted(case, "The Louvre is in") == EDIT_SENTENCE + " The Louvre is in"


def test_comparisons_empty_sets():
    minimal = EditCase(
        case_id="0",
        request=EditRequest("{} speaks", "Danielle Darrieux", "English", "French"),
        rewrite=(Probe("Danielle Darrieux speaks", "English"),),
    )
    assert comparisons(minimal) == [Comparison("ES", "Danielle Darrieux speaks", "English", "French")]


def test_knowedit_probes(case):
    probes = {name: [(p.prompt, p.target) for p in got] for name, got in knowedit_probes(case).items()}
    assert set(probes) == set(KNOWEDIT_METRICS)
    assert probes["KE_EDIT"] == [("The Eiffel Tower is located in the city of", NEW)]
    assert probes["KE_GEN"] == [
        ("The Eiffel Tower stands in", NEW),
        ("You can visit the Eiffel Tower in", NEW),
    ]
    assert probes["KE_PORT"] == [("The Eiffel Tower's country's capital is", "Rome")]
    assert probes["KE_LOC"] == [("The mother tongue of Michel Rocard is", "French")]


# --------------------------------------------------------------------------- fluency


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_ngram_entropy_hand_computed():
    # "a b a b": 2-grams {ab: 2, ba: 1}, 3-grams {aba: 1, bab: 1}
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    expected = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.97276, abs=1e-5)


def test_ngram_entropy_longer_text():
    # words: the cat the cat the dog
    # 2-grams: (the cat) 2, (cat the) 2, (the dog) 1
    # 3-grams: (the cat the) 2, (cat the cat) 1, (cat the dog) 1
    expected = (2 / 3 * _entropy([2, 2, 1]) + 4 / 3 * _entropy([2, 1, 1])) / 2
    assert ngram_entropy("the cat the cat the dog") == pytest.approx(expected, abs=1e-12)
    # case-insensitive word tokens; punctuation is its own token
    assert ngram_entropy("The cat THE cat the DOG") == pytest.approx(expected, abs=1e-12)
    assert ngram_entropy("x, y") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)


def test_ngram_entropy_degenerate():
    assert ngram_entropy("hello") == 0.0
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("a b") == 0.0  # one 2-gram (entropy 0), no 3-gram
    assert ngram_entropy("a a a a a a") == 0.0  # a single repeated n-gram
    # repetitive text is less fluent than varied text
    assert ngram_entropy("go go go go go go go go") < ngram_entropy("the quick brown fox jumps over the dog")


# --------------------------------------------------------------------------- confidence intervals


def test_mean_ci():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, half, n = mean_ci(values)
    assert n == 4
    assert mean == pytest.approx(3.5)
    assert half == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(4))
    assert mean_ci(v for v in values) == (mean, half, n)  # any iterable
    assert mean_ci([5.0]) == (5.0, 0.0, 1)
    assert mean_ci([]) == (None, None, 0)
    assert mean_ci([3.0, 3.0, 3.0]) == (3.0, 0.0, 3)


def test_harmonic_mean():
    assert harmonic_mean([50.0, 100.0]) == pytest.approx(200 / 3)
    assert harmonic_mean([10.0, 20.0, 40.0]) == pytest.approx(statistics.harmonic_mean([10, 20, 40]))
    assert harmonic_mean([0.0, 90.0]) == 0.0


# --------------------------------------------------------------------------- summaries


def _record(**metrics: list[tuple[float, float]]) -> dict:
    """A per-case record; each metric gets (right_nll, wrong_nll) pairs."""
    return {
        "comparisons": {
            m: {"right_nll": [r for r, _ in pairs], "wrong_nll": [w for _, w in pairs]}
            for m, pairs in metrics.items()
        }
    }


def _pooled(records: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    right = [v for r in records for v in r["comparisons"].get(metric, {}).get("right_nll", [])]
    wrong = [v for r in records for v in r["comparisons"].get(metric, {}).get("wrong_nll", [])]
    return np.array(right), np.array(wrong)


HIT, MISS = (0.5, 2.0), (2.0, 0.5)


@pytest.fixture
def records() -> list[dict]:
    """Unequal prompt counts per case, so pooled and per-case averages differ."""
    return [
        _record(
            ES=[HIT], PS=[HIT, HIT, HIT], NS=[HIT, HIT, HIT, MISS], RS=[HIT], DNS=[HIT, MISS, MISS, MISS]
        ),
        _record(ES=[MISS], PS=[MISS], NS=[(1.0, 1.0)], RS=[HIT, MISS], DNS=[HIT]),
        _record(ES=[HIT], PS=[(0.1, 3.0)], NS=[HIT], RS=[(0.7, 0.2), HIT, HIT], DNS=[MISS, HIT]),
        _record(ES=[(0.2, 0.9)], PS=[MISS, HIT], NS=[MISS, MISS], RS=[MISS], DNS=[HIT, HIT, HIT]),
        _record(
            ES=[MISS],
            PS=[HIT],
            NS=[HIT, HIT],
            RS=[HIT],
            DNS=[(3.0, 0.1)],
            RES=[HIT, MISS],
            ALIAS=[HIT],
            OS=[MISS],
            DOS=[HIT],
        ),
        _record(ES=[HIT], PS=[HIT, MISS], NS=[HIT], RS=[HIT, HIT], DNS=[HIT, MISS], DRS=[(0.4, 0.8)]),
    ]


def test_summarize_scores_are_pooled_over_prompts(records):
    summary = summarize(records)
    for metric in ("ES", "PS", "NS", "RS", "DNS", "RES", "ALIAS", "OS", "DOS", "DRS"):
        right, wrong = _pooled(records, metric)
        hits = (right < wrong).astype(float)
        assert summary[metric]["n"] == len(right), metric
        assert summary[metric]["mean"] == pytest.approx(100 * hits.mean()), metric
        half = 1.96 * hits.std(ddof=1) / math.sqrt(len(hits)) if len(hits) > 1 else 0.0
        assert summary[metric]["ci95"] == pytest.approx(100 * half), metric

    # PS: 7 hits out of 10 prompts pooled; the mean of per-case rates would be 4/6
    assert summary["PS"]["mean"] == pytest.approx(70.0)
    per_case = np.mean([np.mean(np.less(*_pooled([rec], "PS"))) for rec in records])
    assert per_case == pytest.approx(4 / 6)
    # DNS: 7 / 13 pooled vs (1/4 + 1 + 1/2 + 1 + 0 + 1/2) / 6 per case
    assert summary["DNS"]["mean"] == pytest.approx(100 * 7 / 13)
    assert summary["DNS"]["n"] == 13
    # a tie (equal NLL) is not a success
    assert summary["NS"]["mean"] == pytest.approx(100 * 7 / 11)


def test_summarize_magnitudes(records):
    summary = summarize(records)
    for spec in COMPARISON_METRICS:
        right, wrong = _pooled(records, spec.score)
        assert summary[spec.magnitude]["mean"] == pytest.approx(100 * np.exp(-right).mean())
        assert summary[spec.magnitude]["n"] == len(right)
        if spec.failure:
            assert summary[spec.failure]["mean"] == pytest.approx(100 * np.exp(-wrong).mean())
            p_wrong = np.exp(-wrong)
            half = 1.96 * p_wrong.std(ddof=1) / math.sqrt(len(p_wrong)) if len(p_wrong) > 1 else 0.0
            assert summary[spec.failure]["ci95"] == pytest.approx(100 * half)
    failures = {s.failure for s in COMPARISON_METRICS if s.failure}
    assert failures == {"NM_onew", "RM_onew", "DNM_onew", "DRM_onew"}
    right, _ = _pooled(records, "ES")
    assert summary["EM"]["mean"] == pytest.approx(100 * np.mean(np.exp(-right)))
    _, wrong = _pooled(records, "NS")
    assert summary["NM_onew"]["mean"] == pytest.approx(100 * np.mean(np.exp(-wrong)))


def test_summarize_avg_s(records):
    summary = summarize(records)
    parts = [summary[m]["mean"] for m in AVG_S_COMPONENTS]
    assert AVG_S_COMPONENTS == ("ES", "PS", "NS", "RS", "DNS")
    assert summary["AvgS"]["mean"] == pytest.approx(statistics.harmonic_mean(parts))
    assert summary["AvgS"]["n"] == len(records)
    ci = summary["AvgS"]["ci95"]
    assert isinstance(ci, float) and ci > 0
    assert math.isfinite(ci) and ci < 100
    # the bootstrap is seeded: same seed, same interval
    assert summarize(records)["AvgS"]["ci95"] == ci
    assert summarize(records, bootstrap=0)["AvgS"]["ci95"] is None
    assert summarize(records, bootstrap=0)["AvgS"]["mean"] == summary["AvgS"]["mean"]


def test_summarize_avg_s_zero_component(records):
    for rec in records:
        rec["comparisons"]["ES"] = {"right_nll": [3.0], "wrong_nll": [1.0]}
    summary = summarize(records)
    assert summary["ES"]["mean"] == 0.0
    assert summary["AvgS"]["mean"] == 0.0


def test_summarize_avg_s_missing_component(records):
    for rec in records:
        rec["comparisons"].pop("DNS")
    summary = summarize(records)
    assert summary["DNS"] == {"mean": None, "ci95": None, "n": 0}
    assert summary["DNM"] == {"mean": None, "ci95": None, "n": 0}
    assert summary["AvgS"]["mean"] is None
    assert summary["AvgS"]["ci95"] is None
    assert summary["ES"]["mean"] is not None


def test_summarize_fluency_ppl_knowedit():
    records = [
        {
            "comparisons": {},
            "fluency": [6.0, 6.5],
            "ppl": {"nll": 20.0, "tokens": 10},
            "knowedit": {"KE_EDIT": [1.0], "KE_GEN": [0.5, 1.0], "KE_PORT": [0.25], "KE_LOC": [1.0, 0.75]},
            "knowedit_protocol": "easyedit",
        },
        {
            "comparisons": {},
            "fluency": [5.5],
            "ppl": {"nll": 9.0, "tokens": 3},
            "knowedit": {"KE_EDIT": [0.0], "KE_PORT": [0.5, 0.0, 1.0]},
            "knowedit_protocol": "easyedit",
        },
        {"comparisons": {}},  # no generation, no ppl, no KnowEdit probes
    ]
    summary = summarize(records)
    fl = [6.0, 6.5, 5.5]
    assert summary["FL"]["mean"] == pytest.approx(100 * np.mean(fl))
    assert summary["FL"]["ci95"] == pytest.approx(100 * 1.96 * np.std(fl, ddof=1) / math.sqrt(3))
    assert summary["FL"]["n"] == 3

    ppl = [math.exp(2.0), math.exp(3.0)]  # per record: exp(nll / tokens), not scaled
    assert summary["PPL"]["mean"] == pytest.approx(np.mean(ppl))
    assert summary["PPL"]["ci95"] == pytest.approx(1.96 * np.std(ppl, ddof=1) / math.sqrt(2))
    assert summary["PPL"]["n"] == 2

    # EasyEdit's averaging: per case (no probe keys here: one key), then over the cases that have probes
    expected = {
        "KE_EDIT": [1.0, 0.0],
        "KE_GEN": [0.75],
        "KE_PORT": [0.25, 0.5],  # the second case's mean (0.5 + 0 + 1) / 3, not pooled 1.75 / 4
        "KE_LOC": [0.875],
    }
    for name, values in expected.items():
        assert summary[name]["mean"] == pytest.approx(100 * np.mean(values)), name
        assert summary[name]["n"] == len(values), name
        assert summary[name]["protocol"] == "easyedit"
    assert summary["KE_PORT"]["mean"] == pytest.approx(37.5)
    assert summary["KE_EDIT"]["ci95"] == pytest.approx(100 * 1.96 * np.std([1.0, 0.0], ddof=1) / math.sqrt(2))

    # no comparison prompts at all: every comparison entry is empty and Avg S is None
    for spec in COMPARISON_METRICS:
        assert summary[spec.score] == {"mean": None, "ci95": None, "n": 0}
    assert summary["AvgS"]["mean"] is None


def test_summarize_single_record():
    summary = summarize([_record(ES=[HIT], PS=[HIT], NS=[HIT], RS=[MISS, HIT], DNS=[HIT])])
    assert summary["ES"] == {"mean": 100.0, "ci95": 0.0, "n": 1}
    assert summary["RS"]["mean"] == pytest.approx(50.0)
    assert summary["AvgS"]["mean"] == pytest.approx(statistics.harmonic_mean([100, 100, 100, 50, 100]))
    assert summary["AvgS"]["ci95"] is None  # one case: no bootstrap interval
    assert summary["FL"] == {"mean": None, "ci95": None, "n": 0}
    assert summary["PPL"] == {"mean": None, "ci95": None, "n": 0}
    assert summary["KE_EDIT"] == {"mean": None, "ci95": None, "n": 0, "protocol": "easyedit"}


def test_fluency_from_rewrite_prompts_for_data_without_generation_prompts(tiny):
    from attnedit.evaluation.evaluator import EvalConfig, Evaluator

    case = EditCase(
        case_id="x",
        request=EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris"),
        rewrite=(Probe("The Eiffel Tower is in", "Rome"),),
        paraphrase=(Probe("The Eiffel Tower stands in", "Rome"),),
    )
    off = Evaluator(tiny, EvalConfig(max_new_tokens=4)).evaluate(case)
    assert "fluency" not in off  # no generation prompts: no FL unless asked for
    on = Evaluator(tiny, EvalConfig(max_new_tokens=4, fluency_prompts="rewrite")).evaluate(case)
    assert len(on["fluency"]) == 2 and on["generations"][1].startswith("The Eiffel Tower stands in")
    with pytest.raises(ValueError, match="fluency prompts"):
        EvalConfig(fluency_prompts="paraphrase")


def test_paired_difference_matches_the_pooled_rates_and_pairs_by_case(records):
    base = [{**r, "case_id": str(i)} for i, r in enumerate(records)]
    # the other run: every prompt of case 1 flips to a hit, in another record order, plus an unshared case
    flipped = {
        **base[1],
        "comparisons": {
            m: {"right_nll": c["right_nll"], "wrong_nll": [9.0] * len(c["right_nll"])}
            for m, c in base[1]["comparisons"].items()
        },
    }
    other = [flipped, *reversed([r for r in base if r["case_id"] != "1"]), {**base[0], "case_id": "extra"}]
    out = paired_difference(base, other, resamples=500)
    for metric in ("ES", "PS", "NS", "RS", "DNS"):
        right, wrong = _pooled(base, metric)
        right_o, wrong_o = _pooled([flipped if r["case_id"] == "1" else r for r in base], metric)
        d = out[metric]
        assert d["cases"] == len(base) and d["prompts"] == right.size
        assert d["base"] == pytest.approx(100 * (right < wrong).mean())
        assert d["other"] == pytest.approx(100 * (right_o < wrong_o).mean())
        assert d["diff"] == pytest.approx(d["other"] - d["base"]) and d["diff"] >= 0
        lo, hi = d["diff_ci"]
        assert lo <= d["diff"] <= hi and lo >= 0  # only gains: no resample can show a loss
        assert d["relative"] == pytest.approx(100 * d["diff"] / d["base"])
    same = paired_difference(base, base, resamples=100)
    assert all(d["diff"] == 0 and d["diff_ci"] == [0.0, 0.0] for d in same.values())
    with pytest.raises(ValueError, match="share no case"):
        paired_difference(base, [{**base[0], "case_id": "x"}])
    fewer = {
        **base[0],
        "comparisons": {**base[0]["comparisons"], "PS": {"right_nll": [0.5], "wrong_nll": [2.0]}},
    }
    with pytest.raises(ValueError, match="PS: the two runs scored different prompts"):
        paired_difference(base, [fewer])


def test_paired_magnitudes_match_the_summary(records):
    """A magnitude's paired difference pools P(right) (or P(wrong) for ``*_onew``) over prompts exactly as
    the summary does; the same for a translation's ``KEY@LANG`` entries."""
    base = [{**r, "case_id": str(i)} for i, r in enumerate(records)]

    def lower(comparison: dict) -> dict:
        return {**comparison, "right_nll": [v + 0.5 for v in comparison["right_nll"]]}

    lowered = [{**r, "comparisons": {m: lower(c) for m, c in r["comparisons"].items()}} for r in base]
    out = paired_difference(base, lowered, ("EM", "PM", "NM", "NM_onew"), resamples=200)
    summary, other = summarize(base), summarize(lowered)
    for name in ("EM", "PM", "NM", "NM_onew"):
        assert out[name]["base"] == pytest.approx(summary[name]["mean"])
        assert out[name]["other"] == pytest.approx(other[name]["mean"])
    assert out["EM"]["relative"] == pytest.approx(100 * (math.exp(-0.5) - 1))  # every P(right) x e^-0.5
    assert out["NM_onew"]["diff"] == 0  # P(wrong) untouched
    french = [{**r, "comparisons": {f"{m}@fr": c for m, c in r["comparisons"].items()}} for r in base]
    fr = paired_difference(french, french, ("EM@fr",), resamples=50)["EM@fr"]
    assert fr["base"] == pytest.approx(summary["EM"]["mean"])
    with pytest.raises(KeyError, match="unknown metric"):
        paired_difference(base, base, ("XM",))


def test_report_pairs_every_translation_language(records):
    """``report.paired`` adds each language the base run's records hold (``ES@fr``, ``EM@fr``...), and the
    table lists the edit language's scores first, then each language's in the same order."""
    from attnedit.runs.report import ReportRow, paired, paired_table

    base = [
        {
            **r,
            "case_id": str(i),
            "comparisons": {**r["comparisons"], **{f"{m}@fr": c for m, c in r["comparisons"].items()}},
        }
        for i, r in enumerate(records)
    ]
    rows = [ReportRow("a", [], {}, {}, base), ReportRow("b", [], {}, {}, base)]
    diffs = paired(rows, "a", magnitudes=True)["b"]
    assert {"ES", "EM", "ES@fr", "EM@fr"} <= set(diffs)
    assert all(d["diff"] == 0 for d in diffs.values())
    assert diffs["ES@fr"]["base"] == pytest.approx(diffs["ES"]["base"])
    header = paired_table({"b": diffs}, "a").splitlines()[0].split(" | ")
    assert header.index("ES") < header.index("EM") < header.index("ES@fr") < header.index("EM@fr")
