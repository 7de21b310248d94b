import pytest
import torch

from attnedit.core.models import ModelLoadError, load_model


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
