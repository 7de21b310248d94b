"""Scoring engine: teacher-forced NLL of many (prompt, target) pairs, generation, perplexity.

``score_targets`` is the one path every metric uses. It computes each distinct prompt once (its
KV cache is shared by all targets of that prompt), feeds only the target tokens after it, and
projects to the vocabulary only at the positions that predict target tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnedit.core.adapters import ModelAdapter
from attnedit.core.hf_compat import forward_with_cache, output_cache, select_cache_rows
from attnedit.core.interventions import row_deltas
from attnedit.core.tokens import encode_prompt, encode_target, padding_id

if TYPE_CHECKING:
    from transformers import GenerationMixin


@dataclass(frozen=True)
class TargetScore:
    """Per-token results of one teacher-forced target."""

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log P(target token | prefix)
    argmax_hits: tuple[bool, ...]  # whether the target token is the argmax
    argmax_ids: tuple[int, ...]

    @property
    def nll(self) -> float:
        """Mean per-token negative log-likelihood."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """P(target | prompt) as exp(-mean NLL)."""
        return math.exp(-self.nll)

    @property
    def token_accuracy(self) -> float:
        return sum(self.argmax_hits) / len(self.argmax_hits)


def _base_and_head(model: PreTrainedModel, adapter: ModelAdapter) -> tuple[nn.Module, nn.Module]:
    return model.base_model, adapter.unembedding(model)


def _token_results(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and argmax ids from hidden states [n, H] (vocab only for these rows)."""
    logits = head(hidden).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(1, targets[:, None])[:, 0], logits.argmax(dim=-1)


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of ``seqs`` padded to the longest (``left``: rows end at the last column)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def check_length(adapter: ModelAdapter, length: int, text: str) -> None:
    """Refuse sequences longer than the position embeddings (not an index error deep inside)."""
    if adapter.max_positions is not None and length > adapter.max_positions:
        raise ValueError(
            f"{length} tokens exceed the model's {adapter.max_positions} positions: prompt {text[:80]!r}..."
        )


def length_batches(
    lengths: list[int], order: list[int], max_tokens: int, max_rows: int, call_cost: int = 48
) -> list[list[int]]:
    """Split ``order`` (sorted by length) into consecutive batches of least padded work.

    A batch costs ``rows * longest`` padded tokens plus ``call_cost`` tokens' worth of per-call
    overhead; an exact O(n^2) dynamic programme picks the cut points, within ``max_tokens`` and
    ``max_rows``. On a CPU, padding is paid in full, so fewer, fuller batches are not always faster.
    """
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[i]: cost of batching order[:i]
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = 0
        for start in range(end - 1, -1, -1):
            longest = max(longest, lengths[order[start]])
            rows = end - start
            if rows > max_rows or (rows > 1 and rows * longest > max_tokens):
                break
            cost = best[start] + call_cost + rows * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches = []
    end = n
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def joined_target(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, prompt_ids: list[int] | None = None
) -> list[int]:
    """Ids of ``target`` as EasyEdit's KnowEdit metrics split them: tokenise ``prompt + " " + target``
    (special tokens included) and take every id after the first ``len(prompt ids)``.

    Unlike ``encode_target`` there is no check that the prompt's ids are a prefix of the joint ones and
    no fallback: where the boundary merges, the split is EasyEdit's count-based one all the same.
    """
    if not target or not target.strip():
        raise ValueError(f"empty target for prompt {prompt!r}")
    if prompt_ids is None:
        prompt_ids = encode_prompt(tokenizer, prompt)
    ids = encode_prompt(tokenizer, f"{prompt} {target}")[len(prompt_ids) :]
    if not ids:
        raise ValueError(f"target {target!r} adds no token after prompt {prompt!r}")
    return ids


