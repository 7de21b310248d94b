"""KnowEdit metrics as EasyEdit computes them: joined tokenisation, token accuracy, locality against the
unedited model, averaging within each probe key, then the case, then across cases; KE_FLU.

The expected numbers are computed here independently: one plain forward pass over
``tokenizer(prompt + " " + target)``, the target being every id after the prompt's own ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnedit.core.data import EditCase, EditRequest, Probe
from attnedit.core.scoring import generate, joined_target, score_targets
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import knowedit_case_value, summarize


@pytest.fixture(params=["llama", "gpt2"])
def bundle(request, tiny_tokenizer, tiny_bos_tokenizer, one_thread):
    from helpers import make_tiny

    # llama with a BOS token (counted among the prompt's ids), gpt2 without
    return make_tiny(request.param, tiny_bos_tokenizer if request.param == "llama" else tiny_tokenizer)


def _split(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """The joint ids of ``prompt + " " + target`` and where the target starts (the prompt's id count)."""
    full = tokenizer(prompt + " " + target)["input_ids"]
    return full, len(tokenizer(prompt)["input_ids"])


@torch.no_grad()
def _argmax_at_target(bundle, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(predicted ids, target ids) at the target positions, from one forward pass over the joint ids."""
    full, n = _split(bundle.tokenizer, prompt, target)
    logits = bundle.model(input_ids=torch.tensor([full])).logits[0]
    return logits[n - 1 : -1].argmax(-1).tolist(), full[n:]


def _accuracy(bundle, prompt: str, target: str) -> float:
    predicted, labels = _argmax_at_target(bundle, prompt, target)
    return float(np.mean([p == t for p, t in zip(predicted, labels, strict=True)]))


@torch.no_grad()
def _greedy_words(bundle, prompt: str, steps: int = 3) -> str:
    """What the model itself continues ``prompt`` with (a target it gets at least partly right)."""
    ids = bundle.tokenizer(prompt)["input_ids"]
    for _ in range(steps):
        ids.append(int(bundle.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    text = bundle.tokenizer.decode(ids[-steps:], skip_special_tokens=True).strip()
    return text or "Paris"


def _cases(bundle) -> list[EditCase]:
    """Three KnowEdit-style cases; two portability keys of unequal probe counts in each of the first
    two, locality keys likewise; the third has no locality probe. Half the targets are the model's own
    continuations, so the accuracies differ and the nested mean differs from the pooled one."""
    own = lambda p: Probe(p, _greedy_words(bundle, p))  # noqa: E731

    def probe(p: Probe, kind: str) -> Probe:
        return Probe(p.prompt, p.target, kind=kind)

    req = EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    req2 = EditRequest("{} speaks", "Danielle Darrieux", "English", "French")
    req3 = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar")
    return [
        EditCase(
            case_id="0",
            request=req,
            rewrite=(Probe("The Eiffel Tower is located in the city of", "Rome"),),
            paraphrase=(Probe("The Eiffel Tower stands in", "Rome"),),
            portability=(
                probe(own("The capital of Italy is"), "Reasoning"),
                probe(Probe("Rome is the capital of", "Spain"), "Reasoning"),
                probe(own("The Eiffel Tower is in"), "Subject_Aliasing"),
            ),
            locality=(
                probe(Probe("The mother tongue of Michel Rocard is", "French"), "Relation_Specificity"),
                probe(Probe("Berlin is the capital of", "Germany"), "Relation_Specificity"),
                probe(Probe("Toko Yasuda plays the", "guitar"), "Forgetfulness"),
            ),
        ),
        EditCase(
            case_id="1",
            request=req2,
            rewrite=(Probe("Danielle Darrieux speaks", "English"),),
            paraphrase=(Probe("The language of Danielle Darrieux is", "English"),),
            portability=(
                probe(Probe("Danielle Darrieux plays", "jazz"), "Logical_Generalization"),
                probe(own("Danielle Darrieux speaks French and"), "Reasoning"),
                probe(Probe("What does Danielle Darrieux play?", "the piano"), "Reasoning"),
                probe(own("They play"), "Reasoning"),
            ),
            locality=(probe(Probe("Rome is the capital of", "Italy"), "Relation_Specificity"),),
        ),
        EditCase(
            case_id="2",
            request=req3,
            rewrite=(Probe("Toko Yasuda plays the", "piano"),),
            portability=(probe(own("Toko Yasuda plays the guitar and the"), "Subject_Aliasing"),),
        ),
    ]


def _nested(values: list[float], keys: list[str]) -> float:
    """Mean within each key, then over the keys: written out, not via the library."""
    per_key = {k: [v for v, kk in zip(values, keys, strict=True) if kk == k] for k in dict.fromkeys(keys)}
    return sum(sum(v) / len(v) for v in per_key.values()) / len(per_key)


def test_summary_is_easyedit_nested_mean_of_hand_computed_accuracies(bundle):
    cases = _cases(bundle)
    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    records = [evaluator.score(c, evaluator.reference(c)) for c in cases]

    for case, record in zip(cases, records, strict=True):
        hand = [_accuracy(bundle, p.prompt, p.target) for p in case.portability]
        assert record["knowedit"]["KE_PORT"] == pytest.approx(hand)
        assert record["knowedit_keys"]["KE_PORT"] == [p.kind for p in case.portability]
        edit = [_accuracy(bundle, p.prompt, case.request.target_new) for p in case.rewrite]
        assert record["knowedit"]["KE_EDIT"] == pytest.approx(edit)
        # the unedited model agrees with itself at every target position
        if case.locality:
            assert record["knowedit"]["KE_LOC"] == [1.0] * len(case.locality)
        else:
            assert "KE_LOC" not in record["knowedit"]

    summary = summarize(records)
    per_case = [
        _nested(
            [_accuracy(bundle, p.prompt, p.target) for p in c.portability], [p.kind for p in c.portability]
        )
        for c in cases
    ]
    pooled = np.mean([_accuracy(bundle, p.prompt, p.target) for c in cases for p in c.portability])
    assert summary["KE_PORT"]["mean"] == pytest.approx(100 * np.mean(per_case))
    assert summary["KE_PORT"]["ci95"] == pytest.approx(100 * 1.96 * np.std(per_case, ddof=1) / np.sqrt(3))
    assert summary["KE_PORT"]["n"] == 3 and summary["KE_PORT"]["protocol"] == "easyedit"
    # the constructed cases tell the protocols apart
    assert abs(summary["KE_PORT"]["mean"] - 100 * pooled) > 1e-3
    assert summary["KE_LOC"] == {"mean": 100.0, "ci95": 0.0, "n": 2, "protocol": "easyedit"}
    gen = [_accuracy(bundle, c.paraphrase[0].prompt, c.request.target_new) for c in cases if c.paraphrase]
    assert summary["KE_GEN"]["mean"] == pytest.approx(100 * np.mean(gen)) and summary["KE_GEN"]["n"] == 2


def test_locality_compares_with_the_unedited_models_argmax(bundle):
    case = _cases(bundle)[0]
    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    reference = evaluator.reference(case)
    before = [_argmax_at_target(bundle, p.prompt, p.target)[0] for p in case.locality]
    assert reference["locality_argmax"] == before

    weight = bundle.adapter.mlp_down_weight(bundle.model, 1)
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
        after = [_argmax_at_target(bundle, p.prompt, p.target)[0] for p in case.locality]
        record = evaluator.score(case, reference)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    pairs = zip(before, after, strict=True)
    hand = [float(np.mean([a == b for a, b in zip(x, y, strict=True)])) for x, y in pairs]
    assert min(hand) < 1.0  # the perturbation moved some argmax: the comparison is not trivially 1
    assert record["knowedit"]["KE_LOC"] == pytest.approx(hand)
    assert record["knowedit_keys"]["KE_LOC"] == ["Relation_Specificity"] * 2 + ["Forgetfulness"]
    summary = summarize([record])
    assert summary["KE_LOC"]["mean"] == pytest.approx(100 * _nested(hand, record["knowedit_keys"]["KE_LOC"]))


def test_joined_split_is_easyedits_count_based_one(bundle):
    tok = bundle.tokenizer
    # a prompt ending in a space: the joint tokenisation need not start with the prompt's ids
    for prompt, target in [("The capital of Italy is ", "Rome"), ("Rome is the capital of", "Italy.")]:
        full, n = _split(tok, prompt, target)
        assert joined_target(tok, prompt, target) == full[n:]
    pairs = [("The capital of Italy is ", "Rome"), ("The capital of Italy is ", "Rome")]
    joined, plain = score_targets(bundle.model, tok, bundle.adapter, pairs, joined=[True, False])
    full, n = _split(tok, *pairs[0])
    assert list(joined.target_ids) == full[n:]
    assert joined.token_accuracy == pytest.approx(_accuracy(bundle, *pairs[0]))
    assert plain.target_ids  # encode_target's own split, scored in the same call


def test_knowedit_case_value_nests_keys():
    # Reasoning [1, 0] and Subject_Aliasing [1]: (0.5 + 1) / 2, not the pooled 2 / 3
    assert knowedit_case_value([1.0, 0.0, 1.0], ["Reasoning", "Reasoning", "Subject_Aliasing"]) == 0.75
    assert knowedit_case_value([1.0, 0.0, 1.0]) == pytest.approx(2 / 3)  # no keys: one key
    assert knowedit_case_value([]) is None
    records = [
        {
            "comparisons": {},
            "knowedit": {"KE_PORT": [1.0, 0.0, 1.0]},
            "knowedit_keys": {"KE_PORT": ["a", "a", "b"]},
        },
        {"comparisons": {}, "knowedit": {"KE_PORT": [0.25]}},  # a record without keys
    ]
    assert summarize(records)["KE_PORT"]["mean"] == pytest.approx(100 * (0.75 + 0.25) / 2)


def test_ke_flu_is_seeded_and_present(bundle):
    cases = _cases(bundle)[:2]
    evaluator = Evaluator(bundle, EvalConfig(fluency=True, seed=7))
    first = [evaluator.evaluate(c, evaluator.reference(c)) for c in cases]
    again = [evaluator.evaluate(c, evaluator.reference(c)) for c in cases]
    for a, b, case in zip(first, again, cases, strict=True):
        assert len(a["knowedit_fluency"]) == len(case.rewrite)
        assert a["knowedit_generations"] == b["knowedit_generations"]
        assert a["knowedit_fluency"] == b["knowedit_fluency"]
        assert a["knowedit_generations"][0].startswith(case.rewrite[0].prompt)
    summary = summarize(first)
    expected = 100 * np.mean([np.mean(r["knowedit_fluency"]) for r in first])
    assert summary["KE_FLU"]["mean"] == pytest.approx(expected)
    assert summary["KE_FLU"]["n"] == 2 and summary["KE_FLU"]["protocol"] == "easyedit"
    assert summary["FL"]["n"] == 0  # no generation prompts: the SADR fluency is not computed
    # without fluency there is no KE_FLU
    plain = Evaluator(bundle, EvalConfig(fluency=False)).evaluate(cases[0], evaluator.reference(cases[0]))
    assert "knowedit_fluency" not in plain


def test_ke_flu_samples_of_a_case_do_not_depend_on_its_batch_mates(bundle):
    cases = _cases(bundle)[:3]

    def samples(sampling: str, groups: list[list[int]]) -> list[list[str]]:
        evaluator = Evaluator(bundle, EvalConfig(fluency=True, seed=7, knowedit_sampling=sampling))
        records: list[dict] = [{} for _ in cases]
        for group in groups:
            evaluator.add_knowedit_fluency([cases[i] for i in group], [records[i] for i in group])
        return [r["knowedit_generations"] for r in records]

    together, alone = [[0, 1, 2]], [[0], [1], [2]]
    assert samples("prompt", together) == samples("prompt", alone) == samples("prompt", [[2, 0], [1]])
    # one stream per decoding batch (runs before the setting): a case's samples change with its batch
    assert samples("batch", together) != samples("batch", alone)
    with pytest.raises(ValueError, match="knowedit-sampling"):
        EvalConfig(knowedit_sampling="case")


def test_generate_max_length_counts_the_prompt(bundle):
    tok = bundle.tokenizer
    prompts = ["The capital of Italy is", "Toko Yasuda plays the guitar and the piano. Rome"]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    total = max(lengths) + 2
    by_length = generate(bundle.model, tok, prompts, adapter=bundle.adapter, max_length=total)
    for prompt, n, text in zip(prompts, lengths, by_length, strict=True):
        alone = generate(bundle.model, tok, [prompt], max_new_tokens=total - n, adapter=bundle.adapter)
        assert text == alone[0]
    assert generate(bundle.model, tok, prompts, adapter=bundle.adapter, max_length=min(lengths)) == ["", ""]


def test_paired_knowedit_differences_average_over_cases_like_the_summary():
    """``paired_difference`` on a KnowEdit metric pairs the per-case values (mean per key, then per case)
    and its rates equal the summaries; the report adds the KnowEdit columns and pairs them."""
    from attnedit.evaluation.metrics import paired_difference, summarize
    from attnedit.runs.report import ReportRow, columns, paired

    def record(i: int, port: list[float], keys: list[str]) -> dict:
        return {
            "case_id": str(i),
            "comparisons": {},
            "knowedit": {"KE_EDIT": [1.0], "KE_PORT": port} if port else {"KE_EDIT": [1.0]},
            "knowedit_keys": {"KE_EDIT": [""], "KE_PORT": keys} if port else {"KE_EDIT": [""]},
        }

    base = [record(0, [1.0, 0.0, 0.0], ["A", "B", "B"]), record(1, [0.5], ["A"]), record(2, [], [])]
    other = [record(0, [1.0, 1.0, 1.0], ["A", "B", "B"]), record(1, [0.0], ["A"]), record(2, [], [])]
    out = paired_difference(base, other, ("KE_PORT", "KE_EDIT"), resamples=200)["KE_PORT"]
    # case 0: mean(1.0, mean(0, 0)) = 0.5; case 1: 0.5; case 2 has no portability probe
    assert out["base"] == pytest.approx(50.0) == pytest.approx(summarize(base)["KE_PORT"]["mean"])
    assert out["other"] == pytest.approx(summarize(other)["KE_PORT"]["mean"]) == pytest.approx(50.0)
    assert out["cases"] == 3 and out["prompts"] == 2
    rows = [ReportRow("a", [], {}, summarize(base), base), ReportRow("b", [], {}, summarize(other), other)]
    assert {"KE_EDIT", "KE_PORT"} <= set(columns(rows=rows))
    assert "KE_PORT" in paired(rows, "a")["b"]


def test_records_from_before_the_protocol_are_labelled_legacy():
    """A summary over records without the protocol mark (scored before the EasyEdit protocol) does not
    claim it."""
    from attnedit.evaluation.metrics import KNOWEDIT_LEGACY, KNOWEDIT_PROTOCOL, summarize

    new = {
        "knowedit_protocol": KNOWEDIT_PROTOCOL,
        "case_id": "0",
        "comparisons": {},
        "knowedit": {"KE_PORT": [1.0]},
        "knowedit_keys": {"KE_PORT": ["A"]},
    }
    old = {"case_id": "1", "comparisons": {}, "knowedit": {"KE_PORT": [0.0]}}
    assert summarize([new])["KE_PORT"]["protocol"] == KNOWEDIT_PROTOCOL
    assert summarize([new, old])["KE_PORT"]["protocol"] == KNOWEDIT_LEGACY
