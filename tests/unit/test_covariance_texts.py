"""The ``model`` statistics corpus: texts sampled once per model and spec, cached, shipped for SmolLM2."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch
from helpers import make_tiny

from attnedit.editing import covariance
from attnedit.editing.covariance import StatsSpec, model_texts, second_moments


def test_sampled_texts_are_cached_and_reused_by_other_layers(tiny_tokenizer, isolated_cache, monkeypatch):
    bundle = make_tiny("llama", tiny_tokenizer)
    spec = StatsSpec(corpus="model", samples=6, sample_length=4, max_tokens=16, batch_tokens=64)
    calls = []
    real = covariance._sample_texts
    monkeypatch.setattr(covariance, "_sample_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = second_moments(bundle, "mlp_down", [0], spec, progress=False)[0]
    texts = model_texts(bundle, spec)
    (path,) = (isolated_cache / "texts").glob("*.json")
    assert json.loads(path.read_text())["texts"] == texts and len(texts) == 6
    bundle.cache.clear()  # a new process: the texts come from disk, another layer needs no sampling
    second_moments(bundle, "mlp_down", [1], spec, progress=False)
    assert torch.equal(second_moments(bundle, "mlp_down", [0], spec, progress=False)[0], first)
    assert calls == [1]


def test_a_bad_sampled_texts_file_is_set_aside_and_sampled_again(tiny_tokenizer, isolated_cache, caplog):
    bundle = make_tiny("gpt2", tiny_tokenizer)
    spec = StatsSpec(corpus="model", samples=3, sample_length=4)
    texts = model_texts(bundle, spec, progress=False)
    (path,) = (isolated_cache / "texts").glob("*.json")
    good = path.read_text()
    path.write_text(json.dumps({**json.loads(good), "texts": ["injected", *texts[1:]]}))
    bundle.cache.clear()
    with caplog.at_level(logging.WARNING, logger="attnedit.editing"):
        assert model_texts(bundle, spec, progress=False) == texts
    assert "does not verify" in caplog.text and str(path) in caplog.text
    assert path.read_text() == good


def test_a_damaged_shipped_texts_file_is_a_clear_error(tiny_tokenizer, isolated_cache, tmp_path, monkeypatch):
    bundle = make_tiny("llama", tiny_tokenizer)
    spec = StatsSpec(corpus="model", samples=2, sample_length=4)
    shipped = tmp_path / "shipped.json.gz"
    monkeypatch.setattr(covariance, "shipped_texts_path", lambda b, s: shipped)
    entry = {"fingerprint": bundle.fingerprint, "seed": 0, "sample_length": 4, "chunk": 64}
    shipped.write_bytes(gzip.compress(json.dumps({**entry, "texts": ["a", "b"], "sha256": "0"}).encode()))
    with pytest.raises(ValueError, match=r"do not verify.*reinstall"):
        model_texts(bundle, spec, progress=False)
    shipped.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"do not load.*reinstall"):
        model_texts(bundle, spec, progress=False)
