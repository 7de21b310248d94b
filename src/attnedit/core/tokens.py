"""Tokenisation facts every component shares: subject location and target continuation ids.

Subjects are found by character offsets (never by adding up token counts), so tokenizers that add
BOS or merge the space before the subject still give the right index.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


class SubjectNotFoundError(ValueError):
    """The subject does not occur in the prompt."""


@dataclass(frozen=True)
class SubjectSpan:
    """A prompt with the subject located: token ids and the subject's first/last token index."""

    text: str
    input_ids: list[int]
    first_token: int
    last_token: int  # the "fact token" of locate-then-edit methods

    @property
    def fact_token_index(self) -> int:
        return self.last_token


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else 0 (padded positions are masked, so any
    valid id does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def fill_prompt(prompt: str, subject: str) -> tuple[str, int]:
    """The prompt text and the subject's character start; ``{}`` templates get the subject inserted."""
    if "{}" in prompt:
        start = prompt.index("{}")
        return prompt[:start] + subject + prompt[start + 2 :], start
    start = prompt.find(subject)
    if start < 0:
        raise SubjectNotFoundError(f"subject {subject!r} not found in prompt {prompt!r}")
    return prompt, start


def locate_subject(
    tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str, prefix: str = ""
) -> SubjectSpan:
    """Tokenise ``prefix + prompt`` and find the tokens covering the subject's characters.

    ``prompt`` is a ``{}`` template or a plain prompt containing ``subject``; ``prefix`` (a context
    template or an edit sentence) is prepended verbatim.
    """
    if not subject:
        raise SubjectNotFoundError("subject is empty")
    body, start = fill_prompt(prompt, subject)
    text = prefix + body
    start += len(prefix)
    end = start + len(subject)
    if not tokenizer.is_fast:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; offsets are needed")
    enc = tokenizer(text, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    covering = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not covering:
        raise SubjectNotFoundError(f"no token covers subject {subject!r} in {text!r}")
    return SubjectSpan(text=text, input_ids=ids, first_token=covering[0], last_token=covering[-1])


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (BOS where the model uses one)."""
    return list(tokenizer(prompt)["input_ids"])


def encode_target(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, prompt_ids: list[int] | None = None
) -> list[int]:
    """Ids of ``target`` as it continues ``prompt`` after one space.

    Tokenises ``prompt + " " + target`` and strips the prompt's ids, which gives the right leading-space
    handling for byte-level BPE and SentencePiece alike. Where the boundary merges (rare), the target is
    tokenised on its own with a leading space.
    """
    if not target or not target.strip():
        raise ValueError(f"empty target for prompt {prompt!r}")
    if prompt_ids is None:
        prompt_ids = encode_prompt(tokenizer, prompt)
    full = encode_prompt(tokenizer, f"{prompt} {target}")
    n = len(prompt_ids)
    if full[:n] == prompt_ids and len(full) > n:
        return full[n:]
    ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)
