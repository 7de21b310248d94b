"""The evaluation suite: which prompts each metric compares, pooled summaries of per-case records
(``records.CaseRecord``), paired differences of two runs.

Definitions follow the SADR paper (section 2.1, appendix E) (the user page: docs/metrics.md):
every score is the share of PROMPTS, pooled over all cases, whose right answer has the lower mean
NLL; every magnitude is the mean probability of the right answer; 95% CIs are normal intervals with
the standard error of the mean. Tables print percentages.

The KnowEdit metrics (``KE_*``) follow EasyEdit instead (``KNOWEDIT_PROTOCOL``): per-probe token
accuracy, averaged within each probe key, then within the case, then across cases (CI over cases).

The generation scores (``GES``, ``GPS``) judge the model's own greedy answer instead of a teacher-forced
comparison: a prompt counts when its continuation starts with the new object (``generation_hit``); per
case the share of its prompts, then the mean over cases (CI over cases).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from attnedit.core.data import EditCase, Probe
from attnedit.evaluation.records import CaseRecord, ComparisonNLLs, MetricEntry, PairedDifference, Summary


@dataclass(frozen=True)
class Comparison:
    """One prompt of one metric: the right and the wrong continuation."""

    metric: str  # score name (ES, PS, ...); the record key
    prompt: str
    right: str
    wrong: str


@dataclass(frozen=True)
class MetricSpec:
    score: str
    magnitude: str | None  # mean P(right)
    failure: str | None  # mean P(wrong) = P(o_new) on specificity prompts
    title: str


# record key -> names it produces in the summary (order = report order)
COMPARISON_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("ES", "EM", None, "Efficacy (rewrite prompt): o_new vs o_true"),
    MetricSpec("PS", "PM", None, "Paraphrase: o_new vs o_true"),
    MetricSpec("NS", "NM", "NM_onew", "Neighbourhood: o_true vs o_new"),
    MetricSpec("RS", "RM", "RM_onew", "Relation (same subject, other relation): target vs o_new"),
    MetricSpec("DNS", "DNM", "DNM_onew", "Distracted neighbourhood (edit sentence prepended)"),
    MetricSpec("DRS", "DRM", "DRM_onew", "Distracted relation (edit sentence prepended)"),
    MetricSpec("RES", "RESM", None, "Reasoning: its target vs o_true"),
    MetricSpec("ALIAS", "ALIASM", None, "Subject alias: its target vs o_true"),
    MetricSpec("OS", "OM", None, "Commonsense (PIQA-style goal): right vs wrong solution"),
    MetricSpec("DOS", "DOM", None, "Distracted commonsense (edit sentence prepended)"),
)
AVG_S_COMPONENTS = ("ES", "PS", "NS", "RS", "DNS")
# KnowEdit metrics: per-probe teacher-forced token accuracy, averaged as EasyEdit does
KNOWEDIT_METRICS = ("KE_EDIT", "KE_GEN", "KE_PORT", "KE_LOC")
# generation scores: record key (``CaseRecord["generation_score"]``) -> its prompts (rewrite, paraphrase)
GENERATION_METRICS = ("GES", "GPS")
# tokens generated beyond the target's own count (``Evaluator``): room for another split of its text
GENERATION_MARGIN = 2
# KnowEdit fluency: n-gram entropy of top-k sampled text from the rewrite prompts (``Evaluator.add_fluency``)
KNOWEDIT_FLUENCY = "KE_FLU"
# ... generated as EasyEdit does: top-k sampling to this many tokens, the prompt's included
KNOWEDIT_FLUENCY_TOP_K = 5
KNOWEDIT_FLUENCY_MAX_LENGTH = 100
# what the KE_ summary entries record as their "protocol": EasyEdit's tokenisation, averaging and fluency
KNOWEDIT_PROTOCOL = "easyedit"
# KE_ entries over records scored before the EasyEdit protocol (not comparable with it)
KNOWEDIT_LEGACY = "legacy: scored before the easyedit protocol"


def distracted(case: EditCase, prompt: str) -> str:
    """``"{edit sentence} {prompt}"``: the prompt with the edited fact in the context."""
    return f"{case.request.edit_sentence} {prompt}"


def comparisons(case: EditCase) -> list[Comparison]:
    """Every (prompt, right, wrong) the comparison metrics score for one case."""
    new, true = case.request.target_new, case.request.target_true
    out = [Comparison("ES", p.prompt, new, true) for p in case.rewrite]
    out += [Comparison("PS", p.prompt, new, true) for p in case.paraphrase]
    out += [Comparison("NS", p.prompt, p.target, new) for p in case.neighborhood]
    out += [Comparison("RS", p.prompt, p.target, new) for p in case.relation]
    out += [Comparison("DNS", distracted(case, p.prompt), p.target, new) for p in case.neighborhood]
    out += [Comparison("DRS", distracted(case, p.prompt), p.target, new) for p in case.relation]
    out += [Comparison("RES", p.prompt, p.target, true) for p in case.reasoning]
    out += [Comparison("ALIAS", p.prompt, p.target, true) for p in case.subject_alias]
    out += [Comparison("OS", c.goal, c.right, c.wrong) for c in case.commonsense]
    out += [Comparison("DOS", distracted(case, c.goal), c.right, c.wrong) for c in case.commonsense]
    return out


def knowedit_probes(case: EditCase) -> dict[str, list[Probe]]:
    """The probes of the KnowEdit token-accuracy metrics: prompt, target (the first answer) and key
    (``Probe.kind``: KnowEdit's portability / locality key, "" elsewhere)."""
    new = case.request.target_new
    return {
        "KE_EDIT": [Probe(p.prompt, new) for p in case.rewrite],
        "KE_GEN": [Probe(p.prompt, new) for p in case.paraphrase],
        "KE_PORT": list(case.portability),
        "KE_LOC": list(case.locality),
    }


def generation_probes(case: EditCase) -> dict[str, list[Probe]]:
    """The prompts of the generation scores and the target their greedy continuation must start with:
    ``GES`` the rewrite prompts, ``GPS`` the paraphrases, both o_new."""
    new = case.request.target_new
    return {
        "GES": [Probe(p.prompt, new) for p in case.rewrite],
        "GPS": [Probe(p.prompt, new) for p in case.paraphrase],
    }


def generation_hit(continuation: str, target: str) -> bool:
    """Whether a generated ``continuation`` gives ``target``: the continuation without its leading
    whitespace starts with the target's text (its own surrounding whitespace stripped). Exact
    characters, no case folding, punctuation and what follows the target ignored (docs/metrics.md)."""
    return continuation.lstrip().startswith(target.strip())


def knowedit_case_value(values: Sequence[float], keys: Sequence[str] | None = None) -> float | None:
    """One case's KnowEdit metric as EasyEdit averages it: the mean of each probe key's mean (``keys[i]``:
    the key of ``values[i]``; None = one key). None for a case without probes."""
    if keys is None:
        keys = [""] * len(values)
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} probe keys for {len(values)} values")
    by_key: dict[str, list[float]] = {}
    for key, value in zip(keys, values, strict=True):
        by_key.setdefault(key, []).append(value)
    if not by_key:
        return None
    return float(np.mean([np.mean(v) for v in by_key.values()]))


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency: weighted mean of the n-gram entropies (bits) of one text's word tokens."""
    words = _WORD.findall(text.lower())
    entropies = []
    for n, weight in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if total == 0:
            entropies.append(0.0)
            continue
        freqs = np.array(list(grams.values()), dtype=np.float64) / total
        entropies.append(weight * float(-(freqs * np.log2(freqs)).sum()))
    return float(np.mean(entropies))


