"""Edited models out as standard Hugging Face checkpoints (``runs.export``, ``core.checkpoint``,
``attnedit export``, ``attnedit edit --export``, ``attnedit.export``).

Every family's tiny model is saved as a local directory (the base a user passes as ``--model``), edited
through ``load_model`` as the CLI edits it, and its exported checkpoint is loaded with nothing but
``transformers.AutoModelForCausalLM.from_pretrained``: the logits must be those of attnedit's edited
model, bit for bit, except for GPT-J's folded bias (equal up to float rounding, a tight tolerance).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from helpers import FAMILIES, ROOT, TINY_MEMAT, one_line_error, tiny_config, tiny_settings
from safetensors import safe_open
from typer.testing import CliRunner

import attnedit
from attnedit.cli.main import app
from attnedit.core.checkpoint import CheckpointError
from attnedit.core.data import EditCase, EditRequest, Probe
from attnedit.core.deltas import EditBuilder, WeightEdit
from attnedit.core.models import ModelBundle, load_model
from attnedit.editing.methods.memat import Memat, MematParams
from attnedit.editing.methods.rome import Rome, RomeParams
from attnedit.evaluation.metrics import summarize
from attnedit.runs import export as export_module
from attnedit.runs.export import ExportError, export

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

TEXT = "The Eiffel Tower is located in the city of Paris. Rome is the capital of Italy"
EIFFEL = EditRequest("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
CURIE = EditRequest("{} speaks the language", "Danielle Darrieux", "English", "French")
QWEN2_LAYERS = ["full_attention", "sliding_attention", "sliding_attention"]  # a window on layers 1 and 2
LACKS_O_BIAS = ["llama", "qwen2", "mistral", "gptj"]  # the families whose attention output has no bias


# --- helpers ------------------------------------------------------------------------------------------------


def _base(root: Path, family: str, tokenizer, seed: int = 0, **config) -> Path:
    """A tiny random ``family`` model (``config``: settings over ``helpers.tiny_config``) saved as a local
    Hugging Face directory ``root/family-seed``."""
    torch.manual_seed(seed)
    settings = tiny_config(family)
    for key, value in config.items():
        setattr(settings, key, value)
    model = T.AutoModelForCausalLM.from_config(settings)
    with (
        torch.no_grad()
    ):  # transformers initialises biases to zero: give them values (Qwen2's q/k/v carry over)
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    path = root / f"{family}-{seed}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def _plain(path: Path) -> T.PreTrainedModel:
    """The checkpoint loaded with plain transformers, as anyone would."""
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


def _case(request: EditRequest) -> EditCase:
    return EditCase(case_id="t", request=request, rewrite=(Probe(request.text, request.target_new),))


def _rome(corpus: str, layer: int = 1) -> Rome:
    return Rome(RomeParams(**tiny_settings(corpus, layers=[layer], steps=6)))


def _memat(corpus: str) -> Memat:
    return Memat(MematParams(**tiny_settings(corpus, **TINY_MEMAT)))


def _bias_edit(bundle: ModelBundle, layers: tuple[int, ...] = (0, 2)) -> WeightEdit:
    """A hand-made edit that creates output-projection biases (as MEMAT folds its corrections) and changes
    an MLP weight, left applied on ``bundle``."""
    gen = torch.Generator().manual_seed(3)
    with EditBuilder(bundle.model) as builder:
        for layer in layers:
            name = f"{bundle.adapter.module_name('attn_o', layer)}.bias"
            builder.add(name, 0.5 * torch.randn(bundle.adapter.hidden_size, generator=gen))
        weight = bundle.adapter.weight_name("mlp_down", 1)
        shape = dict(bundle.model.named_parameters())[weight].shape
        builder.add(weight, 0.05 * torch.randn(shape, generator=gen))
    applied = builder.finish(
        {
            "method": "hand",
            "hyperparameters": {"scale": 0.5},
            "requests": [EIFFEL],
            "model_fingerprint": bundle.fingerprint,
            "model_name": bundle.name,
        }
    )
    return applied.edit


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- every family, a ROME edit ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_an_exported_rome_edit_loads_in_plain_transformers_with_the_edited_logits(
    family, tiny_tokenizer, corpus, tmp_path
):
    base = _base(tmp_path, family, tiny_tokenizer)
    bundle = load_model(str(base))
    applied = _rome(corpus).apply(bundle, [_case(EIFFEL)])
    edited = _logits(bundle.model, bundle.tokenizer)
    path = applied.edit.save(tmp_path / "eiffel.safetensors")
    applied.revert()

    out = tmp_path / "exported"
    written = export(str(base), [path], out)
    plain = _plain(out)
    assert type(plain) is type(bundle.model) and written.architecture == type(bundle.model).__name__
    assert torch.equal(_logits(plain, T.AutoTokenizer.from_pretrained(out)), edited)
    assert not torch.equal(_logits(plain, bundle.tokenizer), _logits(bundle.model, bundle.tokenizer))
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= files
    assert "tokenizer.json" in files and "attnedit_export.json" in files
    card = (out / "README.md").read_text()
    assert f"`{_sha256(path)}`" in card and bundle.fingerprint in card
    assert "| Eiffel Tower | {} is located in the city of | Rome | Paris |" in card
    assert "method: **rome**" in card and "Scores: none recorded" in card
    record = json.loads((out / "attnedit_export.json").read_text())
    assert record["base"] == {
        "model": str(base),
        "fingerprint": bundle.fingerprint,
        "architecture": type(bundle.model).__name__,
        "dtype": "float32",
    }
    assert [e["sha256"] for e in record["edits"]] == [_sha256(path)] and record["notes"] == []


# --- biases an edit creates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", LACKS_O_BIAS)
def test_the_biases_memat_creates_load_in_plain_transformers(family, tiny_tokenizer, corpus, tmp_path):
    """Llama: attention_bias=true, zero biases elsewhere; Qwen2, Mistral: LlamaForCausalLM (exact); GPT-J:
    folded into the MLP output bias, equal up to float rounding (tolerance 1e-5: the logits are O(1), the
    difference is a few float32 ulps)."""
    base = _base(tmp_path, family, tiny_tokenizer)
    bundle = load_model(str(base))
    cases = [_case(EIFFEL), _case(CURIE)]
    applied = _memat(corpus).apply(bundle, cases)
    created = applied.edit.created
    assert created  # output-projection biases the family does not have
    edited = _logits(bundle.model, bundle.tokenizer)
    biases = {name: dict(bundle.model.named_parameters())[name].clone() for name in created}
    path = applied.edit.save(tmp_path / "memat.safetensors")
    applied.revert()

    written = export(str(base), [path], tmp_path / "out")
    plain = _plain(tmp_path / "out")
    logits = _logits(plain, bundle.tokenizer)
    card = (tmp_path / "out" / "README.md").read_text()
    params = dict(plain.named_parameters())
    if family == "gptj":
        assert type(plain).__name__ == "GPTJForCausalLM" and "mlp.fc_out.bias" in written.notes[0]
        assert all(plain.get_submodule(name.removesuffix(".bias")).bias is None for name in created)
        torch.testing.assert_close(logits, edited, rtol=1e-5, atol=1e-5)
        return
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.attention_bias is True
    assert torch.equal(logits, edited)
    for name, bias in biases.items():
        assert torch.equal(params[name], bias)
    q_bias = params[f"{bundle.adapter.module_name('attn_q', 0)}.bias"]
    if family == "qwen2":  # Qwen2's own q/k/v biases carry over
        original = dict(bundle.model.named_parameters())[f"{bundle.adapter.module_name('attn_q', 0)}.bias"]
        assert torch.equal(q_bias, original) and q_bias.abs().sum() > 0
    else:
        assert not q_bias.any()
    if family == "llama":
        assert "Saved as" not in card and "attention_bias=true" in card
    else:
        assert f"Saved as **LlamaForCausalLM** (the base is {type(bundle.model).__name__})" in card
        assert written.source_architecture == type(bundle.model).__name__


@pytest.mark.parametrize(
    "family, window",
    [
        ("mistral", {"sliding_window": 12}),  # every layer
        ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "layer_types": QWEN2_LAYERS}),
    ],
)
def test_a_sliding_window_dropped_by_the_llama_form_is_stated(
    family, window, tiny_tokenizer, tmp_path, caplog
):
    """A hand-made edit that creates biases on a model whose sliding window applies: the card and the log
    say so, and the logits are equal for inputs up to the window (and differ beyond it)."""
    base = _base(tmp_path, family, tiny_tokenizer, **window)
    bundle = load_model(str(base))
    edit = _bias_edit(bundle)
    short = "The Eiffel Tower"
    assert len(bundle.tokenizer(short).input_ids) <= 12 < len(bundle.tokenizer(TEXT).input_ids)
    edited_short, edited_long = (
        _logits(bundle.model, bundle.tokenizer, short),
        _logits(bundle.model, bundle.tokenizer),
    )
    path = edit.save(tmp_path / "bias.safetensors")
    with caplog.at_level(logging.WARNING, logger="attnedit"):
        written = export(str(base), [path], tmp_path / "out")
    layers = "[1, 2]" if family == "qwen2" else "[0, 1, 2]"
    assert any(f"sliding window of 12 tokens (layers {layers})" in r.getMessage() for r in caplog.records)
    assert written.caveats and "sliding window of 12 tokens" in (tmp_path / "out" / "README.md").read_text()
    plain = _plain(tmp_path / "out")
    assert torch.equal(_logits(plain, bundle.tokenizer, short), edited_short)
    assert not torch.allclose(_logits(plain, bundle.tokenizer)[-1], edited_long[-1])


def test_a_tied_llama_with_a_created_bias_keeps_its_tied_embeddings(tiny_tokenizer, tmp_path):
    base = _base(tmp_path, "llama", tiny_tokenizer, tie_word_embeddings=True)
    bundle = load_model(str(base))
    edit = _bias_edit(bundle, layers=(1,))
    edited = _logits(bundle.model, bundle.tokenizer)
    export(str(base), [edit.save(tmp_path / "bias.safetensors")], tmp_path / "out")
    plain = _plain(tmp_path / "out")
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert torch.equal(_logits(plain, bundle.tokenizer), edited)


def test_a_created_bias_no_standard_checkpoint_holds_is_refused(tiny_tokenizer, tmp_path):
    """GPT-J's output-projection bias folds into the MLP bias; a query bias has nowhere to go."""
    base = _base(tmp_path, "gptj", tiny_tokenizer)
    bundle = load_model(str(base))
    name = f"{bundle.adapter.module_name('attn_q', 1)}.bias"
    with EditBuilder(bundle.model) as builder:
        builder.add(name, torch.ones(bundle.adapter.hidden_size))
    edit = builder.finish({"method": "hand", "hyperparameters": {}, "requests": [EIFFEL]}).edit
    path = edit.save(tmp_path / "q-bias.safetensors")
    with pytest.raises(
        CheckpointError, match=rf"the edits create {re.escape(name)}: of the biases GPT-J lacks"
    ):
        export(str(base), [path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- several edits, refusals --------------------------------------------------------------------------------


def test_two_edits_apply_in_order_and_the_wrong_order_is_refused(tiny_tokenizer, corpus, tmp_path):
    base = _base(tmp_path, "llama", tiny_tokenizer)
    bundle = load_model(str(base))
    first = _rome(corpus).apply(bundle, [_case(EIFFEL)]).keep()
    second = _rome(corpus).apply(bundle, [_case(CURIE)]).keep()  # the same layer, on top of the first
    edited = _logits(bundle.model, bundle.tokenizer)
    paths = [first.edit.save(tmp_path / "1.safetensors"), second.edit.save(tmp_path / "2.safetensors")]

    written = export(str(base), paths, tmp_path / "both")
    assert torch.equal(_logits(_plain(tmp_path / "both"), bundle.tokenizer), edited)
    card = (tmp_path / "both" / "README.md").read_text()
    assert card.index("### 1. `1.safetensors`") < card.index("### 2. `2.safetensors`")
    assert [e.path for e in written.edits] == paths

    down = bundle.adapter.weight_name("mlp_down", 1)
    with pytest.raises(ExportError) as err:
        export(str(base), paths[::-1], tmp_path / "reversed")
    message = str(err.value)
    assert message.startswith(f"{paths[1]} does not fit the given model {str(base)!r}: {down} differs")
    assert "check=False" not in message and "\n" not in message
    with pytest.raises(ExportError, match=r"after the 1 edit\(s\) before it"):
        export(str(base), [paths[0], paths[0]], tmp_path / "twice")
    assert not (tmp_path / "reversed").exists() and not (tmp_path / "twice").exists()


def test_an_edit_of_another_model_is_refused_by_fingerprint_or_base_hashes(tiny_tokenizer, corpus, tmp_path):
    base, other = _base(tmp_path, "llama", tiny_tokenizer), _base(tmp_path, "llama", tiny_tokenizer, seed=1)
    bundle = load_model(str(base))
    edit = _rome(corpus).apply(bundle, [_case(EIFFEL)]).edit
    path = edit.save(tmp_path / "eiffel.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        assert (fh.metadata() or {})["model_name"] == str(base)
    fingerprint = load_model(str(other)).fingerprint
    with pytest.raises(ExportError) as err:
        export(str(other), [path], tmp_path / "out")
    assert str(err.value) == (
        f"{path} is an edit of {str(base)!r} (fingerprint {bundle.fingerprint}), not of the given model "
        f"{str(other)!r} (fingerprint {fingerprint}): export it with --model set to the model it was made on"
    )
    # a file saved before edits recorded their model's name (and here no fingerprint): its base hashes refuse
    old = WeightEdit(edit.deltas, edit.method, edit.hyperparameters, edit.requests, edit.base_hashes)
    old_path = old.save(tmp_path / "old.safetensors")
    with safe_open(str(old_path), framework="pt") as fh:
        assert "model_name" not in (fh.metadata() or {})
    assert WeightEdit.load(old_path).model_name == ""
    with pytest.raises(
        ExportError, match=r"old\.safetensors does not fit .* differs from the weights .* a model "
    ):
        export(str(other), [old_path], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export(str(base), [old_path], tmp_path / "out")  # its own base: accepted
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_output_is_written_atomically(tiny_tokenizer, corpus, tmp_path, monkeypatch):
    base = _base(tmp_path, "llama", tiny_tokenizer)
    bundle = load_model(str(base))
    path = _bias_edit(bundle).save(tmp_path / "bias.safetensors")
    out = tmp_path / "exports" / "model"

    def broken(result):  # fails after the weights and the tokenizer were written
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "model_card", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            export(str(base), [path], out)
    assert list(out.parent.iterdir()) == []  # no partial checkpoint, under the final name or another

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(str(base), [path], out)
    with monkeypatch.context() as patch:
        patch.setattr(export_module, "model_card", broken)
        with pytest.raises(RuntimeError):
            export(str(base), [path], out, overwrite=True)
    assert [p.name for p in out.parent.iterdir()] == ["model"] and (out / "keep.txt").read_text() == "mine"
    export(str(base), [path], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a new directory's mode, not a temporary one's
    assert [p.name for p in out.parent.iterdir()] == ["model"]
    (tmp_path / "empty").mkdir()
    attnedit.export(
        str(base), path, tmp_path / "empty"
    )  # an empty directory is taken; the API takes one file
    assert (tmp_path / "empty" / "README.md").is_file()


# --- scores of an evaluated edit ----------------------------------------------------------------------------


def test_an_edit_kept_by_an_eval_run_carries_its_scores(tiny_dir, corpus, tmp_path):
    run = tmp_path / "run"
    args = ["eval", "sample", "--model", str(tiny_dir), "--method", "rome", "--preset", "smollm2-135m"]
    args += ["-p", "layers=1", "-p", "steps=4", "-p", "stats_samples=40", "-p", f"stats_corpus={corpus}"]
    args += ["--limit", "2", "--save-edits", "--no-fluency", "--ppl-corpus", "none", "--out", str(run)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    saved = sorted((run / "edits").glob("*.safetensors"))
    assert len(saved) == 2
    written = export(str(tiny_dir), [saved[0]], tmp_path / "out")
    scores = written.edits[0].scores
    assert scores is not None
    edit = WeightEdit.load(saved[0])
    (record,) = [r for r in records if f"(case {r['case_id']})" in scores.source]
    assert len(records) == 2  # the other case is the other edit's
    es = summarize([record])["ES"]["mean"]
    assert f"| ES | {es:.1f} |" in scores.table and "single mode" in scores.source
    assert "with this edit alone applied to the base model" in scores.source
    card = (tmp_path / "out" / "README.md").read_text()
    assert scores.table in card and edit.requests[0].subject in card


# --- the command line ---------------------------------------------------------------------------------------


def test_edit_export_and_the_export_command(tiny_dir, corpus, tmp_path):
    runner = CliRunner()
    rome = ["--preset", "smollm2-135m", "-p", "layers=1", "-p", "steps=4", "-p", "stats_samples=40"]
    rome += ["-p", f"stats_corpus={corpus}"]
    request = [
        "--subject",
        "Eiffel Tower",
        "--prompt",
        "{} is located in the city of",
        "--target-new",
        "Rome",
    ]
    request += ["--target-true", "Paris", "--model", str(tiny_dir)]
    saved, first = tmp_path / "eiffel.safetensors", tmp_path / "from-edit"
    result = runner.invoke(app, ["edit", *request, *rome, "--save", str(saved), "--export", str(first)])
    assert result.exit_code == 0, result.output
    assert f"{first}: {tiny_dir} with 1 edit(s) as LlamaForCausalLM" in result.output
    card = (first / "README.md").read_text()
    assert "Scores: the answers `attnedit edit` printed" in card and "| edit prompt |" in card

    second = tmp_path / "from-export"
    result = runner.invoke(app, ["export", str(saved), "--model", str(tiny_dir), "--out", str(second)])
    assert result.exit_code == 0, result.output
    with (
        safe_open(str(first / "model.safetensors"), "pt") as a,
        safe_open(str(second / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert "Scores: none recorded" in (second / "README.md").read_text()

    # the README's plain-transformers block, as written, on the exported checkpoint
    (block,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
        if "from transformers import" in b
    ]
    shutil.copytree(first, tmp_path / "readme" / "eiffel-model")
    with contextlib.chdir(tmp_path / "readme"), contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(block, "README.md", "exec"), {})
    assert printed.getvalue().strip()  # the model's continuation

    again = ["export", str(saved), "--model", str(tiny_dir), "--out", str(second)]
    one_line_error(runner.invoke(app, again), "--out", str(second), "not empty", "--force")
    assert runner.invoke(app, [*again, "--force"]).exit_code == 0
    one_line_error(
        runner.invoke(app, ["edit", *request, *rome, "--save", str(saved), "--export", str(first)]),
        "--export",
        "not empty",
    )
    missing = tmp_path / "missing.safetensors"
    one_line_error(
        runner.invoke(app, ["export", str(missing), "--model", str(tiny_dir), "--out", str(tmp_path / "x")]),
        str(missing),
        "no such edit file",
    )
    other = _base(tmp_path, "llama", T.AutoTokenizer.from_pretrained(tiny_dir), seed=1)
    line = one_line_error(
        runner.invoke(app, ["export", str(saved), "--model", str(other), "--out", str(tmp_path / "x")]),
        str(saved),
        "not of the given model",
    )
    assert str(tiny_dir) in line and str(other) in line
    assert not (tmp_path / "x").exists()
