"""Pinned metric values of the unedited SmolLM2-135M on the first 30 cases of the merged CounterFact file.

RS and DNS agree with the official SADR evaluation code run on the same model and cases
(RS 83.8, DNS 58.5, reported in the editors issue); the other values were measured with
``attnedit eval`` and cross-checked with ``bench/verify_metrics.py`` (docs/benchmarks.md).
"""

import pytest
from helpers import FIXTURES

from attnedit.core.data import load_cases
from attnedit.core.scoring import score_targets_reference
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import comparisons, summarize

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def first30(smollm2):
    cases = load_cases(FIXTURES / "sadr_merged_counterfact.json").cases[:30]
    evaluator = Evaluator(smollm2, EvalConfig(fluency=False))
    return cases, [evaluator.evaluate(c) for c in cases]


def test_pinned_scores_on_first_30_cases(first30):
    _, records = first30
    s = summarize(records)
    # (right answers, prompts) pooled over prompts
    expected = {
        "ES": (9, 30),
        "PS": (6, 34),
        "NS": (94, 135),
        "RS": (31, 37),
        "DNS": (79, 135),
        "DRS": (8, 37),
    }
    for name, (hits, n) in expected.items():
        assert s[name]["n"] == n, name
        assert s[name]["mean"] == pytest.approx(100 * hits / n, abs=1e-9), name
    assert s["RM"]["mean"] == pytest.approx(4.04, abs=0.05)
    assert s["DNM"]["mean"] == pytest.approx(9.54, abs=0.05)
    assert s["EM"]["mean"] == pytest.approx(0.39, abs=0.05)


def test_records_agree_with_one_forward_per_pair(first30, smollm2):
    cases, records = first30
    for case, record in zip(cases[:3], records[:3], strict=True):
        comps = comparisons(case)
        ref = score_targets_reference(smollm2.model, smollm2.tokenizer, [(c.prompt, c.right) for c in comps])
        for metric in dict.fromkeys(c.metric for c in comps):
            want = [r.nll for c, r in zip(comps, ref, strict=True) if c.metric == metric]
            assert record["comparisons"][metric]["right_nll"] == pytest.approx(want, abs=1e-3), metric
