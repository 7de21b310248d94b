"""Evaluate one edit case on the current model state: one scoring call, the generation scores, optional
fluency and PPL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from attnedit.core.data import EditCase, Probe
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import SAMPLING, TargetScore, generate, score_targets, text_nll
from attnedit.core.tokens import encode_target
from attnedit.evaluation.metrics import (
    GENERATION_MARGIN,
    KNOWEDIT_FLUENCY_MAX_LENGTH,
    KNOWEDIT_FLUENCY_TOP_K,
    KNOWEDIT_PROTOCOL,
    Comparison,
    comparisons,
    generation_hit,
    generation_probes,
    knowedit_probes,
    ngram_entropy,
)
from attnedit.evaluation.records import CaseRecord, ComparisonNLLs, Perplexity, Reference

GENERATION_SCORE_BATCH = 64
"""Prompts decoded in one batch by ``Evaluator.score_many``'s generation scores."""


@dataclass
class EvalConfig:
    """What the suite computes besides the comparison metrics (always on)."""

    fluency: bool = True
    # "generation": the case's generation prompts; "rewrite": its rewrite and paraphrase prompts
    # (for data without generation prompts, e.g. the merged CounterFact file)
    fluency_prompts: str = "generation"
    max_new_tokens: int = 100
    generation_top_k: int | None = None  # None = greedy
    max_generation_prompts: int | None = None  # per case; None = all
    ppl_texts: list[str] = field(default_factory=list)
    max_batch_tokens: int = 2048
    seed: int = 0
    # KnowEdit's sampled fluency (KE_FLU): "prompt", a generator per prompt seeded from the seed and the
    # prompt (a case's samples are the same in any decoding batch); "batch", one stream per decoding batch
    # (runs made before this setting existed, whose manifests imply it: ``rundir.ADDED_LATER_PARTS``)
    knowedit_sampling: str = "prompt"
    # the generation scores GES/GPS (``Evaluator.generation_score``): greedy answers to the rewrite and
    # paraphrase prompts. Runs made before this setting have none; their manifests imply False
    # (``rundir.ADDED_LATER_PARTS``)
    generation_score: bool = True

    def __post_init__(self) -> None:
        if self.fluency_prompts not in ("generation", "rewrite"):
            raise ValueError(
                f"fluency prompts must be 'generation' or 'rewrite', not {self.fluency_prompts!r}"
            )
        if self.knowedit_sampling not in SAMPLING:
            raise ValueError(
                f"--knowedit-sampling must be one of {', '.join(SAMPLING)}, not {self.knowedit_sampling!r}"
            )

    def manifest(self) -> dict[str, Any]:
        data = asdict(self)
        data["ppl_texts"] = len(self.ppl_texts)
        return data


def _versions(case: EditCase) -> list[tuple[str, EditCase]]:
    """(key suffix, the case in that language) of every language a case is scored in: ``""`` for the case
    itself, ``"@fr"`` for its French translation."""
    return [("", case)] + [(f"@{lang}", case.translations[lang]) for lang in case.languages[1:]]


