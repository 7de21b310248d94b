"""Exporting an edit of the real SmolLM2-135M as a standard Hugging Face checkpoint."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import FIXTURES

import attnedit
from attnedit.core.data import EditRequest

pytestmark = pytest.mark.smollm2


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_a_rome_edit_of_smollm2_exported_answers_the_new_target(smollm2, tmp_path):
    """One ROME edit of SmolLM2-135M exported: plain transformers gives the edited logits and greedy
    decoding from the edit prompt starts with the new target."""
    overrides = {"stats_corpus": str(FIXTURES / "wikitext2_test.txt"), "stats_samples": 300}
    request = EditRequest("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    before = attnedit.answers(smollm2, [request.text], max_new_tokens=4)[0]
    assert not before.strip().startswith("Rome"), before  # the base model answers otherwise
    applied = attnedit.edit(smollm2, "rome", request, **overrides)
    edited = _logits(smollm2.model, smollm2.tokenizer, request.text)
    path = applied.edit.save(tmp_path / "eiffel.safetensors")
    applied.revert()

    attnedit.export("smollm2-135m", [path], tmp_path / "out")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = T.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(plain, tokenizer, request.text), edited)
    ids = tokenizer(request.text, return_tensors="pt")
    generated = plain.generate(**ids, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip().startswith("Rome"), answer