@torch.inference_mode()
def score_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    adapter: ModelAdapter,
    pairs: Sequence[tuple[str, str]],
    max_batch_tokens: int = 2048,
    max_batch_rows: int = 64,
    progress: bool = False,
    joined: Sequence[bool] | None = None,
) -> list[TargetScore]:
    """Teacher-forced scores of every ``(prompt, target)`` pair (target appended after one space).

    ``joined[i]``: pair ``i``'s target ids are EasyEdit's split (``joined_target``) instead of
    ``encode_target``'s; the teacher-forced pass is the same. Pairs whose ids agree either way are
    scored once.
    """
    if not pairs:
        return []
    if joined is not None and len(joined) != len(pairs):
        raise ValueError(f"{len(joined)} joined flags for {len(pairs)} pairs")
    device = next(model.parameters()).device
    base, head = _base_and_head(model, adapter)
    pad_id = padding_id(tokenizer)

    prompts = list(dict.fromkeys(p for p, _ in pairs))
    prompt_index = {p: i for i, p in enumerate(prompts)}
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    for p, ids in zip(prompts, prompt_ids, strict=True):
        if not ids:
            raise ValueError(f"prompt {p!r} tokenises to nothing")
    # distinct targets per prompt; identical pairs are scored once
    flags = [False] * len(pairs) if joined is None else [bool(j) for j in joined]
    encoded: dict[tuple[str, str, bool], tuple[int, ...]] = {}
    for (p, t), flag in zip(pairs, flags, strict=True):
        if (p, t, flag) not in encoded:
            encode = joined_target if flag else encode_target
            encoded[p, t, flag] = tuple(encode(tokenizer, p, t, prompt_ids[prompt_index[p]]))
    # a pair is its text and its ids: a joined pair whose ids equal encode_target's is the same pair
    keys = [(p, t, encoded[p, t, j]) for (p, t), j in zip(pairs, flags, strict=True)]
    unique_keys = list(dict.fromkeys(keys))
    unique_pairs = [(p, t) for p, t, _ in unique_keys]
    pair_targets = [list(ids) for _, _, ids in unique_keys]
    by_prompt: list[list[int]] = [[] for _ in prompts]
    for j, (p, _) in enumerate(unique_pairs):
        by_prompt[prompt_index[p]].append(j)

    results: list[TargetScore | None] = [None] * len(unique_pairs)
    full = [len(ids) + max(len(pair_targets[j]) for j in by_prompt[i]) for i, ids in enumerate(prompt_ids)]
    check_length(adapter, max(full), prompts[full.index(max(full))])
    lengths = [len(ids) for ids in prompt_ids]  # stage 1 pads prompts only
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    batches = length_batches(lengths, order, max_batch_tokens, max_batch_rows)
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
        _score_prompt_batch(base, head, batch, prompt_ids, by_prompt, pair_targets, results, pad_id, device)
    index = {key: j for j, key in enumerate(unique_keys)}
    scored = [score for score in results if score is not None]
    assert len(scored) == len(results)  # every distinct pair was scored
    return [scored[index[key]] for key in keys]


