"""MEMAT (Tamayo et al. 2025): MEMIT, then corrections of the attention heads that best tell the new
object from the old one, folded into the attention output projections' biases.

1. MEMIT in the edit language (the MEMIT preset), added to the edit.
2. On the edited model, in the head language: per-head features (``heads.head_features``) of
   "prompt + o_new" (label 1) and "prompt + o_true" (label 0); one classifier per head
   (``heads.rank_heads``); the ``heads`` best by validation accuracy are chosen. Which records train the
   classifiers is ``classifier_records``: those whose edit already succeeds in the head language (the
   official code) or all; every record is corrected and evaluated either way.
3. One correction per chosen head, shared by the batch (``heads.train_corrections``), trained as
   deployed, then folded into the output projections' biases (``heads.fold_corrections``; created where
   the family has none).

The result is one ``WeightEdit`` (MLP deltas + biases): revert, save/load, sequential mode and batched
fluency work as for every method. A bias acts on every input, so one correction per edit is only
deployable for a batch of one: that is single mode (``--mode single``), where the shared correction is
the edit's own. With ``+sadr`` the SADR term joins both optimisations (MEMIT's target and the corrections).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from attnedit.core.data import EditCase, EditRequest
from attnedit.core.deltas import AppliedEdit, EditBuilder
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import score_targets
from attnedit.core.tokens import SubjectNotFoundError
from attnedit.editing.base import EditRequestError, cases_language, edit_metadata, method_templates
from attnedit.editing.heads import (
    CorrectionRequest,
    CorrectionSettings,
    HeadRanking,
    fold_corrections,
    head_features,
    rank_heads,
    sentence_ids,
    train_corrections,
)
from attnedit.editing.losses import LossTerm
from attnedit.editing.methods.memit import Memit, MemitParams
from attnedit.editing.presets import Text
from attnedit.editing.spec import MethodSpec, register
from attnedit.editing.templates import language

logger = logging.getLogger(__name__)


def head_case(case: EditCase, head_language: str) -> EditCase:
    """The case in the head language (``"edit"``: the case itself)."""
    return case if head_language == "edit" else case.in_language(head_language)


def prompt_text(case: EditCase) -> str:
    """The case's edit prompt as text (its first rewrite prompt where the subject is not in the prompt)."""
    try:
        return case.request.text
    except (SubjectNotFoundError, ValueError):
        if not case.rewrite:
            raise
        return case.rewrite[0].prompt


class MematParams(MemitParams):
    """MEMIT's parameters (step 1, from the MEMIT preset) plus the attention-head steps (MEMAT's official
    defaults; ``correction_min_steps`` is ours: one epoch of a small batch is only a few steps)."""

    heads: int = Field(16, ge=1, description="K: the heads of best classifier accuracy get a correction")
    head_language: Text = Field(
        "edit", description="the language of the classifiers and corrections; 'edit': the edit's own"
    )
    classifier_records: Literal["succeeded", "all"] = Field(
        "succeeded", description="records whose edit already succeeds in the head language, or all"
    )
    classifier_split: float = Field(
        0.7, gt=0, lt=1, description="share of the records that train the classifiers (the rest validate)"
    )
    classifier_seed: int = Field(123, description="seed of the classifiers' train/validation split")
    correction_lr: float = Field(0.2, gt=0, description="learning rate of the head corrections")
    correction_batch: int = Field(32, ge=1, description="requests per minibatch (one Adam step each)")
    correction_epochs: int = Field(1, ge=1, description="epochs over the batch's requests")
    correction_min_steps: int = Field(
        10, ge=1, description="at least this many steps (ours, chosen on merged CounterFact dev cases 0-99)"
    )
    correction_kl_factor: float = Field(0.0625, ge=0, description="weight of the corrections' KL term")
    correction_weight_decay: float = Field(
        0.001, ge=0, description="weight decay, relative to each head's norm"
    )
    correction_clamp: float = Field(
        0.75, gt=0, description="norm clamp, times each head's mean activation norm"
    )
    bias_fold: Literal["sum", "overwrite"] = Field(
        "sum", description="heads of one layer add up; overwrite: the official code's last-head-wins bias"
    )


@dataclass
class HeadChoice:
    """Step 2's result: the ranking of every head, the features it was fitted on, which records trained
    the classifiers (``classifier_records`` as applied) and whether each edit succeeded in the head
    language; ``prompts`` are the head-language prompts the features were read on (step 3 trains on
    the same)."""

    ranking: HeadRanking
    features: torch.Tensor
    used: str
    succeeded: list[bool]
    prompts: list[str]