def mean_ci(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """Mean, 95% normal half-width (1.96 standard errors), count."""
    arr = np.asarray(list(values), dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return None, None, 0
    half = 1.96 * float(arr.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return float(arr.mean()), half, n


def _entry(mean: float | None, ci: float | None, n: int, scale: float = 1.0) -> MetricEntry:
    return {
        "mean": None if mean is None else mean * scale,
        "ci95": None if ci is None else ci * scale,
        "n": n,
    }


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def record_languages(records: Sequence[CaseRecord]) -> list[str]:
    """The languages of the ``KEY@LANG`` entries of ``records`` (multilingual data: translations'
    comparisons and KnowEdit probes), in order of first appearance; [] for monolingual records."""
    found: dict[str, None] = {}
    for r in records:
        for key in (*r["comparisons"], *r.get("knowedit", {}), *r.get("generation_score", {})):
            if "@" in key:
                found.setdefault(key.partition("@")[2], None)
    return list(found)


def summarize(records: Sequence[CaseRecord], bootstrap: int = 1000, seed: int = 0) -> Summary:
    """Pool per-case records into ``{name: {"mean", "ci95", "n"}}`` (percent for scores/magnitudes).

    Multilingual records add, after the usual entries (the edit language's), the same comparison,
    Avg S, KnowEdit and generation entries per translation language: ``ES@fr``, ``EM@fr``, ...,
    ``KE_PORT@fr``, ``GES@fr``.
    """
    summary = _language_summary(records, "", bootstrap, seed)
    fl = [v for r in records for v in r.get("fluency", [])]
    summary["FL"] = _entry(*mean_ci(fl), scale=100)
    ppl = [math.exp(r["ppl"]["nll"] / r["ppl"]["tokens"]) for r in records if r.get("ppl")]
    summary["PPL"] = _entry(*mean_ci(ppl))
    for name in KNOWEDIT_METRICS:
        summary[name] = _knowedit_entry(records, name)
    ke_flu = [float(np.mean(r["knowedit_fluency"])) for r in records if r.get("knowedit_fluency")]
    summary[KNOWEDIT_FLUENCY] = {**_entry(*mean_ci(ke_flu), scale=100), "protocol": KNOWEDIT_PROTOCOL}
    for name in GENERATION_METRICS:
        summary[name] = _generation_entry(records, name)
    for lang in record_languages(records):
        summary |= _language_summary(records, f"@{lang}", bootstrap, seed)
        for name in (*KNOWEDIT_METRICS, *GENERATION_METRICS):
            entry = _generation_entry if name in GENERATION_METRICS else _knowedit_entry
            summary[f"{name}@{lang}"] = entry(records, f"{name}@{lang}")
    return summary


def _generation_entry(records: Sequence[CaseRecord], key: str) -> MetricEntry:
    """A generation score (percent): per case the share of its prompts whose greedy continuation gives
    the target, then the mean over the cases that have such prompts; the CI and ``n`` are over those
    cases. Records without generation scores (the score off, or runs made before it) add nothing."""
    per_case = [float(np.mean(v)) for r in records if (v := r.get("generation_score", {}).get(key))]
    return _entry(*mean_ci(per_case), scale=100)


def _knowedit_entry(records: Sequence[CaseRecord], key: str) -> MetricEntry:
    """One KnowEdit metric (percent) as EasyEdit averages it: per case ``knowedit_case_value``, then the
    mean over the cases that have probes of it; the CI and ``n`` are over those cases."""
    per_case = []
    legacy = False
    for r in records:
        values = r.get("knowedit", {}).get(key, [])
        if values:
            value = knowedit_case_value(values, r.get("knowedit_keys", {}).get(key))
            assert value is not None  # the case has probes of it
            per_case.append(value)
            # records scored before the EasyEdit protocol (another split of prompt and target, no probe
            # keys) carry no protocol mark: their entry says so instead of claiming the protocol
            legacy |= r.get("knowedit_protocol") != KNOWEDIT_PROTOCOL
    protocol = KNOWEDIT_LEGACY if legacy else KNOWEDIT_PROTOCOL
    return {**_entry(*mean_ci(per_case), scale=100), "protocol": protocol}


def _comparison(record: CaseRecord, key: str) -> ComparisonNLLs:
    """The record's NLLs of comparison metric ``key`` (no prompts when it has none)."""
    return record["comparisons"].get(key, ComparisonNLLs(right_nll=[], wrong_nll=[]))


def _language_summary(records: Sequence[CaseRecord], suffix: str, bootstrap: int, seed: int) -> Summary:
    """The comparison metrics (scores, magnitudes, failures) and Avg S of one language: record keys
    ``SCORE + suffix`` (``""``: the edit language's), summary names likewise suffixed."""
    summary: Summary = {}
    per_case_counts: dict[str, np.ndarray] = {}
    for spec in COMPARISON_METRICS:
        key = spec.score + suffix
        right = [np.asarray(_comparison(r, key).get("right_nll", [])) for r in records]
        wrong = [np.asarray(_comparison(r, key).get("wrong_nll", [])) for r in records]
        all_right = np.concatenate(right) if right else np.array([])
        all_wrong = np.concatenate(wrong) if wrong else np.array([])
        summary[key] = _entry(*mean_ci((all_right < all_wrong).astype(float)), scale=100)
        if spec.magnitude:
            summary[spec.magnitude + suffix] = _entry(*mean_ci(np.exp(-all_right)), scale=100)
        if spec.failure:
            summary[spec.failure + suffix] = _entry(*mean_ci(np.exp(-all_wrong)), scale=100)
        per_case_counts[spec.score] = _counts(right, wrong)  # for the Avg S bootstrap

    parts = [summary[m + suffix]["mean"] for m in AVG_S_COMPONENTS]
    means = [p for p in parts if p is not None]
    if len(means) < len(parts):
        summary["AvgS" + suffix] = _entry(None, None, 0)
    else:
        summary["AvgS" + suffix] = {
            "mean": harmonic_mean(means),
            "ci95": _bootstrap_avg_s(per_case_counts, bootstrap, seed),
            "n": len(records),
        }
    return summary


def _counts(right: list[np.ndarray], wrong: list[np.ndarray]) -> np.ndarray:
    """Per case: (prompts where the right answer wins, prompts) -> ``[cases, 2]``."""
    return np.array([[(a < b).sum(), a.size] for a, b in zip(right, wrong, strict=True)]).reshape(-1, 2)


def _resampled_rates(counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pooled rate (percent) of per-case ``counts`` ``[cases, 2]`` in each resample of case indices
    ``idx`` ``[resamples, cases]``; NaN for a resample without prompts."""
    hits, total = counts[idx, 0].sum(axis=1), counts[idx, 1].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 100.0 * hits / total, np.nan)


def case_counts(records: Sequence[CaseRecord], score: str) -> np.ndarray:
    """Per case, ``[cases, 2]``: (hits, prompts) of a comparison score; (summed probability, prompts) of
    a magnitude (``EM``: P(right)) or a failure probability (``NM_onew``: P(wrong)); (the case's value, 1)
    of a KnowEdit metric (``KE_EDIT``...) or a generation score (``GES``, ``GPS``: the share of the case's
    prompts answered; (0, 0) for a case without its probes). ``KEY@LANG`` names read the translation's
    entries. Pooled over cases, column 0 over column 1 is the summary's value."""
    name, at, lang = score.partition("@")
    if name in GENERATION_METRICS:  # averaged over cases, as the summary does
        hits = [r.get("generation_score", {}).get(score, []) for r in records]
        return np.array([[float(np.mean(v)), 1.0] if v else [0.0, 0.0] for v in hits]).reshape(-1, 2)
    if name in KNOWEDIT_METRICS:
        # a KnowEdit metric is averaged over cases (EasyEdit): one unit per case that has its probes
        values = [r.get("knowedit", {}).get(score, []) for r in records]
        keys = [r.get("knowedit_keys", {}).get(score) for r in records]
        rows = [
            [knowedit_case_value(v, k), 1.0] if v else [0.0, 0.0] for v, k in zip(values, keys, strict=True)
        ]
        return np.array(rows, dtype=float).reshape(-1, 2)
    for spec in COMPARISON_METRICS:
        if name in (spec.score, spec.magnitude, spec.failure):
            break
    else:
        raise KeyError(f"unknown metric {score!r}")
    sides = [_comparison(r, spec.score + at + lang) for r in records]
    right = [np.asarray(c.get("right_nll", [])) for c in sides]
    wrong = [np.asarray(c.get("wrong_nll", [])) for c in sides]
    if name == spec.score:
        return _counts(right, wrong)
    side = right if name == spec.magnitude else wrong
    return np.array([[np.exp(-a).sum(), a.size] for a in side], dtype=float).reshape(-1, 2)


PAIRED_SCORES = ("ES", "PS", "NS", "RS", "DNS")
PAIRED_MAGNITUDES = ("EM", "PM", "NM", "RM", "DNM")


def paired_difference(
    base: Sequence[CaseRecord],
    other: Sequence[CaseRecord],
    scores: Sequence[str] = PAIRED_SCORES,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, PairedDifference]:
    """``other`` minus ``base`` on the cases both runs hold (matched by ``case_id``), per score (or
    magnitude, ``case_counts``): the pooled rates (percent), their difference in points and relative to
    ``base`` (percent), each with a 95% percentile interval from resampling cases, the same resample for
    both runs."""
    by_id = {r["case_id"]: r for r in other}
    shared = [r for r in base if r["case_id"] in by_id]
    if not shared:
        raise ValueError("the two runs share no case")
    paired = [by_id[r["case_id"]] for r in shared]
    idx = np.random.default_rng(seed).integers(0, len(shared), size=(resamples, len(shared)))
    out: dict[str, PairedDifference] = {}
    for score in scores:
        a, b = case_counts(shared, score), case_counts(paired, score)
        if not np.array_equal(a[:, 1], b[:, 1]):
            raise ValueError(f"{score}: the two runs scored different prompts for the same cases")
        total = a[:, 1]
        if total.sum() == 0:
            continue
        rate_a, rate_b = 100.0 * a[:, 0].sum() / total.sum(), 100.0 * b[:, 0].sum() / total.sum()
        boot_a, boot_b = _resampled_rates(a, idx), _resampled_rates(b, idx)
        keep = ~np.isnan(boot_a)  # a resample without prompts of this score has no rate
        boot_a, boot_b = boot_a[keep], boot_b[keep]
        diff = boot_b - boot_a
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(boot_a > 0, 100.0 * diff / boot_a, np.nan)
        finite = relative[np.isfinite(relative)]
        out[score] = {
            "base": rate_a,
            "other": rate_b,
            "diff": rate_b - rate_a,
            "diff_ci": [float(x) for x in np.percentile(diff, [2.5, 97.5])],
            "relative": 100.0 * (rate_b - rate_a) / rate_a if rate_a > 0 else None,
            "relative_ci": [float(x) for x in np.percentile(finite, [2.5, 97.5])] if finite.size else None,
            "cases": len(shared),
            "prompts": int(total.sum()),
        }
    return out


def _bootstrap_avg_s(counts: dict[str, np.ndarray], resamples: int, seed: int) -> float | None:
    """Half-width of the 95% percentile interval of Avg S, resampling cases."""
    n_cases = len(next(iter(counts.values())))
    if n_cases < 2 or resamples <= 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_cases, size=(resamples, n_cases))
    rates = np.stack([_resampled_rates(counts[m], idx) for m in AVG_S_COMPONENTS], axis=1)
    # a resample without prompts for a component has no Avg S; it is left out
    stats = [harmonic_mean(list(parts)) for parts in rates[~np.isnan(rates).any(axis=1)]]
    if not stats:
        return None
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(hi - lo) / 2
