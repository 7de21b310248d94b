"""Optimisation rows and their batches: the prompts an optimisation runs, cut at the fact token.

- ``Row``: one prompt (a context template + the request prompt + o_new[:-1], or a KL prompt) with its
  fact token (the subject's last token), target ids and template index; ``build_rows`` makes the rows
  of the target optimisation (ROME's ``compute_v``), one per template, then the KL prompt.
- ``SplitBatch``: rows cut at their fact token into a left-padded prefix (computed once, nothing before
  the fact token depends on the optimised deltas) and a right-padded suffix (``split_rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnedit.core.data import EditRequest
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import check_length, pad_batch
from attnedit.core.tokens import encode_target, locate_subject
from attnedit.editing.templates import template_prefix

KL_PROMPT = "{} is a"


@dataclass(frozen=True)
class Row:
    """One optimisation prompt: a template + the request prompt + o_new[:-1], or a KL prompt."""

    request: int
    ids: tuple[int, ...]
    fact: int  # fact token index (the subject's last token)
    n_prompt: int  # tokens of the prompt; target token t is predicted at n_prompt - 1 + t
    targets: tuple[int, ...]  # o_new ids; empty for KL rows
    template: int  # index of the template (-1 for KL rows)

    @property
    def kl(self) -> bool:
        return not self.targets


def build_rows(
    bundle: ModelBundle,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    kl_prompt: str = KL_PROMPT,
) -> list[Row]:
    """Rows for every request: one per template (template 0 must be ``"{}"``), then its KL prompt."""
    if not templates or templates[0] != "{}":
        raise ValueError("the first context template must be '{}' (the plain prompt)")
    tok = bundle.tokenizer
    rows: list[Row] = []
    for r, req in enumerate(requests):
        for t, template in enumerate(templates):
            span = locate_subject(tok, req.prompt, req.subject, prefix=template_prefix(template))
            target = encode_target(tok, span.text, req.target_new, span.input_ids)
            ids = tuple(span.input_ids) + tuple(target[:-1])
            check_length(bundle.adapter, len(ids), span.text)
            rows.append(Row(r, ids, span.last_token, len(span.input_ids), tuple(target), t))
        kl = locate_subject(tok, kl_prompt, req.subject)
        rows.append(
            Row(r, tuple(kl.input_ids[: kl.last_token + 1]), kl.last_token, kl.last_token + 1, (), -1)
        )
    return rows


@dataclass
class SplitBatch:
    """Rows cut at their fact token: a left-padded prefix (computed once) and a right-padded suffix.

    In the suffix the fact token is column 0 of every row; in the keys it is column ``prefix_width``.
    """

    rows: list[Row]
    prefix_ids: torch.Tensor  # [B, P]
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor  # [B, S]
    suffix_mask: torch.Tensor
    positions: torch.Tensor  # [B, S] absolute positions of the suffix tokens
    request_index: torch.Tensor  # [B] local request index of each row
    last_prompt: torch.Tensor  # [B] suffix column of the last prompt token

    @property
    def prefix_width(self) -> int:
        return self.prefix_ids.shape[1]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prefix_mask, self.suffix_mask], dim=1)


def split_rows(rows: list[Row], local_request: list[int], pad_id: int, device: torch.device) -> SplitBatch:
    """``rows`` as one ``SplitBatch`` on ``device``; ``local_request[b]``: row b's request in the batch."""
    prefixes = [r.ids[: r.fact] for r in rows]
    suffixes = [r.ids[r.fact :] for r in rows]
    width = max(map(len, prefixes))
    if width:
        pre_ids, pre_mask = pad_batch([p or (pad_id,) for p in prefixes], pad_id, left=True, device=device)
        pre_mask[[i for i, p in enumerate(prefixes) if not p], -1] = 0  # empty prefix: a masked pad
    else:
        pre_ids = torch.zeros((len(rows), 0), dtype=torch.long, device=device)
        pre_mask = pre_ids.clone()
    suf_ids, suf_mask = pad_batch(suffixes, pad_id, left=False, device=device)
    lengths = torch.tensor([len(p) for p in prefixes], device=device)
    positions = lengths[:, None] + torch.arange(suf_ids.shape[1], device=device)[None]
    return SplitBatch(
        rows=rows,
        prefix_ids=pre_ids,
        prefix_mask=pre_mask,
        suffix_ids=suf_ids,
        suffix_mask=suf_mask,
        positions=positions,
        request_index=torch.tensor(local_request, device=device),
        last_prompt=torch.tensor([r.n_prompt - 1 - r.fact for r in rows], device=device),
    )
