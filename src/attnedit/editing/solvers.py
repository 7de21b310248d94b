"""Keys, values and the closed-form weight updates of locate-then-edit methods.

``read_at_fact_token`` reads any module's input or output (a ``Site``) at the fact token of every (request,
template) prompt in one batched forward pass that stops after the highest module needed. The
solvers work in float64 (MEMIT's least squares, ROME's rank-one update), regularising singular or
ill-conditioned systems with a warning instead of failing or returning NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from attnedit.core.data import EditRequest
from attnedit.core.interventions import Trace
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import pad_batch
from attnedit.core.sites import Site
from attnedit.core.tokens import locate_subject, padding_id
from attnedit.editing.templates import template_prefix

logger = logging.getLogger(__name__)

# relative ridge added to a system that is not numerically positive definite
RIDGE = 1e-6
MAX_CONDITION = 1e12


@torch.no_grad()
def read_at_fact_token(
    bundle: ModelBundle,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    reads: Sequence[Site],
    max_rows: int = 128,
) -> dict[Site, torch.Tensor]:
    """``{site: [N requests, T templates, dim]}`` (float32) at each prompt's fact token.

    Prompts are cut after the fact token: later tokens cannot influence it in a causal model.
    """
    model, adapter, device = bundle.model, bundle.adapter, bundle.device
    tok = bundle.tokenizer
    pad_id = padding_id(tok)
    seqs = []
    for req in requests:
        for template in templates:
            span = locate_subject(tok, req.prompt, req.subject, prefix=template_prefix(template))
            seqs.append(span.input_ids[: span.last_token + 1])
    names = {read: read.module_name(adapter) for read in reads}
    found: dict[Site, list[torch.Tensor]] = {read: [] for read in reads}
    inputs = any(r.side == "input" for r in reads)
    for start in range(0, len(seqs), max_rows):
        chunk = seqs[start : start + max_rows]
        ids, mask = pad_batch(chunk, pad_id, left=False, device=device)
        last = torch.tensor([len(s) - 1 for s in chunk], device=device)
        rows = torch.arange(len(chunk), device=device)
        with Trace(model, list(names.values()), retain_input=inputs, detach=True, stop=True) as trace:
            model.base_model(input_ids=ids, attention_mask=mask)
        for read, name in names.items():
            value = trace[name].input if read.side == "input" else trace[name].hidden
            assert value is not None  # inputs are retained when a read is on the input side
            found[read].append(value[rows, last].float())
    n, t = len(requests), len(templates)
    return {read: torch.cat(parts).view(n, t, -1).cpu() for read, parts in found.items()}


def solve_spd(matrix: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    """``matrix^-1 rhs`` for a symmetric positive semi-definite ``matrix`` (float64, regularised)."""
    a = matrix.double()
    b = rhs.double()
    scale = a.diagonal().abs().mean().clamp_min(1e-30)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    ridge = 0.0
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(a + ridge * scale * eye)
        if int(info) == 0:
            diag = chol.diagonal()
            condition = float((diag.max() / diag.min().clamp_min(1e-300)) ** 2)
            if condition <= MAX_CONDITION:
                if ridge:
                    logger.warning(
                        "%s is singular or ill-conditioned; regularised with ridge %.1e x mean diagonal",
                        what,
                        ridge,
                    )
                x = torch.cholesky_solve(b if b.dim() > 1 else b[:, None], chol)
                return x if b.dim() > 1 else x[:, 0]
        ridge = RIDGE if ridge == 0.0 else ridge * 10
    raise FloatingPointError(f"{what} could not be regularised (non-finite values?)")


def rank_one_update(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    second_moment: torch.Tensor,
    key: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """ROME (paper eq. 2): ``Delta = (v* - W k* - b) (C^-1 k*)^T / ((C^-1 k*)^T k*)``, [out, in]."""
    w = weight.double()
    k = key.double().to(w.device)
    u = solve_spd(second_moment.to(w.device), k, "the key covariance C")
    current = w @ k + (bias.double() if bias is not None else 0.0)
    residual = target.double().to(w.device) - current
    return torch.outer(residual, u) / (u @ k)


def least_squares_update(
    second_moment: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, weight: float
) -> torch.Tensor:
    """MEMIT: ``Delta = R K^T (lambda C + K K^T)^-1``; keys [N, in], residuals [N, out] -> [out, in]."""
    k = keys.double()
    r = residuals.double().to(k.device)
    system = weight * second_moment.double().to(k.device) + k.T @ k
    adjusted = solve_spd(system, k.T, "lambda C + K K^T")  # [in, N]
    return r.T @ adjusted.T


def projected_update(
    projection: torch.Tensor,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    prior: torch.Tensor | None,
    l2: float,
) -> torch.Tensor:
    """AlphaEdit: ``Delta^T = (P (K K^T + C_prev) + l2 I)^-1 P K R^T``; keys [N, in], residuals [N, out],
    ``projection`` P and ``prior`` C_prev (the earlier edits' ``K K^T``, None: zero) [in, in] -> [out, in].

    The solution lies in P's range, so ``Delta k = 0`` for every key ``k`` orthogonal to it (the preserved
    directions; the solution is projected once more to keep that exact when P was rounded). The system is
    not symmetric: solved by an LU factorisation in float64."""
    if l2 <= 0:
        raise ValueError(f"the ridge l2 must be positive (got {l2}): P (K K^T + C) alone is singular")
    k = keys.double()
    r = residuals.double().to(k.device)
    p = projection.double().to(k.device)
    gram = k.T @ k
    if prior is not None:
        gram = gram + prior.double().to(k.device)
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    solution: torch.Tensor = torch.linalg.solve(p @ gram + l2 * eye, p @ k.T @ r)  # [in, out]
    # in exact arithmetic the solution is in P's range already; projecting it again removes the leak into
    # the preserved directions that a P rounded to float32 (as cached) would otherwise let through
    solution = p @ solution
    if not torch.isfinite(solution).all():
        raise FloatingPointError("the AlphaEdit update is not finite (non-finite keys or residuals?)")
    return solution.T
