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
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, overload

import numpy as np
import torch

from attnedit.core.hf_compat import forward_with_cache, output_cache, slice_cache
from attnedit.core.interventions import (
    Trace,
    replace_positions,
    start_at_layer,
)
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import pad_batch
from attnedit.core.sites import HIDDEN_STATE_COMPONENTS, Site
from attnedit.core.tokens import encode_prompt, encode_target, padding_id

logger = logging.getLogger(__name__)


TRACE_KINDS = HIDDEN_STATE_COMPONENTS  # module kinds (site components) whose output is a hidden state
MEASURES = ("prob", "logit")
NOISE_FACTOR = 3.0  # ROME: noise std = 3 x the std of the embeddings

# the intervention of one chunk of rows: (global row indices, their prompts, batch column of the first
# position fed: > 0 when the positions before it come from a KV cache) -> context manager
Intervene = Callable[[torch.Tensor, torch.Tensor, int], contextlib.AbstractContextManager[object]]


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
        assert is_dataclass(self)  # every result class is a dataclass
        return {f.name: json_ready(getattr(self, f.name)) for f in fields(self)}


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The ``window`` layers centred on ``layer`` (ROME's convention), clipped to ``0..n_layers - 1``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


@dataclass(frozen=True)
class PromptBatch:
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
        return token_texts(bundle, self.ids[prompt, self.width - self.lengths[prompt] :].tolist())


def token_texts(bundle: ModelBundle, ids: Sequence[int]) -> list[str]:
    """The text of each token of ``ids`` on its own."""
    texts = []
    for i in ids:
        text = bundle.tokenizer.decode([i])
        assert isinstance(text, str)  # a list of texts only for a batch of sequences
        texts.append(text)
    return texts


def encode_prompts(bundle: ModelBundle, prompts: Sequence[str]) -> PromptBatch:
    if not prompts:
        raise ValueError("no prompts")
    encoded = [encode_prompt(bundle.tokenizer, p) for p in prompts]
    for p, prompt_ids in zip(prompts, encoded, strict=True):
        if not prompt_ids:
            raise ValueError(f"prompt {p!r} tokenises to nothing")
    pad = padding_id(bundle.tokenizer)
    ids, mask = pad_batch(encoded, pad, left=True, device=bundle.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return PromptBatch(tuple(prompts), ids, mask, positions, tuple(len(e) for e in encoded))


def first_target_ids(
    bundle: ModelBundle, batch: PromptBatch, targets: Sequence[Sequence[str]]
) -> torch.Tensor:
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


@overload
def measure_rows(
    bundle: ModelBundle,
    batch: PromptBatch,
    row_prompt: torch.Tensor,
    intervene: Intervene | None,
    targets: torch.Tensor,
    measure: str = ...,
    batch_rows: int = ...,
    specs: Sequence[Restoration] | None = ...,
) -> torch.Tensor: ...


@overload
def measure_rows(
    bundle: ModelBundle,
    batch: PromptBatch,
    row_prompt: torch.Tensor,
    intervene: Intervene | None,
    targets: None,
    measure: str = ...,
    batch_rows: int = ...,
    specs: Sequence[Restoration] | None = ...,
) -> None: ...


def measure_rows(
    bundle: ModelBundle,
    batch: PromptBatch,
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
        contexts: list[contextlib.AbstractContextManager[object]] = []
        if intervene is not None:
            contexts.append(intervene(rows, prompt, column))
        if recording:
            contexts.append(Trace(bundle.model, blocks, detach=True))
        elif start > 0:
            below = _rows_of(lower[blocks[start - 1]], prompt, n, column)
            contexts.append(start_at_layer(bundle.model, bundle.adapter, start, below))
        entered: list[tuple[Any, ...]] = []
        with together(*contexts, entered=entered):
            out = forward_with_cache(
                base,
                slice_cache(bundle.model, cache, prompt, column) if column else None,
                use_cache=recording or column > 0,
                input_ids=batch.ids[prompt, column:],
                attention_mask=batch.mask[prompt],
                position_ids=batch.positions[prompt, column:],
            )
        hidden = out.last_hidden_state[:, -1]
        if recording:
            trace = entered[0][-1]
            lower.update({name: trace[name].output for name in blocks})
            cache = output_cache(out)
        if targets is not None:
            logits = head(hidden).float()
            scores = logits.softmax(-1) if measure == "prob" else logits
            values[rows.to(values.device)] = scores.gather(1, targets[prompt])
    return values if targets is not None else None


def _first_column(spec: Restoration, batch: PromptBatch, prompt: int) -> int:
    """The first batch column a row's restoration can change: its first token for module outputs; the last
    column for patches of the last query's attention; 0 (everything) for whole attention matrices."""
    if spec.restores_outputs:
        return min(batch.column(prompt, t) for t in spec.tokens)
    if spec.kind in ("last_query", "last_score"):
        return batch.width - 1
    return 0


def _rows_of(output: object, prompt: torch.Tensor, n: int, column: int = 0) -> object:
    """A block's output object for the plain rows of all ``n`` prompts, re-indexed to the rows ``prompt``
    and the columns ``column..`` (the hidden states; other per-prompt tensors only by row)."""
    if isinstance(output, torch.Tensor):
        return output[prompt, column:]
    assert isinstance(output, tuple | list)  # a block returns its hidden states, or a tuple led by them
    main, *rest = output
    return (
        main[prompt, column:],
        *(x[prompt] if isinstance(x, torch.Tensor) and x.shape[0] == n else x for x in rest),
    )


def record_module_outputs(
    bundle: ModelBundle, batch: PromptBatch, kinds: Sequence[str], targets: torch.Tensor | None, measure: str
) -> tuple[dict[str, dict[int, torch.Tensor]], torch.Tensor | None]:
    """Module outputs ``kind -> layer -> [n_prompts, width, hidden]`` of a plain run, and its measure."""
    adapter = bundle.adapter
    names = {
        (k, layer): Site(k, layer).module_name(adapter) for k in kinds for layer in range(adapter.n_layers)
    }
    traces: list[Trace] = []

    def retain(rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0) -> Trace:
        traces.append(Trace(bundle.model, list(names.values()), detach=True))
        return traces[-1]

    values = measure_rows(bundle, batch, torch.arange(len(batch.prompts)), retain, targets, measure)
    outputs: dict[str, dict[int, torch.Tensor]] = {k: {} for k in kinds}
    for (kind, layer), name in names.items():
        outputs[kind][layer] = torch.cat([t[name].hidden for t in traces])
    return outputs, values


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    bad = [k for k in kinds if k not in TRACE_KINDS]
    if bad or not kinds:
        raise ValueError(f"module kinds must be among {TRACE_KINDS}, not {list(kinds)}")
    return tuple(dict.fromkeys(kinds))


@dataclass(frozen=True)
class Restoration:
    """What one row copies in: the recorded values of ``kind`` at every (layer, token) of ``layers`` x
    ``tokens``; the empty restoration copies nothing. ``kind`` is a module kind, the component of the
    output ``Site`` restored at each layer (``layer``, ``mlp``, ``attn``), or an attention patch kind."""

    kind: str = "layer"
    layers: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()

    @property
    def restores_outputs(self) -> bool:
        """Whether the rows copy in module outputs (not attention patches)."""
        return self.kind in TRACE_KINDS


def restoration_sites(
    specs: Sequence[Restoration], rows: torch.Tensor, prompt: torch.Tensor, batch: PromptBatch
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


def restorer(
    bundle: ModelBundle,
    batch: PromptBatch,
    source: dict[str, dict[int, torch.Tensor]],
    specs: Sequence[Restoration],
) -> Intervene:
    """The intervention that writes ``source[kind][layer][prompt, column]`` into each row as ``specs`` say."""

    def intervene(rows: torch.Tensor, prompt: torch.Tensor, offset: int = 0) -> Trace:
        edits = {
            Site(kind, layer).module_name(bundle.adapter): replace_positions(
                r, c - offset, source[kind][layer][prompt[r], c]
            )
            for (kind, layer), (r, c) in restoration_sites(specs, rows, prompt, batch).items()
        }
        return Trace(bundle.model, list(edits), retain_output=False, edit_output=lambda y, n: edits[n](y))

    return intervene


@contextlib.contextmanager
def together(
    *contexts: contextlib.AbstractContextManager[object], entered: list[tuple[Any, ...]] | None = None
) -> Iterator[None]:
    """Several context managers as one; ``entered`` collects what they returned (one tuple per chunk, of
    whatever each context gives: a ``Trace``, a ``LayerView``...)."""
    with contextlib.ExitStack() as stack:
        values = tuple(stack.enter_context(context) for context in contexts)
        if entered is not None:
            entered.append(values)
        yield


def token_grid(
    batch: PromptBatch, n_layers: int, window: int, kinds: Sequence[str]
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


def split_grid(
    values: torch.Tensor, batch: PromptBatch, n_layers: int, kinds: Sequence[str]
) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """Inverse of ``token_grid``: base ``[n, K]`` and per kind, per prompt ``[n_layers, n_tokens, K]``."""
    array = values.double().cpu().numpy()
    n = len(batch.prompts)
    base, at = array[:n], n
    per_kind: dict[str, list[np.ndarray]] = {}
    for kind in kinds:
        per_kind[kind] = []
        for length in batch.lengths:
            size = n_layers * length
            per_kind[kind].append(array[at : at + size].reshape(n_layers, length, -1))
            at += size
    return base, per_kind
