"""The embedded SmolLM2-135M: converted once into the cache, loaded fast from there, the same files with
the GGUF parsed once (loading local directories is tested in ``tests/unit/test_models.py``)."""

import contextlib
import time

import pytest
import torch

from attnedit.core.files import cache_dir
from attnedit.core.models import DEFAULT_MODEL, load_model


@pytest.mark.smollm2
def test_smollm2_cached_and_fast(smollm2):
    assert (cache_dir() / "models" / DEFAULT_MODEL / "model.safetensors").is_file()
    a = smollm2.adapter
    assert (a.family, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == ("llama", 30, 9, 3, 64)
    start = time.perf_counter()
    again = load_model(DEFAULT_MODEL)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"cached load took {elapsed:.1f}s"  # generous bound; ~0.4 s measured
    assert again.fingerprint == smollm2.fingerprint
    ids = smollm2.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    top = smollm2.model(ids).logits[0, -1].argmax()
    assert smollm2.tokenizer.decode(top).strip() == "Paris"


@pytest.mark.smollm2
def test_the_gguf_parsed_once_converts_to_the_same_files(tmp_path, monkeypatch):
    """The embedded model's conversion with the GGUF parsed once (``hf_compat.gguf_parsed_once``) writes
    the same weights and tokenizer files as transformers' plain loading, and leaves ``gguf`` as it was."""
    import gguf
    from safetensors.torch import load_file

    from attnedit.core import hf_compat, models

    spec = models.EMBEDDED_MODELS[DEFAULT_MODEL]
    reader = gguf.GGUFReader
    folders = {}
    for way in ("once", "plain"):
        monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / way))
        if way == "plain":
            monkeypatch.setattr(models, "gguf_parsed_once", contextlib.nullcontext)
        folders[way] = models.materialise_gguf(spec)
    assert gguf.GGUFReader is reader and hf_compat.gguf_parsed_once is not contextlib.nullcontext
    once, plain = (load_file(str(folders[w] / "model.safetensors")) for w in ("once", "plain"))
    assert once.keys() == plain.keys() and all(torch.equal(once[k], plain[k]) for k in once)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (folders["once"] / name).read_text() == (folders["plain"] / name).read_text(), name
