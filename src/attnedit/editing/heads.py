"""Attention-head blocks of MEMAT: per-head features, head classifiers, and head corrections.

- ``head_features``: the input of the attention output projection, per (query) head, at the last token of
  each sentence: ``[n_sentences, n_layers, n_heads, head_dim]``. Under grouped-query attention these are
  the query heads' outputs (each query head has its own slice of the projection's input).
- ``rank_heads``: one logistic regression per (layer, head) (scikit-learn, its defaults), trained on a
  seeded split of the records that keeps a record's sentences together; heads ranked by validation
  accuracy. Every head's accuracy is kept (the heatmap).
- ``train_corrections``: one ``head_dim`` vector per chosen head, added to that head's output at every
  position (exactly where a bias of the output projection acts), optimised with the shared ``adam_loop``
  on NLL(o_new) over context templates + prompts, KL on "{subject} is a" per request (its own reference:
  the model before the corrections) and a weight decay and norm clamp relative to each head's own
  activation norm. Pluggable loss terms (SADR) see the same ``StepState`` as in the target optimisation.
- ``fold_corrections``: per layer, ``sum over its chosen heads of W_o[:, head slice] @ delta_h``: the
  output projection's bias change (``overwrite``: the official code's behaviour, only the last chosen
  head of a layer survives).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnedit.core.extras import missing_extra_error
from attnedit.core.interventions import head_outputs
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import check_length, length_batches, pad_batch
from attnedit.core.tokens import (
    SubjectNotFoundError,
    encode_prompt,
    encode_target,
    locate_subject,
    padding_id,
)
from attnedit.editing.adam import adam_loop
from attnedit.editing.frozen_below import FrozenBelow
from attnedit.editing.losses import (
    LossParts,
    LossTerm,
    RequestMean,
    StepState,
    TargetReads,
    add_terms,
    clamp_norms_,
    kl_to_reference,
    log_probs,
    request_parts,
    target_reads,
    term_attention,
    term_kernel,
    weight_decay,
)
from attnedit.editing.rows import Row, SplitBatch, split_rows
from attnedit.editing.templates import template_prefix

logger = logging.getLogger(__name__)

FOLDS = ("sum", "overwrite")


def sentence_ids(bundle: ModelBundle, prompt: str, target: str) -> list[int]:
    """Token ids of ``prompt`` followed by ``target`` (after one space), as the scorer tokenises them."""
    ids = encode_prompt(bundle.tokenizer, prompt)
    full = ids + encode_target(bundle.tokenizer, prompt, target, ids)
    check_length(bundle.adapter, len(full), prompt)
    return full


@torch.no_grad()
def head_features(
    bundle: ModelBundle, sentences: Sequence[Sequence[int]], batch_size: int = 64
) -> torch.Tensor:
    """Per-head inputs of every layer's attention output projection at each sentence's last token:
    ``[n_sentences, n_layers, n_heads, head_dim]`` (float32, on the CPU)."""
    adapter, model = bundle.adapter, bundle.model
    layers = list(range(adapter.n_layers))
    pad = padding_id(bundle.tokenizer)
    out = torch.zeros(len(sentences), adapter.n_layers, adapter.n_heads, adapter.head_dim)
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad, left=False, device=bundle.device)
        last = torch.tensor([len(s) - 1 for s in chunk], device=bundle.device)
        rows = torch.arange(len(chunk), device=bundle.device)
        with head_outputs(model, adapter, layers) as view:
            model(input_ids=ids, attention_mask=mask)
            for layer in layers:
                out[start : start + len(chunk), layer] = view[layer][rows, last].float().cpu()
    return out


@dataclass
class HeadRanking:
    """The classifiers' verdict: validation (and training) accuracy of every (layer, head), and the
    heads in decreasing order of validation accuracy (ties: training accuracy, then layer and head)."""

    val_accuracy: np.ndarray  # [n_layers, n_heads]
    train_accuracy: np.ndarray  # [n_layers, n_heads]
    order: list[tuple[int, int]]
    n_train: int  # records
    n_val: int
    validated_on: str  # "held-out records", or "training records" when too few records to hold any out

    def top(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` best heads as (layer, head)."""
        return self.order[:k]


