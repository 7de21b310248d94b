"""The loss-term library of the optimisations: the target optimisation (``optimise``), fine-tuning
(``ft``) and MEMAT's head corrections (``heads``) build their losses from these, each implemented once.

Built-in terms:

- ``TargetReads`` (``target_reads``): where a batch's target tokens are predicted; ``row_nll``: the mean
  NLL of each row's target tokens.
- ``log_probs``, ``kl_to_reference``: the KL of a next-token distribution to a reference one (the model
  before the edit), ``KL(reference || current)``.
- ``weight_decay``, ``clamp_norms_``: a delta's norm relative to a reference norm, as a loss
  (``||delta|| / scale**2``) and as a projection after every step (norm at most ``limit``).
- ``RequestMean``, ``per_request_mean``: per-request means of per-row values.

Pluggable terms (SADR): the ``LossTerm`` protocol, the ``StepState`` a term reads, the attention kernel
and attention rows of the terms (``term_kernel``, ``term_attention``), ``add_terms`` and
``request_parts`` (the reported loss parts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from attnedit.core.interventions import attention_implementation, attention_probabilities
from attnedit.core.models import ModelBundle
from attnedit.editing.rows import SplitBatch

# --- built-in terms -------------------------------------------------------------------------------------


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of next-token ``logits`` over the last dimension, in float32."""
    return torch.log_softmax(logits.float(), dim=-1)