def _score_prompt_batch(
    base: nn.Module,
    head: nn.Module,
    batch: list[int],
    prompt_ids: list[list[int]],
    by_prompt: list[list[int]],
    pair_targets: list[list[int]],
    results: list[TargetScore | None],
    pad_id: int,
    device: torch.device,
) -> None:
    # stage 1: the prompts, left-padded so every prompt ends at the last column
    ids, mask = pad_batch([prompt_ids[i] for i in batch], pad_id, left=True, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    last_hidden = out.last_hidden_state[:, -1]

    rows = [(row, j) for row, i in enumerate(batch) for j in by_prompt[i]]
    first_targets = torch.tensor([pair_targets[j][0] for _, j in rows], device=device)
    first_rows = torch.tensor([row for row, _ in rows], device=device)
    # the first target token of every pair is predicted by its prompt's last position
    logits_last = head(last_hidden).float()
    lp_last = torch.log_softmax(logits_last, dim=-1)
    first_lp = lp_last[first_rows, first_targets]
    first_argmax = logits_last.argmax(-1)[first_rows]

    per_pair: dict[int, tuple[list[float], list[int]]] = {}
    for k, (_, j) in enumerate(rows):
        per_pair[j] = ([float(first_lp[k])], [int(first_argmax[k])])

    # stage 2: continuations (all target tokens but the last) on top of the shared prompt cache,
    # in their own length-sorted batches so that one long target does not pad all the others
    cont = [(row, j) for row, j in rows if len(pair_targets[j]) > 1]
    cont_lengths = [len(pair_targets[j]) - 1 for _, j in cont]
    order = sorted(range(len(cont)), key=cont_lengths.__getitem__)
    for sub in length_batches(cont_lengths, order, max_tokens=4096, max_rows=256):
        _score_continuations(
            base,
            head,
            output_cache(out),
            mask,
            [cont[k] for k in sub],
            pair_targets,
            per_pair,
            pad_id,
            device,
        )

    for j, (lps, ams) in per_pair.items():
        target = pair_targets[j]
        results[j] = TargetScore(
            target_ids=tuple(target),
            logprobs=tuple(lps),
            argmax_hits=tuple(a == t for a, t in zip(ams, target, strict=True)),
            argmax_ids=tuple(ams),
        )


def _score_continuations(
    base: nn.Module,
    head: nn.Module,
    prompt_cache: object,
    prompt_mask: torch.Tensor,
    cont: list[tuple[int, int]],
    pair_targets: list[list[int]],
    per_pair: dict[int, tuple[list[float], list[int]]],
    pad_id: int,
    device: torch.device,
) -> None:
    """Feed target tokens [:-1] of the pairs ``cont`` = [(prompt row, pair)] after their prompt's cache."""
    rows = torch.tensor([row for row, _ in cont], device=device)
    cache = select_cache_rows(prompt_cache, rows)  # a copy: the prompt cache is reused by the next sub-batch
    cids, cmask = pad_batch([pair_targets[j][:-1] for _, j in cont], pad_id, left=False, device=device)
    cwidth = cids.shape[1]
    pmask = prompt_mask[rows]
    positions = pmask.sum(-1, keepdim=True) + torch.arange(cwidth, device=device)[None]
    hidden = forward_with_cache(
        base,
        cache,
        input_ids=cids,
        attention_mask=torch.cat([pmask, cmask], dim=1),
        position_ids=positions,
    ).last_hidden_state
    sel_r, sel_t = cmask.nonzero(as_tuple=True)
    nexts = torch.tensor(
        [pair_targets[cont[r][1]][t + 1] for r, t in zip(sel_r.tolist(), sel_t.tolist(), strict=True)],
        device=device,
    )
    lp, am = _token_results(head, hidden[sel_r, sel_t], nexts)
    for k, r in enumerate(sel_r.tolist()):
        j = cont[r][1]
        per_pair[j][0].append(float(lp[k]))
        per_pair[j][1].append(int(am[k]))


@torch.inference_mode()
def score_targets_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> list[TargetScore]:
    """The unoptimised oracle: one full forward per pair, full-vocabulary logits everywhere.

    Used by the tests and the benchmark as the baseline ``score_targets`` must agree with.
    """
    device = next(model.parameters()).device
    out = []
    for prompt, target in pairs:
        p = encode_prompt(tokenizer, prompt)
        t = encode_target(tokenizer, prompt, target, p)
        logits = model(input_ids=torch.tensor([p + t], device=device)).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)
        rows = torch.arange(len(p) - 1, len(p) + len(t) - 1, device=device)
        lp = logprobs[rows, torch.tensor(t, device=device)]
        am = logits[rows].argmax(-1)
        out.append(
            TargetScore(
                target_ids=tuple(t),
                logprobs=tuple(lp.tolist()),
                argmax_hits=tuple(int(a) == b for a, b in zip(am.tolist(), t, strict=True)),
                argmax_ids=tuple(am.tolist()),
            )
        )
    return out


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 100,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    adapter: ModelAdapter | None = None,
    row_edits: tuple[Sequence[Mapping[str, torch.Tensor]], Sequence[int]] | None = None,
    max_length: int | None = None,
    sampling: str = "batch",
) -> list[str]:
    """Continuations of ``prompts`` (greedy, or top-k sampling with a fixed seed), batched and left-padded.

    ``sampling`` (top-k only): ``"batch"``, one random stream per decoding batch, seeded with ``seed``
    (``model.generate``'s sampling; a prompt's sample depends on its batch-mates and on its place in the
    batch); ``"prompt"``, a generator per prompt seeded from ``seed`` and the prompt's text
    (``prompt_generator``; needs ``adapter``), so a prompt's sample is the same in any batch.

    ``row_edits = (deltas, owner)``: prompt ``i`` is continued by the model plus the weight deltas
    ``deltas[owner[i]]`` (``interventions.row_deltas``), so the prompts of many edited cases share one
    batch. ``max_new_tokens``: one budget for every prompt, or one per prompt (a batch decodes for its
    largest and each row is cut to its own). ``max_length`` (EasyEdit's ``max_out_len``), in place of
    ``max_new_tokens``: a prompt's ids and its continuation make at most this many tokens; a batch
    decodes for its shortest prompt and each row is cut to its own budget (a prompt of ``max_length``
    tokens or more gets "").
    """
    if not prompts:
        return []
    if not isinstance(max_new_tokens, int) and len(max_new_tokens) != len(prompts):
        raise ValueError(f"{len(max_new_tokens)} token budgets for {len(prompts)} prompts")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, not {sampling!r}")
    if top_k is not None and sampling == "prompt" and adapter is None:
        raise ValueError("sampling='prompt' needs the model's adapter")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            if max_length is None:
                budgets = (
                    [max_new_tokens] * len(chunk)
                    if isinstance(max_new_tokens, int)
                    else list(max_new_tokens[start : start + batch_size])
                )
            else:
                budgets = [max(0, max_length - len(c)) for c in chunk]
            steps = max(budgets)
            if steps == 0:
                texts.extend("" for _ in chunk)
                continue
            ids, mask = pad_batch(chunk, pad_id, left=True, device=device)
            width = ids.shape[1]
            if adapter is not None:
                check_length(adapter, width + steps, prompts[start])
            edits = (
                row_deltas(model, row_edits[0], row_edits[1][start : start + batch_size])
                if row_edits is not None
                else contextlib.nullcontext()
            )
            with edits:
                per_prompt = top_k is not None and sampling == "prompt"
                if adapter is not None and (top_k is None or per_prompt):
                    choose = (
                        TopKSampler(
                            top_k,
                            [prompt_generator(seed, p, device) for p in prompts[start : start + batch_size]],
                            **_sampling_config(model),
                        )
                        if per_prompt and top_k is not None  # (per_prompt implies top_k)
                        else None
                    )
                    new = greedy_decode(
                        model, adapter, ids, mask, steps, _eos_ids(model, tokenizer), pad_id, choose
                    )
                    texts.extend(_decode(tokenizer, row[:b]) for row, b in zip(new, budgets, strict=True))
                    continue
                # the generated ids (return_dict_in_generate is not asked for); transformers' causal LMs are
                # GenerationMixins, PreTrainedModel alone is not
                out: torch.Tensor = cast("GenerationMixin", model).generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=steps,
                    do_sample=top_k is not None,
                    top_k=top_k,
                    top_p=None,
                    temperature=None,
                    pad_token_id=pad_id,
                )
            texts.extend(
                _decode(tokenizer, row[width : width + b]) for row, b in zip(out, budgets, strict=True)
            )
    finally:
        torch.random.set_rng_state(generator_state)
    return texts


