"""Target optimisation, the shared heart of ROME (v*), MEMIT and PMET (z): Adam on injected deltas.

For each request a delta is added at the fact token (the subject's last token) to one or more
hidden-state output sites (``core.sites.Site``: a block, MLP or attention output); Adam minimises,
per request (ROME's ``compute_v``)::

    NLL(o_new | template_j + prompt)  averaged over templates
    + kl_factor * KL(initial || current) of the next-token distribution of "{subject} is a"
    + weight_decay * ||delta|| / ||v_init||^2
    + sum of pluggable extra terms (``LossTerm``, e.g. SADR's attention restriction)

with ``||delta|| <= clamp_norm_factor * ||v_init||`` after every step, stopping when the loss falls
below ``early_stop_loss``. Many requests are optimised together with independent deltas (their rows
never interact, Adam is element-wise, a finished request is frozen), which is exactly equivalent to
one optimisation per request, only batched.

The blocks it is composed of: the rows and their split batches (``rows``), the loss terms (``losses``:
NLL, KL, weight decay, norm clamp, pluggable terms), the forward passes that recompute only what the
deltas change (``frozen_below``: the prefix KV cache, the lower blocks skipped, logits only at the
positions the loss reads), the Adam loop (``adam``) and the finished groups kept on disk
(``target_cache``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from attnedit.core.data import EditRequest
from attnedit.core.interventions import Trace, linear_precision
from attnedit.core.models import ModelBundle
from attnedit.core.sites import HIDDEN_STATE_COMPONENTS, Site
from attnedit.core.tokens import padding_id
from attnedit.editing.adam import adam_loop
from attnedit.editing.frozen_below import FrozenBelow
from attnedit.editing.losses import (
    LossParts,
    LossTerm,
    StepState,
    add_terms,
    clamp_norms_,
    kl_to_reference,
    log_probs,
    per_request_mean,
    request_parts,
    target_reads,
    term_attention,
    term_kernel,
    weight_decay,
)
from attnedit.editing.rows import KL_PROMPT, Row, build_rows, split_rows
from attnedit.editing.target_cache import CachedGroup, GroupStore, cache_directory, group_key

# ``TargetSettings.matmul``: "model" (the model's own dtype) or a lower precision for the steps' products
MATMUL_DTYPES = {"bfloat16": torch.bfloat16}


def check_injections(sites: Sequence[Site]) -> None:
    """Deltas are injected into hidden states: every site must be a block, MLP or attention output."""
    if not sites:
        raise ValueError("no injection site")
    bad = [str(site) for site in sites if not site.hidden_state]
    if bad:
        raise ValueError(
            f"injection sites must be outputs of {', '.join(HIDDEN_STATE_COMPONENTS)}, not {', '.join(bad)}"
        )


@dataclass
class TargetSettings:
    """The optimisation's hyper-parameters (names as in ROME/MEMIT's ``compute_v``/``compute_z``)."""

    lr: float = 0.5
    steps: int = 20
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05
    max_rows: int = 256  # rows (template prompts) optimised together; bounds memory
    kl_prompt: str = KL_PROMPT  # in the language of the requests (``templates.LANGUAGES``)
    # the dtype of the optimisation steps' matrix products above the injection (``linear_precision``):
    # "model" (as the model computes) or "bfloat16"; the module outputs the targets start from are read
    # in the model's own precision either way
    matmul: str = "model"


@dataclass
class TargetResult:
    """Per injection site: the module's output at the plain prompt's fact token, and the optimised delta."""

    init: dict[Site, torch.Tensor]  # [N, H]
    delta: dict[Site, torch.Tensor]  # [N, H]
    steps: list[int]  # optimisation steps run per request
    final_loss: list[float]
    loss_parts: list[LossParts] = field(default_factory=list)

    def target(self, injection: Site) -> torch.Tensor:
        """The optimised value at an injection site (initial output + delta), ``[N, H]``."""
        return self.init[injection] + self.delta[injection]


def optimise_targets(
    bundle: ModelBundle,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    injections: Sequence[Site],
    settings: TargetSettings,
    terms: Sequence[LossTerm] = (),
    progress: bool = False,
) -> TargetResult:
    """Optimise one delta per (request, injection site); requests are processed in groups of
    ``max_rows``. Injection sites are hidden-state outputs (``check_injections``)."""
    check_injections(injections)
    if settings.matmul != "model" and settings.matmul not in MATMUL_DTYPES:
        raise ValueError(f"matmul must be 'model' or one of {sorted(MATMUL_DTYPES)}, not {settings.matmul!r}")
    rows = build_rows(bundle, requests, templates, settings.kl_prompt)
    per_request = len(templates) + 1
    group = max(1, settings.max_rows // per_request)
    hidden = bundle.adapter.hidden_size
    out = TargetResult(
        init={inj: torch.zeros(len(requests), hidden) for inj in injections},
        delta={inj: torch.zeros(len(requests), hidden) for inj in injections},
        steps=[0] * len(requests),
        final_loss=[math.nan] * len(requests),
        loss_parts=[{} for _ in requests],
    )
    # requests of similar length share a group, so little padding is computed (results are the same:
    # requests never interact)
    widths = [0] * len(requests)
    for row in rows:
        widths[row.request] = max(widths[row.request], len(row.ids) - row.fact)
    order = sorted(range(len(requests)), key=widths.__getitem__)
    groups = [order[i : i + group] for i in range(0, len(order), group)]
    directory = cache_directory()
    store = None if directory is None else GroupStore(directory)
    # one attention kernel for the whole optimisation, cached prefix and lower blocks included
    with term_kernel(bundle, terms, min(inj.layer for inj in injections) + 1):
        for ids in tqdm(
            groups, desc="targets", unit="group", disable=not progress or len(groups) < 2, leave=False
        ):
            members = set(ids)
            group_rows = [row for row in rows if row.request in members]
            if store is None:
                _optimise_group(bundle, group_rows, ids, injections, settings, terms, out)
                continue
            key = group_key(bundle, group_rows, ids, injections, asdict(settings), terms)
            cached = store.restore(key, len(injections), len(ids))
            if cached is not None:
                _take_group(out, ids, injections, cached)
                continue
            _optimise_group(bundle, group_rows, ids, injections, settings, terms, out)
            store.keep(key, _group_of(out, ids, injections))
    return out


def _group_of(out: TargetResult, ids: list[int], injections: Sequence[Site]) -> CachedGroup:
    """The requests ``ids`` of ``out``, to be kept in the target cache."""
    return CachedGroup(
        init=[out.init[inj][ids] for inj in injections],
        delta=[out.delta[inj][ids] for inj in injections],
        steps=[out.steps[r] for r in ids],
        final_loss=[out.final_loss[r] for r in ids],
        loss_parts=[out.loss_parts[r] for r in ids],
    )


def _take_group(out: TargetResult, ids: list[int], injections: Sequence[Site], group: CachedGroup) -> None:
    """Fill the requests ``ids`` of ``out`` from a group of the target cache."""
    for j, inj in enumerate(injections):
        out.init[inj][ids] = group.init[j]
        out.delta[inj][ids] = group.delta[j]
    for i, rid in enumerate(ids):
        out.steps[rid] = group.steps[i]
        out.final_loss[rid] = group.final_loss[i]
        out.loss_parts[rid] = group.loss_parts[i]


def _optimise_group(
    bundle: ModelBundle,
    rows: list[Row],
    request_ids: list[int],
    injections: Sequence[Site],
    settings: TargetSettings,
    terms: Sequence[LossTerm],
    out: TargetResult,
) -> None:
    model, adapter, device = bundle.model, bundle.adapter, bundle.device
    head = adapter.unembedding(model)
    pad_id = padding_id(bundle.tokenizer)
    local = {rid: i for i, rid in enumerate(request_ids)}
    n = len(request_ids)
    batch = split_rows(rows, [local[r.request] for r in rows], pad_id, device)
    frozen = FrozenBelow(bundle, batch, min(inj.layer for inj in injections))
    reads = target_reads(batch)
    template_rows = torch.tensor([b for b, row in enumerate(rows) if not row.kl], device=device)
    kl_rows = torch.tensor([b for b, row in enumerate(rows) if row.kl], device=device)
    first_row = {local[row.request]: b for b, row in enumerate(rows) if row.template == 0}
    first_rows = torch.tensor([first_row[i] for i in range(n)], device=device)

    names = {inj.module_name(adapter): inj for inj in injections}
    deltas = {
        inj: torch.zeros(n, adapter.hidden_size, device=device, requires_grad=True) for inj in injections
    }
    init: dict[Site, torch.Tensor] = {}
    row_index = torch.arange(len(rows), device=device)

    def inject(y: torch.Tensor, name: str) -> torch.Tensor:
        inj = names[name]
        if inj not in init:  # the first pass runs with zero deltas: the module's own output
            init[inj] = y[first_rows, 0].detach().float().clone()
        y = y.clone()
        y[row_index, 0] = y[row_index, 0] + deltas[inj][batch.request_index].to(y.dtype)
        return y

    # an injection at layer L (MLP, attention or block output) leaves the attention of layers <= L unchanged
    with term_attention(bundle, terms, batch, frozen.first_layer + 1) as attention:
        fact_key = torch.full((len(rows),), batch.prefix_width, device=device)
        kl_init: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}

        def request_losses(step: int) -> torch.Tensor:
            nonlocal kl_init
            with Trace(model, list(names), retain_output=False, edit_output=inject):
                hidden = frozen.forward()
                row_nll = reads.row_nll(head, hidden)
                nll = per_request_mean(row_nll[template_rows], template_rows, batch.request_index, n)
                kl_logp = log_probs(head(hidden[kl_rows, 0]))
                if kl_init is None:
                    kl_init = kl_logp.detach()
                kl_each = kl_to_reference(kl_init, kl_logp)
                kl = per_request_mean(kl_each, kl_rows, batch.request_index, n)
                decay = torch.zeros(n, device=device)
                for inj in injections:
                    scale = init[inj].norm(dim=-1).clamp_min(1e-12)
                    decay = decay + weight_decay(deltas[inj], scale, settings.weight_decay)
                loss = nll + settings.kl_factor * kl + decay
                parts.clear()  # the parts of the last step are reported
                parts.update({"nll": nll.detach(), "kl": kl.detach(), "weight_decay": decay.detach()})
                if terms:
                    state = StepState(step, batch, n, attention, fact_key, template_rows)
                    loss = add_terms(terms, state, loss, parts)
            return loss

        def clamp_norms() -> None:
            for inj, d in deltas.items():
                clamp_norms_(d, settings.clamp_norm_factor * init[inj].norm(dim=-1))

        matmul = MATMUL_DTYPES.get(settings.matmul, model.dtype)
        precision: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if matmul != model.dtype:
            # the initial module outputs (what the targets are relative to) in the model's own precision
            with torch.no_grad(), Trace(model, list(names), retain_output=False, edit_output=inject):
                frozen.forward()
            precision = linear_precision(model, adapter, frozen.first_layer, matmul)
        with precision:
            result = adam_loop(
                list(deltas.values()),
                request_losses,
                lr=settings.lr,
                steps=settings.steps,
                early_stop_loss=settings.early_stop_loss,
                project=clamp_norms,
                units=request_ids,
                parts=parts,
            )

        for i, rid in enumerate(request_ids):
            out.steps[rid] = result.steps[i]
            out.final_loss[rid] = result.final_loss[i]
            out.loss_parts[rid] = request_parts(parts, i)
        for inj in injections:
            out.init[inj][request_ids] = init[inj].cpu()
            out.delta[inj][request_ids] = deltas[inj].detach().float().cpu()
