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
one optimisation per request, only batched. ``adam_loop`` is that loop (early stop per request,
finished requests frozen, a projection after every step), shared with fine-tuning.

Nothing below the injection point is recomputed per step: tokens before the fact token do not
depend on the delta at any layer, so their keys and values are computed once (a KV cache); the
blocks below the lowest injection layer are skipped (``start_at_layer``) with their output on the
remaining tokens recorded once. Logits are computed only at the positions the loss reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from attnedit.core.data import EditRequest
from attnedit.core.deltas import tensors_digest
from attnedit.core.files import atomic_write
from attnedit.core.hf_compat import CacheCheckpoint, forward_with_cache, map_cache_tensors, output_cache
from attnedit.core.interventions import (
    Trace,
    attention_implementation,
    attention_probabilities,
    linear_precision,
    start_at_layer,
)
from attnedit.core.models import ModelBundle
from attnedit.core.scoring import check_length, pad_batch
from attnedit.core.sites import HIDDEN_STATE_COMPONENTS, Site
from attnedit.core.tokens import encode_target, locate_subject, padding_id
from attnedit.editing.templates import template_prefix

logger = logging.getLogger(__name__)

KL_PROMPT = "{} is a"
# ``TargetSettings.matmul``: "model" (the model's own dtype) or a lower precision for the steps' products
MATMUL_DTYPES = {"bfloat16": torch.bfloat16}


class NonFiniteLossError(FloatingPointError):
    """The optimisation produced NaN or infinity; nothing was written to the model."""


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

    def describe(self) -> dict:
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
) -> contextlib.AbstractContextManager:
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


def request_parts(parts: Mapping[str, torch.Tensor], i: int) -> dict[str, float | list[float]]:
    """Request ``i``'s loss parts and diagnostics as plain numbers (vectors as lists)."""
    return {k: float(v[i]) if v[i].dim() == 0 else v[i].tolist() for k, v in parts.items()}


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


@dataclass
class TargetResult:
    """Per injection site: the module's output at the plain prompt's fact token, and the optimised delta."""

    init: dict[Site, torch.Tensor]  # [N, H]
    delta: dict[Site, torch.Tensor]  # [N, H]
    steps: list[int]  # optimisation steps run per request
    final_loss: list[float]
    loss_parts: list[dict[str, float]] = field(default_factory=list)

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
    directory = _cache_dir.get()
    store = None if directory is None else _GroupStore(directory)
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
            key = _group_key(bundle, group_rows, ids, injections, settings, terms)
            if not store.restore(key, ids, injections, out):
                _optimise_group(bundle, group_rows, ids, injections, settings, terms, out)
                store.keep(key, ids, injections, out)
    return out


# where ``optimise_targets`` keeps each finished group's targets (``target_cache``)
_cache_dir: contextvars.ContextVar[Path | None] = contextvars.ContextVar("target_cache", default=None)


@contextlib.contextmanager
def target_cache(directory: str | Path | None) -> Iterator[None]:
    """Inside the block (this thread's context), ``optimise_targets`` keeps each finished group's targets
    in ``directory`` (one safetensors file per group, ``KEY.safetensors``, written atomically, with a
    digest of its tensors), and a group whose inputs match a file there takes its targets from it instead
    of being optimised again; ``directory`` None: no cache in the block. KEY hashes everything a group's
    targets depend on: the model's fingerprint and dtype, the target settings, the injection sites, the
    loss terms and the group's rows (tokens, fact positions, targets). So an interrupted batch edit
    resumes group by group with the same targets, and another method with the same targets (IntAttn-Edit's
    are MEMIT's) reuses them. Several processes may share a directory. A file that does not load or
    verify is named in a warning and not used. The key holds the model's fingerprint as loaded, not its
    current weights: use it around the unedited model only (the runner refuses it in sequential mode,
    where edits accumulate)."""
    token = _cache_dir.set(None if directory is None else Path(directory))
    try:
        yield
    finally:
        _cache_dir.reset(token)


