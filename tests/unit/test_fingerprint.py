"""The model fingerprint is by content: the same weights anywhere give the same one, changed ones another."""

from __future__ import annotations

import os
import shutil

from safetensors.torch import load_file, save_file

from attnedit.core.models import _weights_fingerprint, load_model


def _weights(path):
    (file,) = path.glob("*.safetensors")
    return file


def test_same_weights_elsewhere_with_other_mtimes_same_fingerprint(tiny_dir, tmp_path):
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_dir, copy)
    for file in copy.iterdir():
        os.utime(file, (1_000_000_000, 1_000_000_000))  # 2001, unlike the originals
    assert _weights(copy).stat().st_mtime_ns != _weights(tiny_dir).stat().st_mtime_ns
    original = load_model(str(tiny_dir)).fingerprint
    assert load_model(str(copy)).fingerprint == original
    assert _weights_fingerprint(copy, "a") == _weights_fingerprint(tiny_dir, "b") == original


def test_changed_tensor_value_changes_the_fingerprint(tiny_dir, tmp_path):
    original = _weights_fingerprint(tiny_dir, "tiny")
    for position in (0, -1):  # the first and the last entry of a tensor are both in the hashed sample
        copy = tmp_path / f"edited{position}"
        shutil.copytree(tiny_dir, copy)
        tensors = load_file(_weights(copy))
        name = sorted(tensors)[len(tensors) // 2]
        tensors[name].view(-1)[position] += 1.0
        save_file(tensors, _weights(copy), metadata={"format": "pt"})
        assert _weights_fingerprint(copy, "tiny") != original, (position, name)
        tensors[name].view(-1)[position] -= 1.0  # back to the original bytes: back to its fingerprint
        save_file(tensors, _weights(copy), metadata={"format": "pt"})
        assert _weights_fingerprint(copy, "tiny") == original


def test_config_change_changes_the_fingerprint(tiny_dir, tmp_path):
    copy = tmp_path / "config"
    shutil.copytree(tiny_dir, copy)
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert (copy / "config.json").read_text() != config
    assert _weights_fingerprint(copy, "tiny") != _weights_fingerprint(tiny_dir, "tiny")
