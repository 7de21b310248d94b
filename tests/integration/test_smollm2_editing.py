"""Editing the real SmolLM2-135M with every method at its preset: efficacy, exact revert, the CLI."""

from __future__ import annotations

import pytest
from helpers import FIXTURES
from typer.testing import CliRunner

from attnedit.cli.main import app
from attnedit.core.data import load_cases
from attnedit.core.deltas import WeightEdit, model_hash
from attnedit.core.scoring import score_targets
from attnedit.editing.registry import make_editor

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def stats_overrides() -> dict:
    # a small WikiText sample keeps the test fast (the fixture holds the file's lines up to its 300th
    # text); the benchmarks use 5,000 lines
    return {"stats_corpus": str(FIXTURES / "wikitext2_test.txt"), "stats_samples": "300"}


@pytest.fixture(scope="module")
def dev_cases():
    return load_cases(str(FIXTURES / "sadr_merged_counterfact.json")).cases[:2]


def _margin(bundle, case) -> float:
    """log P(o_new) - log P(o_true) on the edit prompt (> 0: the edit succeeds, ES)."""
    req = case.request
    new, true = score_targets(
        bundle.model,
        bundle.tokenizer,
        bundle.adapter,
        [(req.text, req.target_new), (req.text, req.target_true)],
    )
    return true.nll - new.nll


@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "ft"])
def test_every_method_edits_smollm2_and_reverts_exactly(smollm2, dev_cases, stats_overrides, method):
    overrides = {} if method == "ft" else stats_overrides
    editor = make_editor(method, smollm2, overrides=overrides)
    original = model_hash(smollm2.model)
    margins = []
    for case in dev_cases:
        before = _margin(smollm2, case)
        applied = editor.apply(smollm2, [case])
        margins.append((before, _margin(smollm2, case)))
        applied.revert()
        assert model_hash(smollm2.model) == original
    for before, after in margins:
        assert before < 0  # the model prefers o_true before the edit
        assert after > before
        if method in ("rome", "memit"):  # PMET and constrained fine-tuning: measured in the benchmark table
            assert after > 0, (method, margins)


def test_batch_memit_and_saved_edit_on_smollm2(smollm2, dev_cases, stats_overrides, tmp_path):
    editor = make_editor("memit", smollm2, overrides=stats_overrides)
    applied = editor.apply(smollm2, dev_cases)
    assert all(_margin(smollm2, c) > 0 for c in dev_cases)
    ids = smollm2.tokenizer(dev_cases[0].request.text, return_tensors="pt")["input_ids"]
    edited_logits = smollm2.model(input_ids=ids).logits
    path = applied.edit.save(tmp_path / "memit.safetensors")
    applied.revert()
    reapplied = WeightEdit.load(path).apply(smollm2.model)
    assert (smollm2.model(input_ids=ids).logits == edited_logits).all()
    reapplied.revert()


def test_cli_edit_prints_answers_and_saves(stats_overrides, tmp_path):
    out = tmp_path / "eiffel.safetensors"
    result = CliRunner().invoke(
        app,
        [
            "edit",
            "--subject",
            "Eiffel Tower",
            "--prompt",
            "The Eiffel Tower is located in the city of",
            "--target-new",
            "Rome",
            "--target-true",
            "Paris",
            "--paraphrase",
            "The Eiffel Tower stands in",
            "--neighbor",
            "The Louvre is located in the city of",
            "--save",
            str(out),
            *[x for k, v in stats_overrides.items() for x in ("-p", f"{k}={v}")],
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| edit prompt |" in result.output and "| neighbour |" in result.output
    edit = WeightEdit.load(out)
    assert edit.requests[0].target_new == "Rome" and edit.method == "rome"


def test_cli_edit_names_the_problem(tmp_path):
    result = CliRunner().invoke(
        app, ["edit", "--subject", "Colosseum", "--prompt", "The Eiffel Tower is in", "--target-new", "Rome"]
    )
    assert result.exit_code == 2


def test_sadr_on_smollm2_restrains_the_drift_and_keeps_the_edit(smollm2, dev_cases, stats_overrides):
    original = model_hash(smollm2.model)
    drift, margins = {}, {}
    for gamma in (0.0, 1.0):
        editor = make_editor(
            "rome+sadr", smollm2, overrides={**stats_overrides, "steps": 20}, sadr={"gamma": gamma}
        )
        applied = editor.apply(smollm2, dev_cases[:1])
        parts = applied.edit.info["loss_parts"][0]
        drift[gamma] = parts["sadr.kl_all_heads"]
        margins[gamma] = _margin(smollm2, dev_cases[0])
        applied.revert()
        assert model_hash(smollm2.model) == original
    assert drift[1.0] < drift[0.0]
    assert margins[1.0] > 0 and margins[0.0] > 0


def test_cli_edit_with_sadr(stats_overrides, tmp_path):
    out = tmp_path / "sadr.safetensors"
    args = ["edit", "--file", "sample", "--index", "0", "--sadr", "--gamma", "0.05", "--save", str(out)]
    args += ["-p", "steps=10", *[x for k, v in stats_overrides.items() for x in ("-p", f"{k}={v}")]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    edit = WeightEdit.load(out)
    assert edit.method == "rome+sadr"
    assert edit.hyperparameters["terms"][0]["gamma"] == 0.05 and edit.hyperparameters["steps"] == 10
    assert "sadr" in edit.info["loss_parts"][0]