SAMPLING = ("batch", "prompt")


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int] | torch.Tensor) -> str:
    """The text of one sequence of ids, special tokens skipped."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)  # a list of texts only for a batch of sequences
    return text


def prompt_generator(seed: int, prompt: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A random generator of one prompt's own, seeded from ``seed`` and the prompt's text (sha256)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # a non-negative 63-bit seed
    return generator


@dataclass
class TopKSampler:
    """Top-k sampling with one generator per row: row ``r`` draws its next token from the softmax of its
    ``k`` largest logits (divided by ``temperature``; then only the smallest set of them whose probability
    reaches ``top_p``, as ``model.generate`` warps them) with ``generators[r]``, one draw per step
    whatever the other rows do, so its tokens depend on its own logits and generator only
    (``greedy_decode``'s ``choose``)."""

    k: int
    generators: Sequence[torch.Generator]
    temperature: float = 1.0
    top_p: float = 1.0

    def distribution(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's candidate token ids ``[rows, k]`` and their (unnormalised) probabilities."""
        values, indices = (logits.float() / self.temperature).topk(min(self.k, logits.shape[-1]), dim=-1)
        probs = values.softmax(dim=-1)
        if self.top_p < 1.0:  # values are sorted: keep a token while the mass before it is below top_p
            before = probs.cumsum(dim=-1) - probs
            probs = torch.where(before < self.top_p, probs, torch.zeros_like(probs))
        return indices, probs

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        indices, probs = self.distribution(logits)
        picks = torch.stack(
            [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)]
        )
        return indices.gather(-1, picks).squeeze(-1)


def _sampling_config(model: PreTrainedModel) -> dict[str, float]:
    """The temperature and top-p of the model's generation config, which ``model.generate`` applies to a
    top-k draw when they are set (1.0, none, when they are not)."""
    config = getattr(model, "generation_config", None)
    temperature = getattr(config, "temperature", None)
    top_p = getattr(config, "top_p", None)
    return {"temperature": float(temperature or 1.0), "top_p": float(1.0 if top_p is None else top_p)}


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-sequence ids as ``generate`` uses them (the generation config's, else the tokenizer's)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list | tuple) else [int(eos)]