class Evaluator:
    """Computes the per-case record (``records.CaseRecord``) that ``results.jsonl`` stores.

    ``reference(case)`` runs on the unedited model (what KnowEdit locality compares against);
    ``evaluate(case, reference)`` on the edited one.
    """

    def __init__(self, bundle: ModelBundle, config: EvalConfig | None = None):
        self.bundle = bundle
        self.config = config or EvalConfig()
        self._ppl_cache: tuple[tuple[tuple[int, int], ...], Perplexity] | None = None

    def _score(self, pairs: list[tuple[str, str]], joined: list[bool] | None = None) -> list[TargetScore]:
        b = self.bundle
        return score_targets(
            b.model,
            b.tokenizer,
            b.adapter,
            pairs,
            max_batch_tokens=self.config.max_batch_tokens,
            joined=joined,
        )

    def reference(self, case: EditCase) -> Reference:
        """What KnowEdit locality compares against; call on the unedited model. Tokenised as ``score``
        tokenises the KnowEdit probes (EasyEdit's split, ``scoring.joined_target``)."""
        pairs = [(p.prompt, p.target) for p in knowedit_probes(case)["KE_LOC"]]
        scores = self._score(pairs, joined=[True] * len(pairs))
        return {"locality_argmax": [list(s.argmax_ids) for s in scores]}

    def evaluate(self, case: EditCase, reference: Reference | None = None) -> CaseRecord:
        """The whole record of one case on the current model (comparisons, fluency, PPL)."""
        record = self.score(case, reference)
        if self.config.fluency:
            self.add_fluency([case], [record])
        return record

    def score(self, case: EditCase, reference: Reference | None = None) -> CaseRecord:
        """The record without fluency: comparisons, KnowEdit probes, the generation scores (when on:
        ``generation_score``), PPL (``add_fluency`` adds FL).

        A case with translations (multilingual data) also gets every translation's comparisons and
        KnowEdit probes, under ``METRIC@LANG`` keys after the case's own, all scored in the same call.
        KnowEdit locality is the case's own only (``reference`` is taken for it alone). The KnowEdit
        probes' targets are split from the prompt as EasyEdit splits them (``scoring.joined_target``),
        the comparisons' as ever (``tokens.encode_target``).
        """
        return self.score_many([case], [reference])[0]

    def score_many(
        self, cases: Sequence[EditCase], references: Sequence[Reference | None] | None = None
    ) -> list[CaseRecord]:
        """``score`` of several cases, their prompts scored in one call and their generation scores decoded
        in one batch (several times faster than case by case for cases of few prompts; the numbers equal
        ``score``'s up to float rounding, since prompts share other padded batches). ``seconds_scoring``
        and ``seconds_generation_score`` are the call's time divided among the cases."""
        refs = list(references) if references is not None else [None] * len(cases)
        if len(refs) != len(cases):
            raise ValueError(f"{len(refs)} references for {len(cases)} cases")
        start = time.perf_counter()
        pairs: list[tuple[str, str]] = []
        joined: list[bool] = []
        plans = []
        for case in cases:
            plan = []
            for suffix, version in _versions(case):
                comps = comparisons(version)
                ke = knowedit_probes(version)
                if suffix:
                    ke.pop(
                        "KE_LOC"
                    )  # it compares with the unedited model's answers, taken for the case's own
                pairs += [(c.prompt, c.right) for c in comps] + [(c.prompt, c.wrong) for c in comps]
                ke_pairs = [(p.prompt, p.target) for name in ke for p in ke[name]]
                joined += [False] * (len(pairs) - len(joined)) + [True] * len(ke_pairs)
                pairs += ke_pairs
                plan.append((suffix, comps, ke))
            plans.append(plan)
        scores = iter(self._score(pairs, joined))
        records = [
            self._record(case, plan, scores, reference)
            for case, plan, reference in zip(cases, plans, refs, strict=True)
        ]
        seconds = (time.perf_counter() - start) / max(len(cases), 1)
        for record in records:
            record["seconds_scoring"] = seconds
        if self.config.generation_score:
            self.generation_scores(cases, records)
        if self.config.ppl_texts:
            for record in records:
                record["ppl"] = self._perplexity()
        return records

    def _record(
        self,
        case: EditCase,
        plan: list[tuple[str, list[Comparison], dict[str, list[Probe]]]],
        scores: Iterator[TargetScore],
        reference: Reference | None,
    ) -> CaseRecord:
        """One case's record from its plan (per language: comparisons, KnowEdit probes) and the scores of
        its pairs, taken from ``scores`` in the plan's order."""
        record: CaseRecord = {"case_id": case.case_id, "source": case.source, "comparisons": {}}
        knowedit: dict[str, list[float]] = {}
        knowedit_keys: dict[str, list[str]] = {}
        for suffix, comps, ke in plan:
            right = [next(scores) for _ in comps]
            wrong = [next(scores) for _ in comps]
            for c, r, w in zip(comps, right, wrong, strict=True):
                entry = record["comparisons"].setdefault(
                    c.metric + suffix, ComparisonNLLs(right_nll=[], wrong_nll=[])
                )
                entry["right_nll"].append(r.nll)
                entry["wrong_nll"].append(w.nll)
            for name, probes in ke.items():
                got = [next(scores) for _ in probes]
                if not got or (name == "KE_LOC" and reference is None):
                    continue
                if name == "KE_LOC":
                    assert reference is not None  # skipped above without one
                    # EasyEdit's locality: the share of target positions where the edited model's argmax
                    # is the unedited model's
                    values = [
                        sum(a == b for a, b in zip(s.argmax_ids, ref, strict=True)) / len(ref)
                        for s, ref in zip(got, reference["locality_argmax"], strict=True)
                    ]
                else:
                    values = [s.token_accuracy for s in got]
                knowedit[name + suffix] = values
                if any(p.kind for p in probes):
                    knowedit_keys[name + suffix] = [p.kind for p in probes]
        if knowedit:
            record["knowedit"] = knowedit
            record["knowedit_protocol"] = KNOWEDIT_PROTOCOL
        if knowedit_keys:
            record["knowedit_keys"] = knowedit_keys
        return record

    def generation_scores(self, cases: Sequence[EditCase], records: Sequence[CaseRecord]) -> None:
        """Add the generation scores to each case's record: the model's greedy continuation of every
        rewrite (``GES``) and paraphrase (``GPS``) prompt, of the case and of each translation (``GES@fr``),
        the cases' prompts decoded together (``GENERATION_SCORE_BATCH`` per batch, the time divided among
        the cases), each prompt decoding its target's token count plus ``GENERATION_MARGIN`` tokens; a
        prompt counts 1.0 when its continuation gives the target (``generation_hit``), else 0.0.
        """
        start = time.perf_counter()
        owners: list[int] = []
        keys: list[str] = []
        prompts: list[str] = []
        targets: list[str] = []
        for k, case in enumerate(cases):
            for suffix, version in _versions(case):
                for name, probes in generation_probes(version).items():
                    owners += [k] * len(probes)
                    keys += [name + suffix] * len(probes)
                    prompts += [p.prompt for p in probes]
                    targets += [p.target for p in probes]
        if not prompts:
            return
        tok = self.bundle.tokenizer
        budgets = [
            len(encode_target(tok, p, t)) + GENERATION_MARGIN for p, t in zip(prompts, targets, strict=True)
        ]
        texts = generate(
            self.bundle.model,
            tok,
            prompts,
            max_new_tokens=budgets,
            batch_size=min(len(prompts), GENERATION_SCORE_BATCH),
            adapter=self.bundle.adapter,
        )
        seconds = (time.perf_counter() - start) / len(set(owners))
        for k in sorted(set(owners)):
            scores: dict[str, list[float]] = {}
            answers: dict[str, list[str]] = {}
            for owner, key, text, target in zip(owners, keys, texts, targets, strict=True):
                if owner == k:
                    scores.setdefault(key, []).append(float(generation_hit(text, target)))
                    answers.setdefault(key, []).append(text)
            records[k]["generation_score"] = scores
            records[k]["generated_answers"] = answers
            records[k]["seconds_generation_score"] = seconds

    def fluency_prompts(self, case: EditCase) -> list[str]:
        sources = (
            case.generation
            if self.config.fluency_prompts == "generation"
            else tuple(p.prompt for p in case.rewrite + case.paraphrase)
        )
        return list(sources[: self.config.max_generation_prompts])

    def add_fluency(
        self,
        cases: Sequence[EditCase],
        records: Sequence[CaseRecord],
        deltas: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Generate from the fluency prompts of several cases in one batch and add FL to their records;
        for cases with KnowEdit probes, KnowEdit's fluency (KE_FLU) too (``add_knowedit_fluency``).

        ``deltas[k]``: the weight edit case ``k`` is generated with (``interventions.row_deltas``; the
        model itself unedited); ``None``: every case uses the model as it is. Decoding reads every
        weight once per step whatever the batch, so one batch for many cases is several times faster
        than one per case. ``seconds_generation`` is the batch's time divided among its cases.
        """
        self.add_knowedit_fluency(cases, records, deltas)
        texts, seconds = self._decode(
            cases,
            self.fluency_prompts,
            deltas,
            max_new_tokens=self.config.max_new_tokens,
            top_k=self.config.generation_top_k,
        )
        for record, full in zip(records, texts, strict=True):
            if not full:
                continue
            record["fluency"] = [ngram_entropy(t) for t in full]
            record["generations"] = full
            # the batch's time divided among all its cases; + KE_FLU's
            record["seconds_generation"] = record.get("seconds_generation", 0.0) + seconds / len(cases)

    def add_knowedit_fluency(
        self,
        cases: Sequence[EditCase],
        records: Sequence[CaseRecord],
        deltas: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """KnowEdit's fluency as EasyEdit computes it, for the cases with KnowEdit probes (portability or
        locality): from each rewrite prompt, top-k (5) sampling to 100 tokens including the prompt's,
        seeded (``EvalConfig.seed``, per prompt or per batch: ``EvalConfig.knowedit_sampling``); per text
        (prompt + continuation) ``ngram_entropy``. One decoding batch for all the cases (``deltas`` as in
        ``add_fluency``); its time is added to ``seconds_generation``. Other data keep their cost: KE_FLU
        decodes as much again as FL.
        """

        def prompts_of(case: EditCase) -> list[str]:
            return [p.prompt for p in case.rewrite] if case.portability or case.locality else []

        texts, seconds = self._decode(
            cases,
            prompts_of,
            deltas,
            top_k=KNOWEDIT_FLUENCY_TOP_K,
            max_length=KNOWEDIT_FLUENCY_MAX_LENGTH,
            sampling=self.config.knowedit_sampling,
        )
        owners = sum(1 for full in texts if full)
        for record, full in zip(records, texts, strict=True):
            if not full:
                continue
            record["knowedit_fluency"] = [ngram_entropy(t) for t in full]
            record["knowedit_generations"] = full
            record["seconds_generation"] = record.get("seconds_generation", 0.0) + seconds / owners

    def _decode(
        self,
        cases: Sequence[EditCase],
        prompts_of: Callable[[EditCase], list[str]],
        deltas: Sequence[Mapping[str, torch.Tensor]] | None,
        **settings: Any,
    ) -> tuple[list[list[str]], float]:
        """One decoding batch over ``prompts_of(case)`` of every case (case ``k`` with ``deltas[k]``):
        per case its texts (prompt + continuation), and the batch's seconds."""
        prompts: list[str] = []
        owner: list[int] = []
        for k, case in enumerate(cases):
            mine = prompts_of(case)
            prompts += mine
            owner += [k] * len(mine)
        if not prompts:
            return [[] for _ in cases], 0.0
        t0 = time.perf_counter()
        texts = generate(
            self.bundle.model,
            self.bundle.tokenizer,
            prompts,
            seed=self.config.seed,
            batch_size=len(prompts),
            adapter=self.bundle.adapter,
            row_edits=None if deltas is None else (deltas, owner),
            **settings,
        )
        seconds = time.perf_counter() - t0
        per_case: list[list[str]] = [[] for _ in cases]
        for prompt, text, k in zip(prompts, texts, owner, strict=True):
            per_case[k].append(prompt + text)
        return per_case, seconds

    def _perplexity(self) -> Perplexity:
        """Corpus NLL, recomputed only when a weight changed in place since the last call.

        ``Tensor._version`` increments on every in-place write (an edit, a revert) and a swapped
        storage changes ``data_ptr``, so an unedited
        model is scored once per run and an edited one every time.
        """
        state = tuple((p.data_ptr(), p._version) for p in self.bundle.model.parameters())
        if self._ppl_cache is None or self._ppl_cache[0] != state:
            b = self.bundle
            nll, counts = text_nll(b.model, b.tokenizer, b.adapter, self.config.ppl_texts)
            self._ppl_cache = (state, {"nll": float(nll.sum()), "tokens": int(counts.sum())})
        return self._ppl_cache[1].copy()
