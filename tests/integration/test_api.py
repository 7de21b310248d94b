"""The public Python API (``attnedit.*``): the README's Python block runs as written, edits revert."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_tiny

import attnedit
import attnedit.api
from attnedit.core.deltas import model_hash
from attnedit.editing.presets import PresetError

README = ROOT / "README.md"
REQ = attnedit.EditRequest("{} is in", "Eiffel Tower", "Rome", "Paris")


def _readme_python_block() -> str:
    """The README's Python block of the attnedit API (the one that imports attnedit)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    blocks = [b for b in blocks if "import attnedit" in b]
    assert len(blocks) == 1, "README has no (or more than one) python block importing attnedit"
    return blocks[0]


@pytest.fixture
def tiny_presets(tmp_path, monkeypatch) -> Path:
    """Presets for the tiny Llama (ROME, MEMIT) in a user preset directory, statistics from a small corpus."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The city number {i} lies on the river {i % 7}." for i in range(40)))
    root = tmp_path / "presets"
    common = {"steps": 4, "stats_corpus": str(corpus), "stats_samples": 40, "stats_max_tokens": 32}
    for method, layers in (("rome", [1]), ("memit", [1, 2])):
        (root / method).mkdir(parents=True)
        preset = {
            "method": method,
            "model": "tiny-llama",
            "source": "test",
            "params": {"layers": layers, "templates": [[4, 2]], **common},
            "sadr": {"gamma": 0.05, "heads": "selective"},
        }
        (root / method / "tiny-llama.json").write_text(json.dumps(preset))
    monkeypatch.setenv("ATTNEDIT_PRESETS", str(root))
    return root


def test_readme_python_block_runs_as_written(tmp_path, monkeypatch, tiny_tokenizer, tiny_presets, capsys):
    bundle = make_tiny("llama", tiny_tokenizer)
    monkeypatch.setattr(attnedit.api, "_load_model", lambda name, **kwargs: bundle)
    monkeypatch.chdir(tmp_path)
    before = model_hash(bundle.model)
    exec(compile(_readme_python_block(), str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "'right_nll'" in printed  # the ES record was printed (log lines may share stdout)
    assert sum(line.startswith("[") for line in printed.splitlines()) >= 2  # the two answer lists
    assert (tmp_path / "eiffel.safetensors").is_file()
    assert model_hash(bundle.model) == before  # every edit of the block was reverted


def test_edit_reverts_on_exit_even_on_error_and_keep_keeps(tiny_tokenizer, tiny_presets):
    bundle = make_tiny("llama", tiny_tokenizer)
    original = model_hash(bundle.model)
    with pytest.raises(RuntimeError, match="inside"), attnedit.edit(bundle, "rome", REQ) as applied:
        assert model_hash(bundle.model) != original
        assert applied.edit.deltas
        raise RuntimeError("inside")
    assert model_hash(bundle.model) == original
    kept = attnedit.edit(bundle, "rome", REQ, keep=True)
    with kept:
        pass
    assert model_hash(bundle.model) != original
    kept.revert()
    assert model_hash(bundle.model) == original


def test_a_target_cache_lets_a_second_batch_edit_skip_its_optimisation(
    tiny_tokenizer, tiny_presets, tmp_path
):
    from attnedit.editing import optimise

    bundle = make_tiny("llama", tiny_tokenizer)
    requests = [REQ, attnedit.EditRequest("{} is in", "Colosseum", "Paris", "Rome")]
    with attnedit.target_cache(tmp_path / "targets"):
        with attnedit.edit(bundle, "memit", requests) as first:
            deltas = first.edit.deltas
        assert list((tmp_path / "targets").glob("*.safetensors"))
        steps = []
        real = optimise.adam_loop
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(optimise, "adam_loop", lambda *a, **k: steps.append(1) or real(*a, **k))
            with attnedit.edit(bundle, "memit", requests) as second:
                assert all(torch.equal(second.edit.deltas[k], v) for k, v in deltas.items())
        assert not steps  # the targets came from the cache


def test_settings_are_routed_and_checked(tiny_tokenizer, tiny_presets):
    bundle = make_tiny("llama", tiny_tokenizer)
    editor = attnedit.editor(bundle, "rome+sadr", steps=3, gamma=0.2)
    hyper = editor.hyperparameters()
    assert hyper["steps"] == 3 and hyper["terms"][0]["gamma"] == 0.2
    assert attnedit.editor(bundle, "rome", layers=[2]).hyperparameters()["layers"] == [2]  # the edit layer
    hyper = attnedit.editor(bundle, "rome+sadr", layers=[2], sadr_layers=(1, 2)).hyperparameters()
    assert hyper["terms"][0]["layers"] == [1, 2]  # sadr_KEY is SADR's setting
    assert hyper["layers"] == [2]  # layers= stays the method's field, +sadr or not
    with pytest.raises(ValueError, match="rome\\+sadr"):
        attnedit.editor(bundle, "rome", gamma=0.2)  # a SADR setting needs the +sadr method
    with pytest.raises(PresetError, match="no_such_field"):
        attnedit.editor(bundle, "rome", no_such_field=1)


def test_the_preset_comes_from_the_bundles_model_never_a_default(tiny_tokenizer):
    bundle = make_tiny("gpt2", tiny_tokenizer)  # no preset for tiny-gpt2
    with pytest.raises(PresetError, match="tiny-gpt2"):
        attnedit.editor(bundle, "rome")
    with torch.no_grad():
        assert attnedit.answers(bundle, "Paris is")[0] == attnedit.answers(bundle, ["Paris is"])[0]


def test_from_model_wraps_a_transformers_model(tiny_tokenizer):
    model = make_tiny("qwen2", tiny_tokenizer).model
    bundle = attnedit.from_model(model, tiny_tokenizer, name="my-qwen")
    assert bundle.name == "my-qwen" and bundle.adapter.n_layers == model.config.num_hidden_layers
    assert attnedit.load_cases("sample")[0].request.subject


def test_import_attnedit_does_not_import_torch():
    code = "import sys, attnedit; assert 'torch' not in sys.modules; attnedit.EditRequest; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    assert set(attnedit.__all__) >= {"load_model", "from_model", "edit", "answers", "evaluate", "load_cases"}
    for name in attnedit._API:  # every public name resolves, and has a docstring
        assert getattr(attnedit, name).__doc__, name