@torch.inference_mode()
def greedy_decode(
    model: PreTrainedModel,
    adapter: ModelAdapter,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    choose: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Greedy continuation of a left-padded batch with a KV cache: the new ids of each row.

    Same tokens as ``model.generate(do_sample=False)`` without its per-step overhead (logits only for
    the last position, no processors); a row stops at its first end-of-sequence token. ``choose``: the
    next token of each row from its logits ``[rows, vocab]`` instead of the argmax (``TopKSampler``).
    """
    base, head = _base_and_head(model, adapter)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, last = output_cache(out), out.last_hidden_state[:, -1]
    position = positions[:, -1:]
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=ids.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = head(last)
        token = logits.argmax(dim=-1) if choose is None else choose(logits)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        new.append(token)
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = forward_with_cache(
            base, cache, input_ids=token[:, None], attention_mask=mask, position_ids=position
        )
        cache, last = output_cache(out), out.last_hidden_state[:, -1]
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(ids.shape[0])]
    # drop what follows each row's end of sequence (pads), keep the eos itself as generate does
    result = []
    for row in rows:
        stop = next((i for i, t in enumerate(row) if t in set(eos_ids)), None)
        result.append(row if stop is None else row[: stop + 1])
    return result


@torch.inference_mode()
def text_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    adapter: ModelAdapter,
    texts: Sequence[str],
    max_batch_tokens: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and number of scored tokens of each text (every token after the first)."""
    device = next(model.parameters()).device
    base, head = _base_and_head(model, adapter)
    encoded = [encode_prompt(tokenizer, t) for t in texts]
    pad_id = padding_id(tokenizer)
    nll = np.zeros(len(texts))
    counts = np.zeros(len(texts), dtype=np.int64)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    for batch in length_batches([len(e) for e in encoded], order, max_batch_tokens, 64):
        check_length(adapter, max(len(encoded[i]) for i in batch), texts[batch[-1]])
        ids, mask = pad_batch([encoded[i] for i in batch], pad_id, left=False, device=device)
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        rows, cols = mask[:, 1:].nonzero(as_tuple=True)
        lp, _ = _token_results(head, hidden[rows, cols], ids[rows, cols + 1])
        per_row = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, lp.double())
        for r, i in enumerate(batch):
            nll[i] = -float(per_row[r])
            counts[i] = len(encoded[i]) - 1
    return nll, counts
