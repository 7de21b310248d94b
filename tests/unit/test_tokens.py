"""Subject location by character offsets and target continuation ids, with and without BOS."""

from __future__ import annotations

import pytest

from attnedit.core.tokens import (
    SubjectNotFoundError,
    encode_prompt,
    encode_target,
    fill_prompt,
    locate_subject,
)

TOKENIZERS = ["tiny_tokenizer", "tiny_bos_tokenizer"]

# (prompt, subject, prefix)
CASES = [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", ""),
    ("The mother tongue of Michel Rocard is", "Michel Rocard", ""),
    ("Danielle Darrieux speaks French", "Danielle Darrieux", ""),  # subject first
    ("{} plays the guitar", "Toko Yasuda", ""),  # template, subject first
    ("What does {} play?", "Freddy Cole", ""),  # template, subject mid-sentence before punctuation
    ("Rome is the capital of Italy", "Italy", ""),  # subject last
    ("Zyxq Wvut is in", "Zyxq Wvut", "The Louvre is in Paris. "),  # unseen words, context prefix
    # the subject also occurs in the prefix: the span must be the one in the prompt
    ("The Eiffel Tower is in", "Eiffel Tower", "The Eiffel Tower is located in the city of Rome. "),
    ("{} is a native speaker of", "Danielle Darrieux", "Danielle Darrieux speaks English. "),
    ("Where Danielle Darrieux is from", "Danielle Darr", ""),  # subject ends inside a word
]


def _check_span(tokenizer, prompt: str, subject: str, prefix: str):
    span = locate_subject(tokenizer, prompt, subject, prefix=prefix)
    body, char_start = fill_prompt(prompt, subject)
    assert span.text == prefix + body
    start = len(prefix) + char_start
    end = start + len(subject)
    assert span.text[start:end] == subject

    enc = tokenizer(span.text, return_offsets_mapping=True)
    assert span.input_ids == enc["input_ids"]
    offsets = enc["offset_mapping"]
    first, last = span.first_token, span.last_token
    assert 0 <= first <= last < len(span.input_ids)
    assert span.fact_token_index == last

    # the tokens first..last decode to text containing the subject
    assert subject in tokenizer.decode(span.input_ids[first : last + 1])
    # the last token covers the subject's last character, the first its first character
    assert offsets[last][0] < end <= offsets[last][1]
    assert offsets[first][0] <= start < offsets[first][1]
    # no special token (BOS) is ever chosen
    special = set(tokenizer.all_special_ids)
    assert not special & set(span.input_ids[first : last + 1])
    # the span is tight: neighbours lie outside the subject
    if first > 0:
        assert offsets[first - 1][1] <= start
    if last + 1 < len(offsets):
        assert offsets[last + 1][0] >= end
    return span


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize(("prompt", "subject", "prefix"), CASES)
def test_locate_subject(request, tok_name, prompt, subject, prefix):
    tokenizer = request.getfixturevalue(tok_name)
    span = _check_span(tokenizer, prompt, subject, prefix)
    if prefix:
        # the located subject is in the prompt part, after every prefix token
        offsets = tokenizer(span.text, return_offsets_mapping=True)["offset_mapping"]
        assert offsets[span.first_token][1] > len(prefix)


def test_subject_at_start_with_bos(tiny_tokenizer, tiny_bos_tokenizer):
    plain = locate_subject(tiny_tokenizer, "Danielle Darrieux speaks French", "Danielle Darrieux")
    bos = locate_subject(tiny_bos_tokenizer, "Danielle Darrieux speaks French", "Danielle Darrieux")
    assert plain.first_token == 0
    assert bos.input_ids[0] == tiny_bos_tokenizer.bos_token_id
    assert tiny_bos_tokenizer.bos_token_id not in plain.input_ids
    # BOS shifts every index by exactly one and is never part of the span
    assert bos.input_ids[1:] == plain.input_ids
    assert (bos.first_token, bos.last_token) == (plain.first_token + 1, plain.last_token + 1)
    assert bos.first_token == 1


