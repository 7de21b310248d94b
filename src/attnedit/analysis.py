"""Where an edit acts and how it leaks: the analyses of the SADR paper's section 3 and ROME's causal tracing.

* Causal tracing (ROME): corrupt the subject's token embeddings with Gaussian noise, restore the CLEAN
  output of one module kind over a window of layers at one token, measure P(target) (``causal_trace``;
  ``layer_effects`` gives IntAttn-Edit's per-layer MLP and attention contributions).
* Contaminating substitution (SADR section 3.2, appendix D.1, figures 3 and 9): run the UNEDITED model
  with the EDITED model's module outputs copied in at (layer window, token) (``record_outputs`` on the
  edited model, then ``substitute_outputs`` on the unedited one).
* Attention drift (section 3.3, figure 4, table 2; appendix D.3, table 4): KL between the unedited and
  edited attention rows of the last token, the table factors and their Pearson correlation with P(o_edit)
  (``record_last_token_attention`` on each model, then the pure functions ``attention_drift``,
  ``drift_factors``, ``pearson``, ``correlate``).
* Attention patching (section 3.4 and appendix D.2, figures 5 and 10): run the EDITED model with the
  UNEDITED attention probabilities over a window of layers (``patch_attention``), or with only the
  pre-softmax score of the last token on one earlier token replaced (``patch_attention_scores``), after
  ``record_attention`` on the unedited model.

Edits are applied in place (``AppliedEdit.revert`` restores the weights), so every comparison of an unedited
and an edited model is two steps on ONE model: record on one side, apply or revert the edit, run the other.

Conventions: P(target) is the probability of the target's FIRST token at the prompt's last position
(ROME's measure; multi-token targets are scored by their first token). The prompts of one call are
left-padded into one batch (every row ends at the last column) and many intervention rows run in one
forward batch; token indices in results count from the prompt's own first token. A window of ``k`` layers
centred on layer ``l`` is ROME's ``[l - k // 2, l + ceil(k / 2))`` clipped to the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import scipy.stats
import torch

from attnedit.data import EditCase
from attnedit.interventions import (
    Trace,
    attention_probabilities,
    attention_softmax,
    main_tensor,
    replace_positions,
    start_at_layer,
)
from attnedit.metrics import comparisons
from attnedit.models import ModelBundle
from attnedit.sadr import drift_kl
from attnedit.scoring import pad_batch
from attnedit.tokens import encode_prompt, encode_target, locate_subject

logger = logging.getLogger(__name__)

TRACE_KINDS = ("layer", "mlp", "attn")  # module kinds whose output is a hidden state at every token
MEASURES = ("prob", "logit")
NOISE_FACTOR = 3.0  # ROME: noise std = 3 x the std of the embeddings

# the intervention of one chunk of rows: (global row indices, their prompts, batch column of the first
# position fed: > 0 when the positions before it come from a KV cache) -> context manager
Intervene = Callable[[torch.Tensor, torch.Tensor, int], contextlib.AbstractContextManager]


# --- shared machinery -------------------------------------------------------------------------------


def json_ready(value: Any) -> Any:
    """JSON-ready copy: arrays to nested lists, NaN/inf to None."""
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonResult:
    """Mixin of the result dataclasses: ``to_json()`` gives plain lists, numbers and strings."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: json_ready(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The ``window`` layers centred on ``layer`` (ROME's convention), clipped to ``0..n_layers - 1``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


@dataclass(frozen=True)
class _PromptBatch:
    """Prompts left-padded to one width: every row ends at the last column."""

    prompts: tuple[str, ...]
    ids: torch.Tensor  # [n, width]
    mask: torch.Tensor
    positions: torch.Tensor
    lengths: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def column(self, prompt: int, token: int) -> int:
        """Batch column of the prompt's ``token``-th token."""
        return self.width - self.lengths[prompt] + token

    def tokens(self, bundle: ModelBundle, prompt: int) -> list[str]:
        ids = self.ids[prompt, self.width - self.lengths[prompt] :].tolist()
        return [bundle.tokenizer.decode([i]) for i in ids]


