import contextlib
import time

import pytest
import torch

from attnedit.core.models import DEFAULT_MODEL, ModelLoadError, cache_dir, load_model


def test_local_directory_loads_with_adapter(tmp_path, tiny_tokenizer):
    from helpers import make_tiny

    bundle = make_tiny("gpt_neox", tiny_tokenizer)
    bundle.model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.adapter.family == "gpt_neox"
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded.model(ids).logits, bundle.model(ids).logits)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_bad_paths_and_offline_hub_id_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"without config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"is a file"):
        load_model(str(tmp_path / "weights.bin"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("some-org/not-a-real-model-attnedit")
    assert "hub id" in str(err.value) and "smollm2-135m" in str(err.value)


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
