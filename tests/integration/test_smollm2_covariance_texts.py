"""The ``model`` statistics corpus shipped for SmolLM2-135M is what sampling gives (the sampling and its
cache are tested on tiny models in ``tests/unit/test_covariance_texts.py``)."""

from __future__ import annotations

import gzip
import json

import pytest

from attnedit.editing import covariance
from attnedit.editing.covariance import model_texts


@pytest.mark.smollm2
def test_the_shipped_smollm2_texts_are_what_sampling_gives(smollm2, isolated_cache, monkeypatch):
    """The file is this model's (full fingerprint), verifies, is used without sampling, and its first
    and last chunks are what ``_sample_texts`` samples now (each chunk has its own seed)."""
    from attnedit.editing.base import stats_spec
    from attnedit.editing.registry import make_editor

    spec = stats_spec(make_editor("rome", smollm2).params)
    path = covariance.shipped_texts_path(smollm2, spec)
    entry = json.loads(gzip.decompress(path.read_bytes()))
    assert entry["fingerprint"] == smollm2.fingerprint and len(entry["texts"]) == spec.samples == 1000
    saved = smollm2.cache.pop("sampled_texts", None)
    try:
        monkeypatch.setattr(covariance, "_sample_texts", lambda *a, **k: pytest.fail("sampled"))
        assert model_texts(smollm2, spec, progress=False) == entry["texts"]
        assert not (isolated_cache / "texts").exists()  # the shipped file is not copied
    finally:
        smollm2.cache.pop("sampled_texts", None)
        if saved is not None:
            smollm2.cache["sampled_texts"] = saved
    monkeypatch.undo()
    chunk = covariance.SAMPLING_CHUNK
    last = (spec.samples - 1) // chunk * chunk
    for start, stop in ((0, chunk), (last, spec.samples)):
        part = covariance.generate_chunk(smollm2, spec, start, stop)
        assert part == entry["texts"][start:stop], f"chunk at {start}"