def test_bos_shift_with_prefix(tiny_tokenizer, tiny_bos_tokenizer):
    prefix = "The Eiffel Tower is located in the city of Rome. "
    plain = locate_subject(tiny_tokenizer, "{} is in", "Eiffel Tower", prefix=prefix)
    bos = locate_subject(tiny_bos_tokenizer, "{} is in", "Eiffel Tower", prefix=prefix)
    assert (bos.first_token, bos.last_token) == (plain.first_token + 1, plain.last_token + 1)
    # the second occurrence (in the prompt), not the one in the prefix
    first_in_prefix = locate_subject(tiny_tokenizer, prefix.strip(), "Eiffel Tower")
    assert plain.first_token > first_in_prefix.last_token


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_template_equals_plain_prompt(request, tok_name):
    tokenizer = request.getfixturevalue(tok_name)
    a = locate_subject(tokenizer, "The mother tongue of {} is", "Michel Rocard")
    b = locate_subject(tokenizer, "The mother tongue of Michel Rocard is", "Michel Rocard")
    assert a == b


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_subject_not_found(request, tok_name):
    tokenizer = request.getfixturevalue(tok_name)
    with pytest.raises(SubjectNotFoundError) as info:
        locate_subject(tokenizer, "The Eiffel Tower is located in the city of", "Big Ben")
    assert "Big Ben" in str(info.value)
    # a subject that appears only in the prefix is still not in the prompt
    with pytest.raises(SubjectNotFoundError, match="Big Ben"):
        locate_subject(tokenizer, "It is in", "Big Ben", prefix="Big Ben is a clock. ")
    with pytest.raises(SubjectNotFoundError):
        locate_subject(tokenizer, "The Eiffel Tower is", "")
    # SubjectNotFoundError is a ValueError
    assert issubclass(SubjectNotFoundError, ValueError)


def test_fill_prompt():
    assert fill_prompt("{} plays jazz", "Freddy Cole") == ("Freddy Cole plays jazz", 0)
    assert fill_prompt("What does {} play?", "Freddy Cole") == ("What does Freddy Cole play?", 10)
    assert fill_prompt("What does Freddy Cole play?", "Freddy Cole") == ("What does Freddy Cole play?", 10)
    with pytest.raises(SubjectNotFoundError, match="Rome"):
        fill_prompt("Paris is in France", "Rome")


TARGETS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The Eiffel Tower is located in the city of", "Rome"),
    ("The name of the country of citizenship of Isabel May is", "United States of America"),
    ("What does Freddy Cole play?", "jazz"),
    ("Danielle Darrieux speaks", "French and English."),
    ("The capital of Italy is", "Zqx"),  # unseen word: byte tokens
]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize(("prompt", "target"), TARGETS)
def test_encode_target(request, tok_name, prompt, target):
    tokenizer = request.getfixturevalue(tok_name)
    prompt_ids = encode_prompt(tokenizer, prompt)
    assert prompt_ids == tokenizer(prompt)["input_ids"]
    target_ids = encode_target(tokenizer, prompt, target)
    full = tokenizer(prompt + " " + target)["input_ids"]
    assert prompt_ids + target_ids == full
    assert target_ids
    # passing the prompt ids gives the same ids
    assert encode_target(tokenizer, prompt, target, prompt_ids=prompt_ids) == target_ids
    # the target ids carry no special token and decode to the target after its space
    assert not set(tokenizer.all_special_ids) & set(target_ids)
    assert tokenizer.decode(target_ids) == " " + target


def test_encode_prompt_bos(tiny_tokenizer, tiny_bos_tokenizer):
    prompt = "The Eiffel Tower is"
    plain = encode_prompt(tiny_tokenizer, prompt)
    assert encode_prompt(tiny_bos_tokenizer, prompt) == [tiny_bos_tokenizer.bos_token_id, *plain]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("target", ["", " ", "\t"])
def test_encode_target_empty(request, tok_name, target):
    tokenizer = request.getfixturevalue(tok_name)
    with pytest.raises(ValueError, match="empty target"):
        encode_target(tokenizer, "The Eiffel Tower is located in the city of", target)
