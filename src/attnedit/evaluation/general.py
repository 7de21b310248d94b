"""General ability of a model, measured against the unedited one: what a stream's checkpoints watch.

- ``piqa``: PIQA accuracy on a fixed sample of questions. Each solution is scored by its summed
  log-likelihood after ``Question: GOAL\\nAnswer:`` (the usual zero-shot form); the higher one is the answer.
- ``ppl``: perplexity of a fixed sample of corpus paragraphs (WikiText-2 by default), each cut to its first
  ``corpus_words`` words.
- ``known``: the share of a fixed sample of ROME's known facts whose greedy answer (as many tokens as the
  fact's attribute) is still exactly the unedited model's answer.
- ``fluency``: the mean n-gram entropy (ROME's fluency) of greedy continuations of the first words of
  some of the corpus paragraphs.

Every sample is drawn once from the seed (``GeneralConfig.seed``), so each checkpoint of a stream, and a
resumed stream, measures the same items.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from attnedit.core.data import KnownFact, PiqaQuestion, load_known_facts, load_piqa, load_texts
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import generate, score_targets, text_nll
from attnedit.core.tokens import encode_target
from attnedit.evaluation.metrics import ngram_entropy

PIQA_PROMPT = "Question: {goal}\nAnswer:"
MIN_PARAGRAPH_WORDS = 30  # corpus lines shorter than this (headings, captions) are not sampled
FLUENCY_PREFIX_WORDS = 10


class GeneralConfig(BaseModel):
    """What a checkpoint measures of general ability, on which data, and how many items of each. A data
    field is a registered data set's name or a file path; None leaves that measure out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    piqa: str | None = Field("piqa", description="PIQA questions (name or path); None: no PIQA accuracy")
    known: str | None = Field(
        "rome-known", description="ROME's known facts (name or path); None: no retention of known facts"
    )
    corpus: str | None = Field(
        "wikitext2", description="paragraphs for perplexity and fluency (name or path); None: neither"
    )
    samples: int = Field(100, ge=1, description="PIQA questions and known facts sampled")
    corpus_samples: int = Field(16, ge=1, description="corpus paragraphs sampled for perplexity")
    corpus_words: int = Field(
        100, ge=MIN_PARAGRAPH_WORDS, description="each paragraph cut to its first words"
    )
    fluency_prompts: int = Field(
        4, ge=0, description="of those paragraphs, the first words of how many are continued for fluency"
    )
    fluency_tokens: int = Field(48, ge=1, description="tokens generated per fluency prompt")
    seed: int = Field(0, description="the samples' seed")


def _sample(n_items: int, count: int, seed: int) -> list[int]:
    """``count`` indices of ``n_items`` (all of them when fewer), a seeded draw kept in drawing order."""
    order = np.random.default_rng(seed).permutation(n_items)
    return [int(i) for i in order[:count]]


@dataclass
class GeneralReference:
    """The unedited model's measures, and the known facts' answers later measures compare with."""

    values: dict[str, float]
    known_answers: list[str]