def split_records(n_records: int, train_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Record indices of the training and validation parts: a seeded shuffle, ``train_share`` of the
    records (rounded, at least one) for training and the rest (at least one when there are two or more
    records) for validation."""
    order = np.random.RandomState(seed).permutation(n_records)
    n_train = min(max(1, round(train_share * n_records)), max(1, n_records - 1))
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def rank_heads(
    features: torch.Tensor, labels: np.ndarray, records: np.ndarray, train_share: float, seed: int
) -> HeadRanking:
    """Fit one logistic regression per (layer, head) on ``features`` ``[n, n_layers, n_heads, head_dim]``
    with binary ``labels`` ``[n]``; ``records[i]`` is the record sentence ``i`` belongs to (a record's
    sentences stay on one side of the split)."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError:  # an editor built without make_editor, which checks MEMAT's extra first
        raise missing_extra_error("memat", "method 'memat'") from None

    unique = np.unique(records)
    train_rec, val_rec = split_records(len(unique), train_share, seed)
    train = np.isin(records, unique[train_rec])
    val = np.isin(records, unique[val_rec])
    validated_on = "held-out records"
    if not val.any():
        validated_on = "training records"
        val = train
        logger.warning("MEMAT: one classifier record only: head accuracies are training accuracies")
    x = features.numpy()
    n_layers, n_heads = x.shape[1], x.shape[2]
    val_acc = np.zeros((n_layers, n_heads))
    train_acc = np.zeros((n_layers, n_heads))
    single_class = len(np.unique(labels[train])) < 2
    with warnings.catch_warnings():
        # lbfgs may stop at its iteration limit on separable heads; the accuracy is what is used
        warnings.simplefilter("ignore", ConvergenceWarning)
        for layer in range(n_layers):
            for head in range(n_heads):
                xs = x[:, layer, head]
                if single_class:  # nothing to learn: every head predicts the one class
                    val_acc[layer, head] = float((labels[val] == labels[train][0]).mean())
                    train_acc[layer, head] = 1.0
                    continue
                model = LogisticRegression().fit(xs[train], labels[train])
                val_acc[layer, head] = model.score(xs[val], labels[val])
                train_acc[layer, head] = model.score(xs[train], labels[train])
    flat = np.lexsort((np.arange(n_layers * n_heads), -train_acc.ravel(), -val_acc.ravel()))
    order = [(int(i // n_heads), int(i % n_heads)) for i in flat]
    return HeadRanking(val_acc, train_acc, order, len(train_rec), len(val_rec), validated_on)


@dataclass(frozen=True)
class CorrectionRequest:
    """What the corrections are trained on for one request: its prompt and new object in the head
    language, the subject (for the KL prompt and the attention terms) and the KL prompt's form there."""

    prompt: str
    target_new: str
    subject: str
    kl_prompt: str  # "{} is a" in the head language


@dataclass
class CorrectionSettings:
    """The corrections' optimisation (MEMAT's official defaults)."""

    lr: float = 0.2
    batch_requests: int = 32  # requests per minibatch (one Adam step each)
    epochs: int = 1
    min_steps: int = 10  # small batches get this many steps all the same
    kl_factor: float = 0.0625
    weight_decay: float = 0.001
    clamp_norm_factor: float = 0.75
    seed: int = 0

    def steps(self, n_requests: int) -> int:
        per_epoch = math.ceil(n_requests / self.batch_requests)
        return max(self.min_steps, self.epochs * per_epoch)


@dataclass
class _Chunk:
    """Rows of one minibatch prepared for repeated forward passes: the batch, the lower blocks' output
    (``FrozenBelow``), where targets are read, the subject columns (for loss terms), which rows are
    template prompts and which KL prompts, and the KL prompts' reference distribution."""

    batch: SplitBatch
    frozen: FrozenBelow
    reads: TargetReads
    facts: torch.Tensor
    prompt_rows: torch.Tensor
    template_rows: torch.Tensor
    kl_rows: torch.Tensor
    kl_reference: torch.Tensor | None


@dataclass
class CorrectionResult:
    """The trained corrections ``[n_chosen, head_dim]`` (in the order of ``heads``) and the run's record."""

    heads: list[tuple[int, int]]
    delta: torch.Tensor
    reference_norm: torch.Tensor  # [n_chosen]: each head's mean activation norm (decay and clamp scale)
    steps: int
    final_loss: float
    loss_parts: LossParts


def _rows(
    bundle: ModelBundle, requests: Sequence[CorrectionRequest], templates: Sequence[str]
) -> tuple[list[Row], list[int]]:
    """Rows for the corrections: template + prompt + o_new[:-1] per template, then the KL prompt, each
    unsplit (``fact`` 0: a correction acts at every position, so nothing can be cached before the subject);
    and each row's subject column (-1 where the subject is not in the row)."""
    tok = bundle.tokenizer
    rows: list[Row] = []
    subject_at: list[int] = []
    for r, req in enumerate(requests):
        for t, template in enumerate(templates):
            text = template_prefix(template) + req.prompt
            ids = encode_prompt(tok, text)
            target = encode_target(tok, text, req.target_new, ids)
            full = tuple(ids) + tuple(target[:-1])
            check_length(bundle.adapter, len(full), text)
            rows.append(Row(r, full, 0, len(ids), tuple(target), t))
            try:
                subject_at.append(locate_subject(tok, text, req.subject).last_token)
            except SubjectNotFoundError:
                subject_at.append(-1)
        kl = locate_subject(tok, req.kl_prompt, req.subject)
        rows.append(Row(r, tuple(kl.input_ids[: kl.last_token + 1]), 0, kl.last_token + 1, (), -1))
        subject_at.append(-1)
    return rows, subject_at


def train_corrections(
    bundle: ModelBundle,
    requests: Sequence[CorrectionRequest],
    templates: Sequence[str],
    heads: Sequence[tuple[int, int]],
    reference_norm: torch.Tensor,
    settings: CorrectionSettings,
    terms: Sequence[LossTerm] = (),
) -> CorrectionResult:
    """Train one correction per chosen head, shared by all ``requests`` (minibatches of
    ``settings.batch_requests`` requests in a seeded order, one Adam step each)."""
    model, adapter, device = bundle.model, bundle.adapter, bundle.device
    heads = list(heads)
    layers = sorted({layer for layer, _ in heads})
    head_dim = adapter.head_dim
    delta = torch.zeros(len(heads), head_dim, device=device, requires_grad=True)
    ref = reference_norm.to(device).clamp_min(1e-12)
    # per layer: the chosen heads and their rows in ``delta``
    slots = {layer: [(i, h) for i, (lay, h) in enumerate(heads) if lay == layer] for layer in layers}

    def add_corrections(x: torch.Tensor, layer: int) -> torch.Tensor:
        x = x.clone()
        for i, head in slots[layer]:
            x[:, :, head] = x[:, :, head] + delta[i].to(x.dtype)
        return x

    rows, subject_at = _rows(bundle, requests, templates)
    pad = padding_id(bundle.tokenizer)
    order = np.random.RandomState(settings.seed).permutation(len(requests))
    per = settings.batch_requests
    minibatches = [sorted(order[i : i + per].tolist()) for i in range(0, len(order), per)]
    first_layer = min(layers)
    head = adapter.unembedding(model)
    parts: dict[str, torch.Tensor] = {}

    def chunk(picked: list[int], local: dict[int, int]) -> _Chunk:
        """The prepared forward of some rows of a minibatch (``picked``: indices into ``rows``)."""
        chosen = [rows[b] for b in picked]
        batch = split_rows(chosen, [local[row.request] for row in chosen], pad, device)
        kl_rows = [i for i, row in enumerate(chosen) if row.kl]
        reference = None
        if kl_rows:  # the KL reference: the model without corrections (no hook yet), on the KL prompts
            kl_ids, kl_mask = pad_batch([chosen[i].ids for i in kl_rows], pad, left=False, device=device)
            with torch.no_grad():
                logits = model(input_ids=kl_ids, attention_mask=kl_mask).logits
            last = logits[torch.arange(len(kl_rows), device=device), kl_mask.sum(1) - 1]
            reference = log_probs(last)
        return _Chunk(
            batch=batch,
            frozen=FrozenBelow(bundle, batch, first_layer),
            reads=target_reads(batch),
            facts=torch.tensor([max(subject_at[b], 0) for b in picked], device=device),
            prompt_rows=torch.tensor(
                [i for i, b in enumerate(picked) if subject_at[b] >= 0], dtype=torch.long, device=device
            ),
            template_rows=torch.tensor([i for i, row in enumerate(chosen) if not row.kl], device=device),
            kl_rows=torch.tensor(kl_rows, dtype=torch.long, device=device),
            kl_reference=reference,
        )

    def prepare(members: list[int]) -> list[_Chunk]:
        """A minibatch's rows in chunks of similar length (padding is paid in full on a CPU); one chunk
        with loss terms, whose per-request values span the whole minibatch."""
        local = {r: i for i, r in enumerate(members)}
        picked = [b for b, row in enumerate(rows) if row.request in local]
        if terms:
            return [chunk(picked, local)]
        lengths = [len(row.ids) for row in rows]
        by_length = sorted(picked, key=lengths.__getitem__)
        cuts = length_batches(lengths, by_length, max_tokens=1 << 30, max_rows=len(picked), call_cost=512)
        return [chunk(sorted(c), local) for c in cuts]

    def loss_at(step: int, m: int | None = None) -> torch.Tensor:
        """The loss of minibatch ``m`` (default: the step's) with the current corrections."""
        m = step % len(minibatches) if m is None else m
        chunks, n = prepared[m], len(minibatches[m])
        nll_means, kl_means = RequestMean(n, device), RequestMean(n, device)
        per_request = torch.zeros(n, device=device)
        parts.clear()
        with head_outputs(model, adapter, layers, replace=add_corrections, detach=False):
            for c in chunks:
                with term_attention(bundle, terms, c.batch, first_layer) as attention:
                    hidden = c.frozen.forward()
                    index = c.batch.request_index
                    if len(c.template_rows):
                        nll_means.add(index[c.template_rows], c.reads.row_nll(head, hidden)[c.template_rows])
                    if c.kl_reference is not None:
                        at = c.batch.last_prompt[c.kl_rows]
                        logp = log_probs(head(hidden[c.kl_rows, at]))
                        kl_means.add(index[c.kl_rows], kl_to_reference(c.kl_reference, logp))
                    if terms:  # one chunk: the whole minibatch
                        state = StepState(step, c.batch, n, attention, c.facts, c.prompt_rows)
                        per_request = add_terms(terms, state, per_request, parts)
        nll, kl = nll_means.mean(), kl_means.mean()
        per_request = per_request + nll + settings.kl_factor * kl
        # the reported parts: means over the minibatch's requests
        for key in list(parts):
            if parts[key].dim() and parts[key].shape[0] == n:
                parts[key] = parts[key].mean(0)[None]
        parts.update({"nll": nll.detach().mean()[None], "kl": kl.detach().mean()[None]})
        decay = settings.weight_decay * weight_decay(delta, ref).sum()  # the weight after the sum over heads
        parts["weight_decay"] = decay.detach()[None]
        return (per_request.mean() + decay)[None]

    def clamp() -> None:
        clamp_norms_(delta, settings.clamp_norm_factor * ref)

    steps = settings.steps(len(requests))
    # one attention kernel for the whole optimisation, the prepared lower blocks included
    with term_kernel(bundle, terms, first_layer):
        prepared = [prepare(members) for members in minibatches]
        if terms:
            # every minibatch's step-0 pass (corrections still zero): the reference of terms that compare
            # with the model before the corrections (SADR); minibatch 0's is the loop's own first step
            with torch.no_grad():
                for m in range(1, len(minibatches)):
                    loss_at(0, m)
        result = adam_loop(
            [delta],
            loss_at,
            lr=settings.lr,
            steps=steps + 1,  # the loop's last pass only measures
            early_stop_loss=0.0,
            project=clamp,
            what="MEMAT corrections",
        )
    return CorrectionResult(
        heads=heads,
        delta=delta.detach().float().cpu(),
        reference_norm=reference_norm.float().cpu(),
        steps=result.steps[0],
        final_loss=result.final_loss[0],
        loss_parts=request_parts(parts, 0),
    )


def fold_corrections(
    bundle: ModelBundle, heads: Sequence[tuple[int, int]], delta: torch.Tensor, fold: str = "sum"
) -> dict[int, torch.Tensor]:
    """Per layer, the change of the attention output projection's bias that adds ``delta[i]`` to head
    ``heads[i]``'s output at every position: ``sum_i W_o[:, slice(head_i)] @ delta[i]`` (float32).
    ``fold="overwrite"`` keeps only the last of a layer's heads in ``heads`` order (the official code
    assigns the bias once per head, so the last one wins; the others were trained but are lost)."""
    if fold not in FOLDS:
        raise ValueError(f"bias_fold must be one of {FOLDS}, not {fold!r}")
    adapter = bundle.adapter
    d = adapter.head_dim
    out: dict[int, torch.Tensor] = {}
    for i, (layer, head) in enumerate(heads):
        weight = adapter.attn_o_weight(bundle.model, layer)  # [hidden, n_heads * head_dim]
        change = weight[:, head * d : (head + 1) * d].float() @ delta[i].to(weight.device).float()
        out[layer] = change if fold == "overwrite" or layer not in out else out[layer] + change
    return out