def _encode(bundle: ModelBundle, prompts: Sequence[str]) -> _PromptBatch:
    if not prompts:
        raise ValueError("no prompts")
    encoded = [encode_prompt(bundle.tokenizer, p) for p in prompts]
    for p, ids in zip(prompts, encoded, strict=True):
        if not ids:
            raise ValueError(f"prompt {p!r} tokenises to nothing")
    pad = bundle.tokenizer.pad_token_id if bundle.tokenizer.pad_token_id is not None else 0
    ids, mask = pad_batch(encoded, pad, left=True, device=bundle.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return _PromptBatch(tuple(prompts), ids, mask, positions, tuple(len(e) for e in encoded))


def _target_ids(bundle: ModelBundle, batch: _PromptBatch, targets: Sequence[Sequence[str]]) -> torch.Tensor:
    """First token of each target after its prompt: ``[n_prompts, n_targets]``."""
    if len(targets) != len(batch.prompts) or len({len(t) for t in targets}) != 1:
        raise ValueError(
            "give one tuple of targets per prompt, all of the same length (e.g. (o_true, o_edit))"
        )
    rows = []
    for p, (prompt, wanted) in enumerate(zip(batch.prompts, targets, strict=True)):
        prompt_ids = batch.ids[p, batch.width - batch.lengths[p] :].tolist()
        rows.append([encode_target(bundle.tokenizer, prompt, t, prompt_ids)[0] for t in wanted])
    return torch.tensor(rows, device=bundle.device)


def _measure_rows(
    bundle: ModelBundle,
    batch: _PromptBatch,
    row_prompt: torch.Tensor,
    intervene: Intervene | None,
    targets: torch.Tensor | None,
    measure: str = "prob",
    batch_rows: int = 128,
    specs: Sequence[Restoration] | None = None,
) -> torch.Tensor | None:
    """Run rows (each a copy of prompt ``row_prompt[r]``) in chunks, each chunk under ``intervene``; return
    the measure of the targets at the last position, ``[n_rows, n_targets]`` (None without targets).

    ``specs`` (rows 0..n-1 being the plain rows of the n prompts, as every grid here builds them): a row
    whose restoration starts at block ``a`` and first touches batch column ``c`` changes nothing below
    block ``a`` and nothing before column ``c``. Rows are run grouped by ``(a, c)``: blocks ``0..a-1`` are
    skipped (``start_at_layer``, fed with what block ``a-1`` gave the plain row of the same prompt) and
    only columns ``c..`` are fed, the earlier ones coming from the plain rows' KV cache, all under the same
    intervention context. Equal to running everything, up to float rounding of the batch composition; a
    fraction of the work for windows centred on every layer and token."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, not {measure!r}")
    base, head = bundle.model.base_model, bundle.adapter.unembedding(bundle.model)
    n_rows, n = len(row_prompt), len(batch.prompts)
    keys = [(0, 0)] * n_rows
    if specs is not None:
        plain_rows = len(specs) == n_rows and not any(specs[p].layers for p in range(n))
        if not plain_rows or (row_prompt[:n] != torch.arange(n)).any():
            raise ValueError("specs must give every row, the first n being the plain rows of the n prompts")
        keys = [(0, 0)] * n + [
            (min(spec.layers, default=0), _first_column(spec, batch, int(p)))
            for spec, p in zip(specs[n:], row_prompt[n:].tolist(), strict=True)
        ]
    blocks = [bundle.adapter.module_name("layer", layer) for layer in range(bundle.adapter.n_layers)]
    values = torch.zeros(n_rows, targets.shape[1] if targets is not None else 0, device=batch.ids.device)
    # chunks: with specs the plain rows first (one chunk), then the rest grouped by (block, column)
    plain = specs is not None
    groups: dict[tuple[int, int], list[int]] = {}
    for row in range(n if plain else 0, n_rows):
        groups.setdefault(keys[row], []).append(row)
    chunks = [list(range(n))] if plain else []
    for _, rows_of_key in sorted(groups.items()):
        chunks += [rows_of_key[i : i + batch_rows] for i in range(0, len(rows_of_key), batch_rows)]
    lower: dict[str, object] = {}
    cache: Any = None
    for k, chunk in enumerate(chunks):
        start, column = keys[chunk[0]]
        recording = plain and k == 0  # the plain rows: record block outputs and the KV cache
        rows = torch.tensor(chunk)
        prompt = row_prompt[rows].to(batch.ids.device)
        contexts: list[contextlib.AbstractContextManager] = []
        if intervene is not None:
            contexts.append(intervene(rows, prompt, column))
        if recording:
            contexts.append(Trace(bundle.model, blocks, detach=True))
        elif start > 0:
            below = _rows_of(lower[blocks[start - 1]], prompt, n, column)
            contexts.append(start_at_layer(bundle.model, bundle.adapter, start, below))
        entered: list[tuple] = []
        with _together(*contexts, entered=entered):
            out = base(
                input_ids=batch.ids[prompt, column:],
                attention_mask=batch.mask[prompt],
                position_ids=batch.positions[prompt, column:],
                past_key_values=_cache_prefix(bundle, cache, prompt, column) if column else None,
                use_cache=recording or column > 0,
            )
        hidden = out.last_hidden_state[:, -1]
        if recording:
            trace = entered[0][-1]
            lower.update({name: trace[name].output for name in blocks})
            cache = out.past_key_values
        if targets is not None:
            logits = head(hidden).float()
            scores = logits.softmax(-1) if measure == "prob" else logits
            values[rows.to(values.device)] = scores.gather(1, targets[prompt])
    return values if targets is not None else None


def _first_column(spec: Restoration, batch: _PromptBatch, prompt: int) -> int:
    """The first batch column a row's restoration can change: its first token for module outputs; the last
    column for patches of the last query's attention; 0 (everything) for whole attention matrices."""
    if spec.kind in TRACE_KINDS:
        return min(batch.column(prompt, t) for t in spec.tokens)
    if spec.kind in ("last_query", "last_score"):
        return batch.width - 1
    return 0


def _cache_prefix(bundle: ModelBundle, cache: Any, prompt: torch.Tensor, column: int) -> Any:
    """A KV cache holding the plain rows' keys and values of columns ``0..column-1``, re-indexed to the
    rows ``prompt``."""
    from transformers import DynamicCache

    prefix = DynamicCache(config=bundle.model.config)
    for layer, entry in enumerate(cache.layers):
        prefix.update(entry.keys[prompt, :, :column], entry.values[prompt, :, :column], layer)
    return prefix


def _rows_of(output: object, prompt: torch.Tensor, n: int, column: int = 0) -> object:
    """A block's output object for the plain rows of all ``n`` prompts, re-indexed to the rows ``prompt``
    and the columns ``column..`` (the hidden states; other per-prompt tensors only by row)."""
    if isinstance(output, torch.Tensor):
        return output[prompt, column:]
    main, *rest = output  # type: ignore[misc]
    return (
        main[prompt, column:],
        *(x[prompt] if isinstance(x, torch.Tensor) and x.shape[0] == n else x for x in rest),
    )


def _record_outputs(
    bundle: ModelBundle, batch: _PromptBatch, kinds: Sequence[str], targets: torch.Tensor | None, measure: str
) -> tuple[dict[str, dict[int, torch.Tensor]], torch.Tensor | None]:
    """Module outputs ``kind -> layer -> [n_prompts, width, hidden]`` of a plain run, and its measure."""
    adapter = bundle.adapter
    names = {(k, layer): adapter.module_name(k, layer) for k in kinds for layer in range(adapter.n_layers)}
    traces: list[Trace] = []

    def retain(rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0) -> Trace:
        traces.append(Trace(bundle.model, list(names.values()), detach=True))
        return traces[-1]

    values = _measure_rows(bundle, batch, torch.arange(len(batch.prompts)), retain, targets, measure)
    outputs: dict[str, dict[int, torch.Tensor]] = {k: {} for k in kinds}
    for (kind, layer), name in names.items():
        outputs[kind][layer] = torch.cat([t[name].hidden for t in traces])
    return outputs, values


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    bad = [k for k in kinds if k not in TRACE_KINDS]
    if bad or not kinds:
        raise ValueError(f"module kinds must be among {TRACE_KINDS}, not {list(kinds)}")
    return tuple(dict.fromkeys(kinds))


@dataclass(frozen=True)
class Restoration:
    """What one row copies in: the recorded values of ``kind`` (a module kind, or an attention patch kind)
    at every (layer, token) of ``layers`` x ``tokens``; the empty restoration copies nothing."""

    kind: str = "layer"
    layers: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()


def _group(
    specs: Sequence[Restoration], rows: torch.Tensor, prompt: torch.Tensor, batch: _PromptBatch
) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """``(kind, layer) -> (chunk rows, batch columns)`` of every (layer, token) the chunk's specs name."""
    where: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for local, (row, p) in enumerate(zip(rows.tolist(), prompt.tolist(), strict=True)):
        spec = specs[row]
        for layer in spec.layers:
            at_rows, at_cols = where.setdefault((spec.kind, layer), ([], []))
            at_rows.extend([local] * len(spec.tokens))
            at_cols.extend(batch.column(p, token) for token in spec.tokens)
    device = prompt.device
    return {
        key: (
            torch.tensor(r, dtype=torch.long, device=device),
            torch.tensor(c, dtype=torch.long, device=device),
        )
        for key, (r, c) in where.items()
    }


def _restore(
    bundle: ModelBundle,
    batch: _PromptBatch,
    source: dict[str, dict[int, torch.Tensor]],
    specs: Sequence[Restoration],
) -> Intervene:
    """The intervention that writes ``source[kind][layer][prompt, column]`` into each row as ``specs`` say."""

    def intervene(rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0) -> Trace:
        edits = {
            bundle.adapter.module_name(kind, layer): replace_positions(
                r, c - offset, source[kind][layer][prompt[r], c]
            )
            for (kind, layer), (r, c) in _group(specs, rows, prompt, batch).items()
        }
        return Trace(bundle.model, list(edits), retain_output=False, edit_output=lambda y, n: edits[n](y))

    return intervene


@contextlib.contextmanager
def _together(*contexts: contextlib.AbstractContextManager, entered: list | None = None) -> Iterator[None]:
    """Several context managers as one; ``entered`` collects what they returned (one tuple per chunk)."""
    with contextlib.ExitStack() as stack:
        values = tuple(stack.enter_context(context) for context in contexts)
        if entered is not None:
            entered.append(values)
        yield


def _token_grid(
    batch: _PromptBatch, n_layers: int, window: int, kinds: Sequence[str]
) -> tuple[list[Restoration], torch.Tensor]:
    """Rows and their prompts: one plain row per prompt, then per kind, prompt, centre layer and token the
    restoration of the window of layers at that token."""
    specs, prompts = [Restoration()] * len(batch.prompts), list(range(len(batch.prompts)))
    for kind in kinds:
        for p, length in enumerate(batch.lengths):
            for layer in range(n_layers):
                span = window_layers(layer, window, n_layers)
                specs.extend(Restoration(kind, span, (token,)) for token in range(length))
                prompts.extend([p] * length)
    return specs, torch.tensor(prompts)


def _split_grid(
    values: torch.Tensor, batch: _PromptBatch, n_layers: int, kinds: Sequence[str]
) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """Inverse of ``_token_grid``: base ``[n, K]`` and per kind, per prompt ``[n_layers, n_tokens, K]``."""
    array = values.double().cpu().numpy()
    n = len(batch.prompts)
    base, at, per_kind = array[:n], n, {}
    for kind in kinds:
        per_kind[kind] = []
        for length in batch.lengths:
            size = n_layers * length
            per_kind[kind].append(array[at : at + size].reshape(n_layers, length, -1))
            at += size
    return base, per_kind


# --- 1. causal tracing (ROME) -----------------------------------------------------------------------


def embedding_noise_scale(bundle: ModelBundle, factor: float = NOISE_FACTOR) -> float:
    """ROME's noise level: ``factor`` x the standard deviation of the token embedding matrix's entries."""
    weight = bundle.adapter.module(bundle.model, "embed").weight
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
    batch = _encode(bundle, [span.text])
    if list(span.input_ids) != batch.ids[0].tolist():
        raise ValueError(f"subject location and prompt encoding disagree for {span.text!r}")
    target_ids = _target_ids(bundle, batch, [(target,)])
    kinds = tuple(dict.fromkeys(r.kind for r in restorations if r.layers))
    clean_outputs, clean = _record_outputs(
        bundle, batch, _check_kinds(kinds) if kinds else (), target_ids, measure
    )
    restore = _restore(bundle, batch, clean_outputs, restorations)
    scale = embedding_noise_scale(bundle) if noise is None else float(noise)
    subject_cols = torch.arange(span.first_token, span.last_token + 1, device=bundle.device)
    embed = bundle.adapter.module_name("embed")
    row_prompt = torch.zeros(len(restorations), dtype=torch.long)
    total = torch.zeros(len(restorations), dtype=torch.float64, device=bundle.device)
    for draw in subject_noise(bundle, len(subject_cols), samples, scale, seed):

        def intervene(
            rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0, noised=_noised(subject_cols, draw)
        ):
            corrupt = Trace(bundle.model, [embed], retain_output=False, edit_output=noised)
            return _together(corrupt, restore(rows, prompt))

        values = _measure_rows(bundle, batch, row_prompt, intervene, target_ids, measure, batch_rows)
        total += values[:, 0].double()  # type: ignore[index]
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
        clean=float(clean[0, 0]),  # type: ignore[index]
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
    kinds = _check_kinds(kinds)
    n_layers = bundle.adapter.n_layers
    batch = _encode(bundle, [locate_subject(bundle.tokenizer, prompt, subject).text])
    grid, _ = _token_grid(batch, n_layers, window, kinds)
    run = trace_restorations(bundle, prompt, subject, target, grid, noise, samples, seed, measure, batch_rows)
    corrupted, restored = _split_grid(torch.from_numpy(run.values)[:, None], batch, n_layers, kinds)
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


# --- prompts of the specificity tasks -----------------------------------------------------------------


@dataclass(frozen=True)
class SpecificityPrompts:
    """Prompts of an edit case's specificity tasks with their (o_true, o_edit) targets."""

    subject: str  # the edited subject (in the prompt, or in the prepended edit sentence)
    metrics: tuple[str, ...]  # per prompt: DNS (Distract Neighborhood), RS (Relation), ...
    prompts: tuple[str, ...]
    targets: tuple[tuple[str, str], ...]


def specificity_prompts(case: EditCase, metrics: Sequence[str] = ("DNS", "RS")) -> SpecificityPrompts:
    """The prompts the metric table scores for ``metrics`` (``metrics.comparisons``): the distracted
    prompt is ``"{request prompt} {o_new}. {neighbour prompt}"``; targets are (o_true, o_edit)."""
    chosen = [c for c in comparisons(case) if c.metric in metrics]
    return SpecificityPrompts(
        subject=case.request.subject,
        metrics=tuple(c.metric for c in chosen),
        prompts=tuple(c.prompt for c in chosen),
        targets=tuple((c.right, c.wrong) for c in chosen),
    )


# --- 2. contaminating substitution (SADR section 3.2) ------------------------------------------------


@dataclass
class RecordedOutputs:
    """Module outputs of one model over prompts (left-padded as every function here pads them)."""

    prompts: tuple[str, ...]
    kinds: tuple[str, ...]
    outputs: dict[str, dict[int, torch.Tensor]]  # kind -> layer -> [n_prompts, width, hidden]


@torch.inference_mode()
def record_outputs(
    bundle: ModelBundle, prompts: Sequence[str], kinds: Sequence[str] = TRACE_KINDS
) -> RecordedOutputs:
    """Record every layer's output of each module kind at every token (run it with the edit applied)."""
    kinds = _check_kinds(kinds)
    outputs, _ = _record_outputs(bundle, _encode(bundle, prompts), kinds, None, "prob")
    return RecordedOutputs(tuple(prompts), kinds, outputs)


@dataclass
class InterventionEffects(JsonResult):
    """P(targets) of prompts without (``base``) and with an intervention per (window centre, [token]).

    ``values[i]`` is ``[n_layers, n_tokens_i, n_targets]`` for token-wise interventions, ``[n_layers,
    n_targets]`` for layer-only ones; ``effects`` = values - base (the paper's tracing effect)."""

    analysis: str
    prompts: list[str]
    targets: list[list[str]]
    tokens: list[list[str]]
    window: int
    base: np.ndarray  # [n_prompts, n_targets]
    values: list[np.ndarray]
    effects: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.effects = [v - b for v, b in zip(self.values, self.base, strict=True)]


@torch.inference_mode()
def substitute_outputs(
    bundle: ModelBundle,
    recorded: RecordedOutputs,
    targets: Sequence[Sequence[str]],
    window: int = 6,
    kinds: Sequence[str] | None = None,
    batch_rows: int = 128,
) -> dict[str, InterventionEffects]:
    """Contaminating substitution (SADR section 3.2): run the current (unedited) model on the recorded
    prompts with the recorded (edited) outputs of a module kind copied in over the window of layers
    centred on each layer, at each token; P of each prompt's targets (e.g. (o_true, o_edit)) per kind."""
    kinds = _check_kinds(kinds or recorded.kinds)
    missing = [k for k in kinds if k not in recorded.outputs]
    if missing:
        raise ValueError(f"outputs of {missing} were not recorded")
    batch = _encode(bundle, recorded.prompts)
    if recorded.outputs[kinds[0]][0].shape[1] != batch.width:
        raise ValueError("the recorded outputs belong to other prompts or another tokenizer")
    n_layers = bundle.adapter.n_layers
    specs, row_prompt = _token_grid(batch, n_layers, window, kinds)
    intervene = _restore(bundle, batch, recorded.outputs, specs)
    values = _measure_rows(
        bundle, batch, row_prompt, intervene, _target_ids(bundle, batch, targets), "prob", batch_rows, specs
    )
    base, per_kind = _split_grid(values, batch, n_layers, kinds)  # type: ignore[arg-type]
    tokens = [batch.tokens(bundle, p) for p in range(len(batch.prompts))]
    return {
        kind: InterventionEffects(
            analysis=f"contaminating_substitution:{kind}",
            prompts=list(batch.prompts),
            targets=[list(t) for t in targets],
            tokens=tokens,
            window=window,
            base=base,
            values=per_kind[kind],
        )
        for kind in kinds
    }


# --- 3. attention drift (SADR section 3.3, appendix D.3) ---------------------------------------------


@dataclass
class LastTokenAttention(JsonResult):
    """The last token's attention rows and hidden states of one model over prompts.

    ``attention[i, layer, head, t]`` is the weight of prompt i's last token on its token t (zero beyond
    ``lengths[i]``); ``hidden[i, layer]`` the last token's output of block ``layer``; ``subject_last[i]``
    the edited subject's last token (its first occurrence in the prompt; -1 without subjects);
    ``target_probs[i]`` P of the prompt's targets when they were given."""

    prompts: list[str]
    lengths: np.ndarray  # [n]
    subject_last: np.ndarray  # [n]
    attention: np.ndarray  # [n, n_layers, n_heads, max_length]
    hidden: np.ndarray  # [n, n_layers, hidden]
    target_probs: np.ndarray | None = None  # [n, n_targets]


def _subject_last(
    bundle: ModelBundle, batch: _PromptBatch, subjects: str | Sequence[str] | None
) -> np.ndarray:
    n = len(batch.prompts)
    if subjects is None:
        return np.full(n, -1)
    per_prompt = [subjects] * n if isinstance(subjects, str) else list(subjects)
    if len(per_prompt) != n:
        raise ValueError(f"{len(per_prompt)} subjects for {n} prompts")
    last = []
    for prompt, subject, length in zip(batch.prompts, per_prompt, batch.lengths, strict=True):
        span = locate_subject(bundle.tokenizer, prompt, subject)
        if span.text != prompt or len(span.input_ids) != length:
            raise ValueError(f"subject {subject!r}: give prompts as plain text containing it, not {prompt!r}")
        last.append(span.last_token)
    return np.array(last)


@torch.inference_mode()
def record_last_token_attention(
    bundle: ModelBundle,
    prompts: Sequence[str],
    subjects: str | Sequence[str] | None = None,
    targets: Sequence[Sequence[str]] | None = None,
    batch_rows: int = 64,
) -> LastTokenAttention:
    """One pass per batch of prompts: the last token's attention rows (every layer, per query head), its block
    outputs and P of the ``targets``; ``subjects`` (one for all prompts or one per prompt) locates the
    edited subject's last token. Run it once on the unedited and once on the edited model."""
    batch = _encode(bundle, prompts)
    adapter, width = bundle.adapter, batch.width
    layer_names = [adapter.module_name("layer", layer) for layer in range(adapter.n_layers)]
    entered: list[tuple] = []

    def intervene(
        rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0
    ) -> contextlib.AbstractContextManager:
        query = torch.full((len(rows),), width - 1, device=prompt.device)
        last = Trace(bundle.model, layer_names, detach=True, reduce_output=lambda y, n: main_tensor(y)[:, -1])
        return _together(attention_probabilities(bundle.model, adapter, query=query), last, entered=entered)

    target_ids = _target_ids(bundle, batch, targets) if targets is not None else None
    values = _measure_rows(
        bundle, batch, torch.arange(len(prompts)), intervene, target_ids, "prob", batch_rows
    )
    rows = torch.cat(
        [torch.stack([view[layer] for layer in range(adapter.n_layers)], dim=1) for view, _ in entered]
    )  # [n, layers, heads, width]
    lengths = np.array(batch.lengths)
    attention = np.zeros((len(prompts), adapter.n_layers, adapter.n_heads, int(lengths.max())))
    for p, length in enumerate(batch.lengths):
        attention[p, ..., :length] = rows[p, ..., width - length :].double().cpu().numpy()
    hidden = torch.cat([torch.stack([t[n].output for n in layer_names], dim=1) for _, t in entered])
    return LastTokenAttention(
        prompts=list(prompts),
        lengths=lengths,
        subject_last=_subject_last(bundle, batch, subjects),
        attention=attention,
        hidden=hidden.double().cpu().numpy(),
        target_probs=values.double().cpu().numpy() if values is not None else None,
    )


def _check_pair(unedited: LastTokenAttention, edited: LastTokenAttention) -> None:
    if (
        unedited.prompts != edited.prompts
        or unedited.attention.shape != edited.attention.shape
        or not np.array_equal(unedited.subject_last, edited.subject_last)
    ):
        raise ValueError(
            "unedited and edited recordings must cover the same prompts, subjects and model shape"
        )


def attention_drift(unedited: LastTokenAttention, edited: LastTokenAttention) -> np.ndarray:
    """KL(W_lh || W*_lh) of the last token's attention row per prompt, layer and query head ``[n, L, H]``
    (W unedited, W* edited; the quantity SADR's equation 2 restrains and figure 4 correlates)."""
    _check_pair(unedited, edited)
    return drift_kl(torch.from_numpy(unedited.attention), torch.from_numpy(edited.attention)).numpy()


FACTORS = (
    "kl",
    "subject_max_head",
    "other_max_head",
    "subject_all_heads",
    "hidden_norm",
    "hidden_distance",
    "hidden_cosine",
)


@dataclass
class DriftFactors(JsonResult):
    """Per prompt, the factors the SADR paper correlates with P(o_edit); s is the edited subject's last
    token, W/W* the unedited/edited last-token attention rows, h/h* the last token's block outputs."""

    layers: list[int]  # the layers l the sums run over
    hidden_layer: int  # the block whose output h is
    kl: np.ndarray  # figure 4, table 4 "attention drift": sum_l sum_h KL(W_lh || W*_lh)
    subject_max_head: np.ndarray  # table 2 (1): sum_l max_h |W_lh[s] - W*_lh[s]|
    other_max_head: np.ndarray  # table 2 (2): sum_l max_h ||W_lh[\s] - W*_lh[\s]||_2 (other tokens)
    subject_all_heads: np.ndarray  # table 2 (3): sum_l sum_h |W_lh[s] - W*_lh[s]|
    hidden_norm: np.ndarray  # table 4: ||h*||
    hidden_distance: np.ndarray  # table 4: ||h - h*||
    hidden_cosine: np.ndarray  # table 4: cos(h, h*)


def drift_factors(
    unedited: LastTokenAttention,
    edited: LastTokenAttention,
    layers: Sequence[int] | None = None,
    hidden_layer: int = -1,
) -> DriftFactors:
    """The table 2 and table 4 factors (and figure 4's KL sum) over ``layers`` (default all; the paper
    restricts l to the layers whose attention matters); hidden states of block ``hidden_layer`` (the last)."""
    _check_pair(unedited, edited)
    if np.any(unedited.subject_last < 0):
        raise ValueError("the drift factors need the edited subject: record with subjects=...")
    n_layers = unedited.attention.shape[1]
    chosen = list(range(n_layers)) if layers is None else list(layers)
    delta = unedited.attention[:, chosen] - edited.attention[:, chosen]  # [n, L', H, K]
    rows, s = np.arange(len(delta)), unedited.subject_last
    on_subject = np.abs(delta[rows, :, :, s])  # [n, L', H]
    others = delta.copy()
    others[rows, :, :, s] = 0.0
    h, h_edited = unedited.hidden[:, hidden_layer], edited.hidden[:, hidden_layer]
    norm, norm_edited = np.linalg.norm(h, axis=-1), np.linalg.norm(h_edited, axis=-1)
    return DriftFactors(
        layers=chosen,
        hidden_layer=hidden_layer % unedited.hidden.shape[1],
        kl=attention_drift(unedited, edited)[:, chosen].sum(axis=(1, 2)),
        subject_max_head=on_subject.max(axis=2).sum(axis=1),
        other_max_head=np.linalg.norm(others, axis=-1).max(axis=2).sum(axis=1),
        subject_all_heads=on_subject.sum(axis=(1, 2)),
        hidden_norm=norm_edited,
        hidden_distance=np.linalg.norm(h - h_edited, axis=-1),
        hidden_cosine=(h * h_edited).sum(-1) / (norm * norm_edited),
    )


@dataclass(frozen=True)
class Correlation(JsonResult):
    """Pearson's r with its two-sided p-value over n pairs."""

    r: float
    p: float
    n: int


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Pearson's r and the two-sided p-value of the t-test with n - 2 degrees of freedom
    (t = r sqrt((n - 2) / (1 - r^2))). NaN for fewer than 3 pairs or a constant input."""
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson needs paired values, got {a.shape} and {b.shape}")
    n = len(a)
    if n < 3:
        logger.warning("Pearson correlation undefined for %d pairs", n)
        return Correlation(math.nan, math.nan, n)
    da, db = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(da @ da) * float(db @ db))
    if denominator == 0.0:
        logger.warning("Pearson correlation undefined for a constant input")
        return Correlation(math.nan, math.nan, n)
    r = float(np.clip(float(da @ db) / denominator, -1.0, 1.0))
    if abs(r) == 1.0:
        return Correlation(r, 0.0, n)
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return Correlation(r, float(2.0 * scipy.stats.t.sf(abs(t), n - 2)), n)


def correlate(factors: DriftFactors, outcome: Sequence[float] | np.ndarray) -> dict[str, Correlation]:
    """Pearson correlation of every factor with ``outcome`` per prompt (the paper: edited P(o_edit))."""
    return {name: pearson(getattr(factors, name), outcome) for name in FACTORS}


# --- 4. attention patching (SADR section 3.4, appendix D.2) ------------------------------------------

PATCH_QUERIES = ("all", "last")


@dataclass
class RecordedAttention:
    """Attention scores (before the softmax, mask added) and probabilities of one model over prompts, every
    layer, ``[n_prompts, query_head, width, width]`` (left-padded as every function here pads them)."""

    prompts: tuple[str, ...]
    scores: dict[int, torch.Tensor]
    probabilities: dict[int, torch.Tensor]


@torch.inference_mode()
def record_attention(bundle: ModelBundle, prompts: Sequence[str], batch_rows: int = 64) -> RecordedAttention:
    """Record every layer's attention scores and probabilities (run it on the unedited model)."""
    batch = _encode(bundle, prompts)
    entered: list[tuple] = []

    def intervene(
        rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0
    ) -> contextlib.AbstractContextManager:
        return _together(attention_softmax(bundle.model, bundle.adapter), entered=entered)

    _measure_rows(bundle, batch, torch.arange(len(prompts)), intervene, None, "prob", batch_rows)
    layers = range(bundle.adapter.n_layers)
    return RecordedAttention(
        prompts=tuple(prompts),
        scores={layer: torch.cat([e[0].scores[layer] for e in entered]) for layer in layers},
        probabilities={layer: torch.cat([e[0].probabilities[layer] for e in entered]) for layer in layers},
    )


PATCH_KINDS = ("probabilities", "last_query", "last_score")


def _patch(
    bundle: ModelBundle,
    batch: _PromptBatch,
    recorded: RecordedAttention,
    targets: Sequence[Sequence[str]],
    kind: str,
    specs: Sequence[Restoration],
    row_prompt: torch.Tensor,
    batch_rows: int,
) -> torch.Tensor:
    """Measure rows run with recorded attention patched in at each spec's layers. ``kind``: ``probabilities``
    replaces every query row, ``last_query`` the query row of the spec's token, ``last_score`` the last
    query's pre-softmax score on the spec's token."""
    if kind not in PATCH_KINDS:
        raise ValueError(f"patch kind must be one of {PATCH_KINDS}, not {kind!r}")
    if recorded.prompts != batch.prompts or recorded.probabilities[0].shape[-1] != batch.width:
        raise ValueError(
            "the recorded attention belongs to other prompts (record_attention on the same ones)"
        )

    def intervene(
        rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0
    ) -> contextlib.AbstractContextManager:
        where = {layer: at for (_, layer), at in _group(specs, rows, prompt, batch).items()}

        def replace(x: torch.Tensor, layer: int) -> torch.Tensor:
            if layer not in where:
                return x
            r, c = where[layer]
            out = x.clone()
            if kind == "probabilities":
                out[r] = recorded.probabilities[layer][prompt[r]].to(out.dtype)
            elif kind == "last_query":
                out[r, :, c - offset] = recorded.probabilities[layer][prompt[r], :, c].to(out.dtype)
            else:
                out[r, :, -1, c] = recorded.scores[layer][prompt[r], :, -1, c].to(out.dtype)
            return out

        if kind == "last_score":
            return attention_softmax(bundle.model, bundle.adapter, edit_scores=replace, retain=False)
        return attention_softmax(bundle.model, bundle.adapter, edit_probabilities=replace, retain=False)

    target_ids = _target_ids(bundle, batch, targets)
    return _measure_rows(bundle, batch, row_prompt, intervene, target_ids, "prob", batch_rows, specs)  # type: ignore[return-value]


@torch.inference_mode()
def patch_attention(
    bundle: ModelBundle,
    recorded: RecordedAttention,
    targets: Sequence[Sequence[str]],
    window: int = 10,
    queries: str = "all",
    batch_rows: int = 128,
) -> InterventionEffects:
    """Attention patching (SADR section 3.4, figure 5): run the current (edited) model with the recorded
    (unedited) attention probabilities over the window of layers centred on each layer; ``queries="all"``
    patches whole attention matrices (the paper), ``"last"`` only the last token's row.
    ``values[i]`` is ``[n_layers, n_targets]``: P of each target against the window's centre."""
    if queries not in PATCH_QUERIES:
        raise ValueError(f"queries must be one of {PATCH_QUERIES}, not {queries!r}")
    batch = _encode(bundle, recorded.prompts)
    n, n_layers = len(batch.prompts), bundle.adapter.n_layers
    kind = "probabilities" if queries == "all" else "last_query"
    centres = [(p, layer) for p in range(n) for layer in range(n_layers)]
    specs = [Restoration()] * n + [
        Restoration(kind, window_layers(layer, window, n_layers), (batch.lengths[p] - 1,))
        for p, layer in centres
    ]
    row_prompt = torch.tensor(list(range(n)) + [p for p, _ in centres])
    values = (
        _patch(bundle, batch, recorded, targets, kind, specs, row_prompt, batch_rows).double().cpu().numpy()
    )
    curves = values[n:].reshape(n, n_layers, -1)
    return InterventionEffects(
        analysis=f"attention_patching:{queries}",
        prompts=list(batch.prompts),
        targets=[list(t) for t in targets],
        tokens=[batch.tokens(bundle, p) for p in range(n)],
        window=window,
        base=values[:n],
        values=list(curves),
    )


@torch.inference_mode()
def patch_attention_scores(
    bundle: ModelBundle,
    recorded: RecordedAttention,
    targets: Sequence[Sequence[str]],
    window: int = 10,
    batch_rows: int = 128,
) -> InterventionEffects:
    """Single-entry attention patching (SADR appendix D.2, figure 10): run the current (edited) model with
    only the last token's pre-softmax score on token t replaced by the recorded (unedited) one, over the
    window of layers centred on each layer. ``values[i]`` is ``[n_layers, n_tokens_i, n_targets]``."""
    batch = _encode(bundle, recorded.prompts)
    n_layers = bundle.adapter.n_layers
    specs, row_prompt = _token_grid(batch, n_layers, window, ("last_score",))
    values = _patch(bundle, batch, recorded, targets, "last_score", specs, row_prompt, batch_rows)
    base, per_kind = _split_grid(values, batch, n_layers, ("last_score",))
    return InterventionEffects(
        analysis="attention_patching:last_score",
        prompts=list(batch.prompts),
        targets=[list(t) for t in targets],
        tokens=[batch.tokens(bundle, p) for p in range(len(batch.prompts))],
        window=window,
        base=base,
        values=per_kind["last_score"],
    )