class GeneralAbility:
    """The general-ability measures of one configuration on one model: ``reference()`` on the unedited
    model first, then ``measure()`` on any edited state of it."""

    def __init__(self, bundle: ModelBundle, config: GeneralConfig):
        self.bundle = bundle
        self.config = config
        c = config
        self.piqa: list[PiqaQuestion] = []
        self.known: list[KnownFact] = []
        self.paragraphs: list[str] = []
        if c.piqa is not None:
            questions = load_piqa(c.piqa)
            self.piqa = [questions[i] for i in _sample(len(questions), c.samples, c.seed)]
        if c.known is not None:
            facts = load_known_facts(c.known)
            self.known = [facts[i] for i in _sample(len(facts), c.samples, c.seed)]
        if c.corpus is not None:
            lines = [t for t in load_texts(c.corpus) if len(t.split()) >= MIN_PARAGRAPH_WORDS]
            if not lines:
                raise ValueError(
                    f"corpus {c.corpus!r}: no paragraph of {MIN_PARAGRAPH_WORDS} words or more to measure "
                    "perplexity on"
                )
            chosen = [lines[i] for i in _sample(len(lines), c.corpus_samples, c.seed)]
            self.paragraphs = [" ".join(p.split()[: c.corpus_words]) for p in chosen]
        tokenizer = bundle.tokenizer
        self._known_budgets = [len(encode_target(tokenizer, f.prompt, f.attribute)) for f in self.known]
        self._reference: GeneralReference | None = None

    def manifest(self) -> dict[str, Any]:
        """The configuration and the sizes actually sampled (a run's manifest records it)."""
        sizes = {"piqa": len(self.piqa), "known": len(self.known), "corpus": len(self.paragraphs)}
        return {**self.config.model_dump(), "sampled": sizes}

    # -- the measures -------------------------------------------------------------------------------------

    def piqa_accuracy(self) -> float | None:
        """Share (0-1) of the sampled PIQA questions answered right."""
        if not self.piqa:
            return None
        b = self.bundle
        pairs = [(PIQA_PROMPT.format(goal=q.goal), s) for q in self.piqa for s in q.solutions]
        scores = score_targets(b.model, b.tokenizer, b.adapter, pairs)
        right = 0
        for k, question in enumerate(self.piqa):
            first, second = (sum(s.logprobs) for s in scores[2 * k : 2 * k + 2])
            right += int((0 if first >= second else 1) == question.label)
        return right / len(self.piqa)

    def perplexity(self) -> float | None:
        """Perplexity (per token) of the sampled paragraphs."""
        if not self.paragraphs:
            return None
        b = self.bundle
        nll, counts = text_nll(b.model, b.tokenizer, b.adapter, self.paragraphs)
        mean = float(nll.sum() / counts.sum())
        if math.isnan(mean):
            return mean
        return math.exp(mean) if mean < math.log(sys.float_info.max) else float("inf")

    def known_answers(self) -> list[str]:
        """The greedy answer to each sampled known fact, as many tokens as its attribute."""
        if not self.known:
            return []
        b = self.bundle
        return generate(
            b.model,
            b.tokenizer,
            [f.prompt for f in self.known],
            max_new_tokens=self._known_budgets,
            batch_size=64,
            adapter=b.adapter,
        )

    def fluency(self) -> float | None:
        """Mean n-gram entropy of greedy continuations of the first words of some sampled paragraphs."""
        prompts = [
            " ".join(p.split()[:FLUENCY_PREFIX_WORDS]) for p in self.paragraphs[: self.config.fluency_prompts]
        ]
        if not prompts:
            return None
        b = self.bundle
        texts = generate(
            b.model,
            b.tokenizer,
            prompts,
            max_new_tokens=self.config.fluency_tokens,
            batch_size=len(prompts),
            adapter=b.adapter,
        )
        return float(np.mean([ngram_entropy(p + t) for p, t in zip(prompts, texts, strict=True)]))

    def _measure(self) -> tuple[dict[str, float], list[str]]:
        answers = self.known_answers()
        values = {"piqa": self.piqa_accuracy(), "ppl": self.perplexity(), "fluency": self.fluency()}
        return {k: v for k, v in values.items() if v is not None}, answers

    def reference(self) -> GeneralReference:
        """Measure the model as it is now (unedited) and keep its known-fact answers."""
        values, answers = self._measure()
        if self.known:
            values["known"] = 1.0
        self._reference = GeneralReference(values, answers)
        return self._reference

    def measure(self) -> dict[str, float]:
        """Measure the model as it is now against ``reference()``: ``piqa`` (accuracy, 0-1), ``ppl``,
        ``known`` (share of known facts answered as the unedited model answered them), ``fluency``."""
        if self._reference is None:
            raise RuntimeError("GeneralAbility.measure needs reference() on the unedited model first")
        values, answers = self._measure()
        if self.known:
            kept = [a == r for a, r in zip(answers, self._reference.known_answers, strict=True)]
            values["known"] = sum(kept) / len(kept)
        return values