def kl_to_reference(reference: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(reference || current)`` per row, from log-probabilities ``[R, V]`` of both."""
    return (reference.exp() * (reference - logp)).sum(-1)


def weight_decay(delta: torch.Tensor, scale: torch.Tensor, weight: float | None = None) -> torch.Tensor:
    """Per row of ``delta`` ``[N, D]``: ``weight * ||delta_i|| / scale_i**2`` (``scale`` ``[N]``: a reference
    norm, kept away from zero by the caller). ``weight`` None: the unweighted ratio, for a caller that
    weights a sum of rows (MEMAT: ``weight * sum_i``; the two orders round differently)."""
    norms = delta.norm(dim=-1)
    weighted: torch.Tensor = norms if weight is None else weight * norms
    return weighted / scale**2


def clamp_norms_(delta: torch.Tensor, limit: torch.Tensor) -> None:
    """Scale the rows of ``delta`` ``[N, D]`` longer than ``limit`` ``[N]`` down to it, in place (a
    projection: call it under ``no_grad``)."""
    norms = delta.norm(dim=-1)
    scale = torch.where(norms > limit, limit / norms.clamp_min(1e-12), torch.ones_like(norms))
    delta.mul_(scale[:, None])


class RequestMean:
    """The mean per request of per-row values, added in one or several parts (chunks of a batch)."""

    def __init__(self, n: int, device: torch.device | str):
        self.total = torch.zeros(n, device=device)
        self.count = torch.zeros(n, device=device)

    def add(self, request: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``values[i]`` to request ``request[i]``."""
        self.total = self.total.index_add(0, request, values)
        self.count = self.count.index_add(0, request, torch.ones_like(values))

    def mean(self) -> torch.Tensor:
        """``[n]``: the mean of each request's values (0 for a request without any)."""
        return self.total / self.count.clamp_min(1)


def per_request_mean(
    values: torch.Tensor, rows: torch.Tensor, request_index: torch.Tensor, n: int
) -> torch.Tensor:
    """Mean of ``values`` (one per selected row) over the rows of each request."""
    means = RequestMean(n, values.device)
    means.add(request_index[rows], values)
    return means.mean()


@dataclass
class TargetReads:
    """The suffix positions that predict target tokens, and the row each belongs to."""

    rows: torch.Tensor
    columns: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor  # 1 / target length: a row's NLL is the mean over its tokens
    n_rows: int

    def row_nll(self, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Mean NLL of each row's target tokens [B] (0 for rows without targets)."""
        logp = log_probs(head(hidden[self.rows, self.columns]))
        token_lp = logp.gather(1, self.tokens[:, None])[:, 0]
        return torch.zeros(self.n_rows, device=hidden.device).index_add(
            0, self.rows, -token_lp * self.weights
        )


def target_reads(batch: SplitBatch) -> TargetReads:
    """Where the rows of ``batch`` predict their target tokens (suffix columns), for ``row_nll``."""
    r, c, t, w = [], [], [], []
    for b, row in enumerate(batch.rows):
        for i, token in enumerate(row.targets):
            r.append(b)
            c.append(row.n_prompt - 1 - row.fact + i)
            t.append(token)
            w.append(1.0 / len(row.targets))
    device = batch.suffix_ids.device
    return TargetReads(
        rows=torch.tensor(r, dtype=torch.long, device=device),
        columns=torch.tensor(c, dtype=torch.long, device=device),
        tokens=torch.tensor(t, dtype=torch.long, device=device),
        weights=torch.tensor(w, device=device),
        n_rows=len(batch.rows),
    )


# --- pluggable terms ------------------------------------------------------------------------------------


@dataclass
class StepState:
    """What an extra loss term sees at one optimisation step.

    ``attention`` holds, for the layers the terms asked for, the attention row of each batch row's
    last prompt token (the position predicting the first target token): layer -> ``[B, query heads,
    keys]``, keys = prefix + suffix columns. Step 0 runs with every delta zero: its forward pass is
    the model before the edit.
    """

    step: int
    batch: SplitBatch
    n_requests: int
    attention: Mapping[int, torch.Tensor]
    fact_key: torch.Tensor  # [B] key column of the subject's last token
    prompt_rows: torch.Tensor  # rows that are optimisation prompts (not the KL rows)


class LossTerm(Protocol):
    """A pluggable extra loss: reads the step's forward pass, returns one value per request.

    A term may expose ``diagnostics: dict[str, torch.Tensor]`` (per request, detached) after a call;
    they are reported with the loss parts.
    """

    name: str

    def describe(self) -> dict[str, Any]:
        """Name and settings, for the run manifest."""

    def attention_layers(self, n_layers: int) -> Sequence[int]:
        """Layers whose attention probabilities the term reads (empty: none; eager attention if any)."""

    def __call__(self, state: StepState) -> torch.Tensor:
        """Weighted loss per request, shape [n_requests] (the term carries its own weight)."""


def _term_layers(bundle: ModelBundle, terms: Sequence[LossTerm], first_changed: int) -> list[int]:
    n_layers = bundle.adapter.n_layers
    return sorted(
        {layer for t in terms for layer in t.attention_layers(n_layers) if first_changed <= layer < n_layers}
    )


def term_kernel(
    bundle: ModelBundle, terms: Sequence[LossTerm], first_changed: int
) -> contextlib.AbstractContextManager[None]:
    """Eager attention for a whole optimisation when its terms read attention probabilities (so the
    cached prefix and lower blocks come from the same kernel as the steps); otherwise no change."""
    if _term_layers(bundle, terms, first_changed):
        return attention_implementation(bundle.model, "eager")
    return contextlib.nullcontext()


@contextlib.contextmanager
def term_attention(
    bundle: ModelBundle, terms: Sequence[LossTerm], batch: SplitBatch, first_changed: int
) -> Iterator[Mapping[int, torch.Tensor]]:
    """Record the last-prompt-token attention rows the terms read, for layers ``>= first_changed``
    (below it nothing depends on the optimised parameters, so a term's KL there is exactly zero)."""
    layers = _term_layers(bundle, terms, first_changed)
    if not layers:
        yield {}
        return
    with attention_probabilities(
        bundle.model, bundle.adapter, layers, detach=False, query=batch.last_prompt
    ) as view:
        yield view


def add_terms(
    terms: Sequence[LossTerm], state: StepState, loss: torch.Tensor, parts: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``loss`` + every term's value (per request); the values and diagnostics go into ``parts``."""
    for term in terms:
        value = term(state)
        parts[term.name] = value.detach()
        for key, diag in getattr(term, "diagnostics", {}).items():
            parts[f"{term.name}.{key}"] = diag
        loss = loss + value
    return loss


# one request's loss parts and diagnostics as plain numbers (``request_parts``), kept with its edit
LossParts = dict[str, float | list[float]]


def request_parts(parts: Mapping[str, torch.Tensor], i: int) -> LossParts:
    """Request ``i``'s loss parts and diagnostics as plain numbers (vectors as lists)."""
    return {k: float(v[i]) if v[i].dim() == 0 else v[i].tolist() for k, v in parts.items()}