@dataclass
class Memat(Memit):
    """MEMAT: MEMIT plus attention-head corrections (module docstring)."""

    params: MematParams
    terms: list[LossTerm] = field(default_factory=list)
    name: str = "memat"
    preset: str = ""

    def apply(self, bundle: ModelBundle, cases: list[EditCase]) -> AppliedEdit:
        """Edit the model in place for all cases together; the returned edit reverts it exactly."""
        n_heads = bundle.adapter.n_layers * bundle.adapter.n_heads
        if self.params.heads > n_heads:
            raise EditRequestError(
                f"memat: heads={self.params.heads}, but the model has {n_heads} attention heads"
            )
        seconds: dict[str, float] = {}
        with EditBuilder(bundle.model) as builder:
            t0 = time.perf_counter()
            requests, info = self.edit_mlp(builder, bundle, cases)
            seconds["memit"] = time.perf_counter() - t0
            targets = self.head_targets(cases)
            choice = self.classify(bundle, targets, seconds)
            memat = self.correct(bundle, targets, choice, self.params.heads, builder, seconds)
        info = {**info, "memat": {**memat, "seconds": seconds}}
        return builder.finish(edit_metadata(self, bundle, requests, info))

    def prepare(self, bundle: ModelBundle, cases: list[EditCase]) -> None:
        """MEMIT's one-time work, and the context templates of the head language (the corrections')."""
        super().prepare(bundle, cases)
        method_templates(bundle, self.params, cases_language(self.head_targets(cases)))

    def head_targets(self, cases: list[EditCase]) -> list[EditCase]:
        """The cases in the head language (all in one language)."""
        targets = [head_case(case, self.params.head_language) for case in cases]
        cases_language(targets)
        return targets

    def classify(self, bundle: ModelBundle, targets: list[EditCase], seconds: dict[str, float]) -> HeadChoice:
        """Step 2 on the MEMIT-edited model: features of "prompt + o_new" / "prompt + o_true" in the head
        language, one classifier per head, heads ranked (``seconds``: activations, classifiers)."""
        p = self.params
        t0 = time.perf_counter()
        prompts = [prompt_text(case) for case in targets]
        requests = [case.request for case in targets]
        succeeded = self._succeeded(bundle, prompts, requests)
        chosen_records = list(range(len(targets)))
        used: str = p.classifier_records
        if p.classifier_records == "succeeded":
            chosen_records = [i for i, ok in enumerate(succeeded) if ok]
            if not chosen_records:
                used = "all (no record's edit succeeds in the head language)"
                chosen_records = list(range(len(targets)))
                logger.warning(
                    "memat: no edit of the batch succeeds in the head language yet; all %d records train "
                    "the classifiers",
                    len(targets),
                )
        sentences, labels, records = [], [], []
        for i in chosen_records:
            for target, label in ((requests[i].target_new, 1), (requests[i].target_true, 0)):
                sentences.append(sentence_ids(bundle, prompts[i], target))
                labels.append(label)
                records.append(i)
        features = head_features(bundle, sentences)
        seconds["activations"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ranking = rank_heads(
            features, np.array(labels), np.array(records), p.classifier_split, p.classifier_seed
        )
        seconds["classifiers"] = time.perf_counter() - t0
        return HeadChoice(ranking, features, used, succeeded, prompts)

    def correct(
        self,
        bundle: ModelBundle,
        targets: list[EditCase],
        choice: HeadChoice,
        k: int,
        builder: EditBuilder,
        seconds: dict[str, float],
    ) -> dict[str, Any]:
        """Step 3: train corrections of the ``k`` best heads and fold them into ``builder``; the record
        kept with the edit (``seconds``: corrections)."""
        p = self.params
        t0 = time.perf_counter()
        head_lang = cases_language(targets)
        prompts = choice.prompts
        heads = choice.ranking.top(k)
        features = choice.features
        reference_norm = torch.stack([features[:, layer, head].norm(dim=-1).mean() for layer, head in heads])
        kl_prompt = language(head_lang).kl_prompt
        correction_requests = [
            CorrectionRequest(prompt, case.request.target_new, case.request.subject, kl_prompt)
            for prompt, case in zip(prompts, targets, strict=True)
        ]
        settings = CorrectionSettings(
            lr=p.correction_lr,
            batch_requests=p.correction_batch,
            epochs=p.correction_epochs,
            min_steps=p.correction_min_steps,
            kl_factor=p.correction_kl_factor,
            weight_decay=p.correction_weight_decay,
            clamp_norm_factor=p.correction_clamp,
            seed=p.classifier_seed,
        )
        templates = method_templates(bundle, p, head_lang)
        result = train_corrections(
            bundle, correction_requests, templates, heads, reference_norm, settings, self.terms
        )
        for layer, change in fold_corrections(bundle, heads, result.delta, p.bias_fold).items():
            builder.add(f"{bundle.adapter.module_name('attn_o', layer)}.bias", change)
        seconds["corrections"] = time.perf_counter() - t0
        ranking = choice.ranking
        return {
            "head_language": head_lang,
            "heads": [[layer, head] for layer, head in heads],
            "head_val_accuracy": ranking.val_accuracy.round(4).tolist(),
            "head_train_accuracy": ranking.train_accuracy.round(4).tolist(),
            "classifier_records": choice.used,
            "records_succeeded": int(sum(choice.succeeded)),
            "classifier_train_records": ranking.n_train,
            "classifier_val_records": ranking.n_val,
            "validated_on": ranking.validated_on,
            "correction_steps": result.steps,
            "correction_final_loss": result.final_loss,
            "correction_loss_parts": result.loss_parts,
            # each correction's norm relative to its head's mean activation norm (the clamp's scale)
            "correction_norms": (result.delta.norm(dim=-1) / result.reference_norm)
            .round(decimals=4)
            .tolist(),
        }

    def _succeeded(self, bundle: ModelBundle, prompts: list[str], requests: list[EditRequest]) -> list[bool]:
        """Whether each edit already makes o_new more likely than o_true on its head-language prompt."""
        pairs = [(prompt, req.target_new) for prompt, req in zip(prompts, requests, strict=True)]
        pairs += [(prompt, req.target_true) for prompt, req in zip(prompts, requests, strict=True)]
        scores = score_targets(bundle.model, bundle.tokenizer, bundle.adapter, pairs)
        n = len(requests)
        return [scores[i].nll < scores[n + i].nll for i in range(n)]


SPEC = register(
    MethodSpec(
        name="memat",
        summary="MEMAT: MEMIT plus attention-head classifiers and per-head corrections (cross-lingual)",
        params=MematParams,
        build=Memat,
        presets="memit",
        requires=("memat",),  # scikit-learn, for the head classifiers
    )
)
