"""Causal tracing (ROME): noise the subject's embeddings, restore one module kind's clean output over a
window of layers at one token, measure P(target) (``causal_trace``, ``layer_effects``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from attnedit.analysis.engine import (
    NOISE_FACTOR,
    TRACE_KINDS,
    JsonResult,
    Restoration,
    check_kinds,
    encode_prompts,
    first_target_ids,
    measure_rows,
    record_module_outputs,
    restorer,
    split_grid,
    together,
    token_grid,
    window_layers,
)
from attnedit.core.adapters import module_weight
from attnedit.core.interventions import EditFn, Trace
from attnedit.core.models import ModelBundle
from attnedit.core.tokens import locate_subject

logger = logging.getLogger(__name__)


def embedding_noise_scale(bundle: ModelBundle, factor: float = NOISE_FACTOR) -> float:
    """ROME's noise level: ``factor`` x the standard deviation of the token embedding matrix's entries."""
    weight = module_weight(bundle.adapter.module(bundle.model, "embed"))
    return factor * float(weight.detach().float().std())


def subject_noise(bundle: ModelBundle, n_tokens: int, samples: int, scale: float, seed: int) -> torch.Tensor:
    """The seeded Gaussian noise added to the subject's embeddings: ``[samples, n_tokens, hidden]``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, n_tokens, bundle.adapter.hidden_size), generator=generator) * scale
    return noise.to(bundle.device)


def _noised(columns: torch.Tensor, noise: torch.Tensor) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """Trace edit adding ``noise`` ``[len(columns), hidden]`` at ``columns`` of every row."""

    def edit(y: torch.Tensor, name: str) -> torch.Tensor:
        out = y.clone()
        out[:, columns] = out[:, columns] + noise.to(out.dtype)
        return out

    return edit


@dataclass
class CorruptedPrompt(JsonResult):
    """A prompt whose subject embeddings are noised (ROME): what every tracing result of it records."""

    prompt: str
    subject: str
    target: str
    tokens: list[str]
    subject_first: int
    subject_last: int
    noise: float
    samples: int
    measure: str
    clean: float  # the uncorrupted run


@dataclass
class RestorationRun(CorruptedPrompt):
    """P(target) (or its logit) under restorations of a subject-corrupted prompt, mean over noise samples."""

    values: np.ndarray  # [n_restorations]


@torch.inference_mode()
def trace_restorations(
    bundle: ModelBundle,
    prompt: str,
    subject: str,
    target: str,
    restorations: Sequence[Restoration],
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    measure: str = "prob",
    batch_rows: int = 128,
) -> RestorationRun:
    """Corrupt the subject's token embeddings (same noise in every row of a sample), restore the clean module
    outputs each ``Restoration`` names, and measure the target; the mean over ``samples`` noise draws.

    An empty restoration gives the corrupted run. ``noise`` is the noise std (default
    ``embedding_noise_scale``); ``measure`` is ``prob`` (ROME) or ``logit`` (the target's logit).
    """
    span = locate_subject(bundle.tokenizer, prompt, subject)
    batch = encode_prompts(bundle, [span.text])
    if list(span.input_ids) != batch.ids[0].tolist():
        raise ValueError(f"subject location and prompt encoding disagree for {span.text!r}")
    target_ids = first_target_ids(bundle, batch, [(target,)])
    kinds = tuple(dict.fromkeys(r.kind for r in restorations if r.layers))
    clean_outputs, clean = record_module_outputs(
        bundle, batch, check_kinds(kinds) if kinds else (), target_ids, measure
    )
    assert clean is not None  # measured: there are targets
    restore = restorer(bundle, batch, clean_outputs, restorations)
    scale = embedding_noise_scale(bundle) if noise is None else float(noise)
    subject_cols = torch.arange(span.first_token, span.last_token + 1, device=bundle.device)
    embed = bundle.adapter.module_name("embed")
    row_prompt = torch.zeros(len(restorations), dtype=torch.long)
    total = torch.zeros(len(restorations), dtype=torch.float64, device=bundle.device)
    for draw in subject_noise(bundle, len(subject_cols), samples, scale, seed):

        def intervene(
            rows: torch.Tensor,
            prompt: torch.Tensor,
            offset: int = 0,
            noised: EditFn = _noised(subject_cols, draw),
        ) -> contextlib.AbstractContextManager[None]:
            corrupt = Trace(bundle.model, [embed], retain_output=False, edit_output=noised)
            return together(corrupt, restore(rows, prompt, offset))  # offset: 0 (no specs: every row is fed)

        values = measure_rows(bundle, batch, row_prompt, intervene, target_ids, measure, batch_rows)
        total += values[:, 0].double()
    return RestorationRun(
        prompt=span.text,
        subject=subject,
        target=target,
        tokens=batch.tokens(bundle, 0),
        subject_first=span.first_token,
        subject_last=span.last_token,
        noise=scale,
        samples=samples,
        measure=measure,
        clean=float(clean[0, 0]),
        values=(total / samples).cpu().numpy(),
    )