def _group_key(
    bundle: ModelBundle,
    rows: list[Row],
    ids: list[int],
    injections: Sequence[Site],
    settings: TargetSettings,
    terms: Sequence[LossTerm],
) -> str:
    """What a group's targets are a function of, hashed."""
    local = {rid: i for i, rid in enumerate(ids)}
    spec = {
        "model": bundle.fingerprint,
        "dtype": str(bundle.model.dtype),
        "settings": asdict(settings),
        "sites": [[s.component, s.layer, s.side] for s in injections],
        "terms": [t.describe() for t in terms],
        "rows": [[local[r.request], r.ids, r.fact, r.n_prompt, r.targets, r.template] for r in rows],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class _GroupStore:
    """Finished groups of target optimisations, one file per group in the directory of ``target_cache``."""

    directory: Path

    def restore(self, key: str, ids: list[int], injections: Sequence[Site], out: TargetResult) -> bool:
        """Fill ``out`` for the group's requests from its file; False when there is none to trust."""
        path = self.directory / f"{key}.safetensors"
        if not path.is_file():
            return False
        names = [f"{j}.{part}" for j in range(len(injections)) for part in ("init", "delta")]
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                entry = json.loads(meta["group"])
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            if meta.get("sha256") != tensors_digest(tensors):
                raise ValueError("its tensors do not verify against its digest")
            if sorted(tensors) != sorted(names) or any(len(entry[k]) != len(ids) for k in entry):
                raise ValueError("it holds another group's shapes")
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            logger.warning("target cache file %s does not load (%s); optimising its group", path, err)
            return False
        for j, inj in enumerate(injections):
            out.init[inj][ids] = tensors[f"{j}.init"]
            out.delta[inj][ids] = tensors[f"{j}.delta"]
        for i, rid in enumerate(ids):
            out.steps[rid] = entry["steps"][i]
            out.final_loss[rid] = entry["final_loss"][i]
            out.loss_parts[rid] = entry["loss_parts"][i]
        logger.info("targets of %d request(s) taken from %s", len(ids), path)
        return True

    def keep(self, key: str, ids: list[int], injections: Sequence[Site], out: TargetResult) -> None:
        """Write a finished group's file."""
        tensors: dict[str, torch.Tensor] = {}
        for j, inj in enumerate(injections):
            tensors[f"{j}.init"] = out.init[inj][ids].contiguous()
            tensors[f"{j}.delta"] = out.delta[inj][ids].contiguous()
        entry = {
            "steps": [out.steps[r] for r in ids],
            "final_loss": [out.final_loss[r] for r in ids],
            "loss_parts": [out.loss_parts[r] for r in ids],
        }
        meta = {"group": json.dumps(entry), "sha256": tensors_digest(tensors)}
        atomic_write(self.directory / f"{key}.safetensors", lambda tmp: save_file(tensors, str(tmp), meta))


class _PrefixCache:
    """The prompt prefixes' KV cache, reset to the prefix after every pass (suffix entries dropped)."""

    def __init__(self, cache: object | None):
        self.cache = cache
        self._checkpoint: CacheCheckpoint | None = None
        if cache is not None:
            # a row with an empty prefix attends to nothing there; keep its masked entries finite
            map_cache_tensors(cache, lambda t: t.nan_to_num(0.0))
            self._checkpoint = CacheCheckpoint(cache)

    def reset(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.restore()


class FrozenBelow:
    """Repeated forward passes over a ``SplitBatch`` where nothing changes below ``first_layer``
    or before the fact token: the prefix KV cache and the lower blocks' output are computed once."""

    def __init__(self, bundle: ModelBundle, batch: SplitBatch, first_layer: int):
        self.bundle, self.batch, self.first_layer = bundle, batch, first_layer
        model, adapter = bundle.model, bundle.adapter
        self.base = model.base_model
        with torch.no_grad():
            cache = None
            if batch.prefix_width:
                cache = output_cache(
                    self.base(
                        input_ids=batch.prefix_ids,
                        attention_mask=batch.prefix_mask,
                        position_ids=(batch.prefix_mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True,
                    )
                )
            self.prefix = _PrefixCache(cache)
            self.lower_output = None
            if first_layer > 0:
                below = adapter.module_name("layer", first_layer - 1)
                with Trace(model, [below], detach=True, stop=True) as trace:
                    self._run()
                self.lower_output = trace[below].output

    def _run(self) -> torch.Tensor | None:
        b = self.batch
        try:
            out = forward_with_cache(
                self.base,
                self.prefix.cache,
                use_cache=self.prefix.cache is not None,
                input_ids=b.suffix_ids,
                attention_mask=b.attention_mask,
                position_ids=b.positions,
            )
            return out.last_hidden_state
        finally:
            self.prefix.reset()

    def forward(self) -> torch.Tensor:
        """Final hidden states of the suffix tokens [B, S, H] (the lower blocks skipped)."""
        with start_at_layer(self.bundle.model, self.bundle.adapter, self.first_layer, self.lower_output):
            hidden = self._run()
        assert hidden is not None
        return hidden


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
        logp = torch.log_softmax(head(hidden[self.rows, self.columns]).float(), dim=-1)
        token_lp = logp.gather(1, self.tokens[:, None])[:, 0]
        return torch.zeros(self.n_rows, device=hidden.device).index_add(
            0, self.rows, -token_lp * self.weights
        )


def target_reads(batch: SplitBatch) -> TargetReads:
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


def per_request_mean(
    values: torch.Tensor, rows: torch.Tensor, request_index: torch.Tensor, n: int
) -> torch.Tensor:
    """Mean of ``values`` (one per selected row) over the rows of each request."""
    req = request_index[rows]
    total = torch.zeros(n, device=values.device).index_add(0, req, values)
    count = torch.zeros(n, device=values.device).index_add(0, req, torch.ones_like(values))
    return total / count.clamp_min(1)


# who hears of every step of ``adam_loop`` (the edit inspector streams the steps); set by ``on_step``
StepListener = Callable[[str, int, list[float], dict[str, list]], None]
_step_listener: contextvars.ContextVar[StepListener | None] = contextvars.ContextVar(
    "attnedit_step_listener", default=None
)


@contextlib.contextmanager
def on_step(listener: StepListener) -> Iterator[None]:
    """Inside the block (this thread's context), every ``adam_loop`` step calls
    ``listener(what, step, losses, parts)`` after its forward pass: the losses per unit and the loss
    parts per unit where the loop's caller gives them. It only reads detached values: nothing changes."""
    token = _step_listener.set(listener)
    try:
        yield
    finally:
        _step_listener.reset(token)


@dataclass
class LoopResult:
    """What ``adam_loop`` ran, per unit: the last step at which the unit was active, and its loss then."""

    steps: list[int]
    final_loss: list[float]


def adam_loop(
    parameters: Sequence[torch.Tensor],
    loss_fn: Callable[[int], torch.Tensor],
    *,
    lr: float,
    steps: int,
    early_stop_loss: float,
    project: Callable[[], None] | None = None,
    units: int | Sequence[object] = 1,
    what: str = "",
    parts: Mapping[str, torch.Tensor] | None = None,
) -> LoopResult:
    """Adam on ``parameters`` against per-unit losses, each unit stopping on its own.

    A unit is what has its own loss and stop rule (a request whose delta is optimised; or the whole
    optimisation, for one loss over parameters that all requests share). ``loss_fn(step)`` runs the
    step's forward pass and returns the losses ``[n_units]``. Every step: the losses of the active
    units must be finite (else ``NonFiniteLossError``); each active unit records the step and its loss,
    and stops being active once its loss falls below ``early_stop_loss`` (compared in the losses'
    dtype); the loop ends when no unit is active or after ``steps`` forward passes (the last one only
    measures). Otherwise: ``zero_grad``, backward of the sum of the active units' losses, Adam step,
    then the rows of finished units are put back to their values before the step (Adam's momentum
    would move them even without a gradient), then ``project()`` (a clamp, a projection; under
    ``no_grad``). With several units the parameters' first dimension indexes the units; a single unit's
    parameters may have any shape (the loop has ended before its unit could finish).

    ``units``: how many units, or their names (request ids, named in the non-finite error); ``what``
    prefixes that error's message. ``parts``: the loss parts ``loss_fn`` fills in, per unit, reported
    with each step to the listener of ``on_step`` (if any).
    """
    names = None if isinstance(units, int) else list(units)
    n = len(names) if names is not None else int(units)  # type: ignore[arg-type]
    optimiser = torch.optim.Adam(list(parameters), lr=lr)
    active: torch.Tensor | None = None
    last_step, last_loss = [0] * n, [math.nan] * n
    prefix = f"{what}: " if what else ""
    listener = _step_listener.get()
    for step in range(steps):
        loss = loss_fn(step)
        if loss.shape != (n,):
            raise ValueError(f"loss_fn must return one loss per unit, shape ({n},), not {tuple(loss.shape)}")
        if active is None:
            active = torch.ones(n, dtype=torch.bool, device=loss.device)
        if not torch.isfinite(loss[active]).all():
            bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
            where = f" for request(s) {[names[i] for i in bad]}" if names is not None else ""
            raise NonFiniteLossError(f"{prefix}non-finite loss at step {step}{where}; the model is unchanged")
        with torch.no_grad():
            for i in torch.nonzero(active).flatten().tolist():
                last_step[i] = step
                last_loss[i] = float(loss[i])
            active &= loss.detach() >= early_stop_loss
        if listener is not None:
            listener(what, step, loss.detach().tolist(), {k: v.tolist() for k, v in (parts or {}).items()})
        if not active.any() or step == steps - 1:
            break
        # finished units keep the values that met the stop rule (nothing to restore while all are active)
        kept = None if bool(active.all()) else [p.detach().clone() for p in parameters]
        optimiser.zero_grad(set_to_none=True)
        loss[active].sum().backward()
        optimiser.step()
        with torch.no_grad():
            if kept is not None:
                for p, before in zip(parameters, kept, strict=True):
                    p[~active] = before[~active]
            if project is not None:
                project()
    return LoopResult(last_step, last_loss)


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
                kl_logp = torch.log_softmax(head(hidden[kl_rows, 0]).float(), dim=-1)
                if kl_init is None:
                    kl_init = kl_logp.detach()
                kl_each = (kl_init.exp() * (kl_init - kl_logp)).sum(-1)
                kl = per_request_mean(kl_each, kl_rows, batch.request_index, n)
                decay = torch.zeros(n, device=device)
                for inj in injections:
                    decay = (
                        decay
                        + settings.weight_decay
                        * deltas[inj].norm(dim=-1)
                        / init[inj].norm(dim=-1).clamp_min(1e-12) ** 2
                    )
                loss = nll + settings.kl_factor * kl + decay
                parts.clear()  # the parts of the last step are reported
                parts.update({"nll": nll.detach(), "kl": kl.detach(), "weight_decay": decay.detach()})
                if terms:
                    state = StepState(step, batch, n, attention, fact_key, template_rows)
                    loss = add_terms(terms, state, loss, parts)
            return loss

        def clamp_norms() -> None:
            for inj, d in deltas.items():
                limit = settings.clamp_norm_factor * init[inj].norm(dim=-1)
                norms = d.norm(dim=-1)
                scale = torch.where(norms > limit, limit / norms.clamp_min(1e-12), torch.ones_like(norms))
                d.mul_(scale[:, None])

        matmul = MATMUL_DTYPES.get(settings.matmul, model.dtype)
        precision: contextlib.AbstractContextManager = contextlib.nullcontext()
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