@dataclass
class CausalTrace(CorruptedPrompt):
    """ROME's causal trace of one prompt: ``restored[kind][layer, token]`` is the measure after restoring
    the clean output of ``kind`` over the window centred on ``layer`` at ``token``."""

    kinds: list[str]
    window: int
    corrupted: float
    restored: dict[str, np.ndarray]  # kind -> [n_layers, n_tokens]
    effects: dict[str, np.ndarray] = field(init=False)  # indirect effects: restored - corrupted

    def __post_init__(self) -> None:
        self.effects = {kind: values - self.corrupted for kind, values in self.restored.items()}


def causal_trace(
    bundle: ModelBundle,
    prompt: str,
    subject: str,
    target: str,
    kinds: Sequence[str] = TRACE_KINDS,
    window: int = 1,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    measure: str = "prob",
    batch_rows: int = 128,
) -> CausalTrace:
    """ROME's causal tracing of ``target`` after ``prompt`` (a ``{}`` template or a text with ``subject``):
    every (layer, token) of every module kind; the restorations of a noise sample share forward batches."""
    kinds = check_kinds(kinds)
    n_layers = bundle.adapter.n_layers
    batch = encode_prompts(bundle, [locate_subject(bundle.tokenizer, prompt, subject).text])
    grid, _ = token_grid(batch, n_layers, window, kinds)
    run = trace_restorations(bundle, prompt, subject, target, grid, noise, samples, seed, measure, batch_rows)
    corrupted, restored = split_grid(torch.from_numpy(run.values)[:, None], batch, n_layers, kinds)
    return CausalTrace(
        **{f.name: getattr(run, f.name) for f in fields(CorruptedPrompt)},
        kinds=list(kinds),
        window=window,
        corrupted=float(corrupted[0, 0]),
        restored={kind: values[0][..., 0] for kind, values in restored.items()},
    )


def layer_effects(result: CausalTrace, at: str = "subject_last") -> dict[str, np.ndarray]:
    """Per module kind, each layer's indirect effect ``[n_layers]`` (restored minus corrupted).

    ``at="subject_last"``: at the subject's last token (ROME's fact token, where IntAttn-Edit reads its
    keys); ``at="subject_max"``: the maximum over the subject's tokens.
    """
    span = slice(result.subject_first, result.subject_last + 1)
    if at == "subject_last":
        return {kind: e[:, result.subject_last].copy() for kind, e in result.effects.items()}
    if at == "subject_max":
        return {kind: e[:, span].max(axis=1) for kind, e in result.effects.items()}
    raise ValueError(f"at must be 'subject_last' or 'subject_max', not {at!r}")


def subject_last_effects(
    bundle: ModelBundle,
    prompt: str,
    subject: str,
    target: str,
    layers: dict[str, Sequence[int]],
    window: int = 1,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    measure: str = "prob",
    batch_rows: int = 128,
) -> tuple[dict[str, np.ndarray], RestorationRun]:
    """``layer_effects(causal_trace(...), "subject_last")`` restricted to the ``{kind: layers}`` asked for:
    only the subject's last token is restored, so the cost is one row per (kind, layer), not the whole
    (layer, token) grid. Returns each kind's effects in the order of its layers, and the run (row 0:
    the corrupted prompt)."""
    kinds = check_kinds(tuple(layers))
    last = locate_subject(bundle.tokenizer, prompt, subject).last_token
    n_layers = bundle.adapter.n_layers
    rows = [Restoration()] + [
        Restoration(kind, window_layers(layer, window, n_layers), (last,))
        for kind in kinds
        for layer in layers[kind]
    ]
    run = trace_restorations(bundle, prompt, subject, target, rows, noise, samples, seed, measure, batch_rows)
    effects, at = {}, 1
    for kind in kinds:
        effects[kind] = run.values[at : at + len(layers[kind])] - run.values[0]
        at += len(layers[kind])
    return effects, run
