import json

from typer.testing import CliRunner

from attnedit.cli.main import app

runner = CliRunner()


def _tiny_dir(tmp_path, tokenizer):
    from conftest import make_tiny

    path = tmp_path / "model"
    bundle = make_tiny("gpt2", tokenizer)
    bundle.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_models_lists_default_and_families():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "gpt_neox" in result.output


def test_eval_and_report(tmp_path, tiny_tokenizer):
    model = _tiny_dir(tmp_path, tiny_tokenizer)
    outs = []
    for shard in ("0/2", "1/2"):
        out = tmp_path / f"run{shard[0]}"
        result = runner.invoke(
            app,
            [
                "eval",
                "sample",
                "--model",
                str(model),
                "--limit",
                "4",
                "--shard",
                shard,
                "--out",
                str(out),
                "--max-new-tokens",
                "8",
                "--generation-prompts",
                "1",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "| none |" in result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ES"]["n"] == 2 and summary["FL"]["mean"] is not None and summary["PPL"]["mean"] > 1
        outs.append(str(out))
    result = runner.invoke(app, ["report", *outs, "--out", str(tmp_path / "rep"), "--magnitudes", "--extra"])
    assert result.exit_code == 0, result.output
    assert "| none | 4 |" in result.output
    for name in ("report.md", "report.csv", "report.json"):
        assert (tmp_path / "rep" / name).is_file()
    # paired differences: a report whose only row is the --against row has no other row to pair
    again = runner.invoke(app, ["report", outs[0], "--against", "none", "--out", str(tmp_path / "rep2")])
    assert again.exit_code == 0, again.output
    assert "| Method - none | cases |" in again.output
    assert json.loads((tmp_path / "rep2" / "paired.json").read_text()) == {"against": "none", "rows": {}}
    bad = runner.invoke(app, ["report", *outs, "--against", "rome"])
    assert bad.exit_code == 2 and "no row has this label" in bad.output


def test_eval_bad_input_is_a_clear_error(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [{"requested_rewrite": {"prompt": "X is", "subject": "Y", "target_new": "a", "target_true": "b"}}]
        )
    )
    result = runner.invoke(
        app,
        ["eval", str(bad), "--model", str(_tiny_dir(tmp_path, tiny_tokenizer)), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2
    assert "bad.json[0]" in result.output and "requested_rewrite.prompt" in result.output
    result = runner.invoke(app, ["eval", "sample", "--shard", "3/2", "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2


def test_sadr_options_become_typed_settings():
    """--gamma/--sadr-* and --param sadr_KEY=VALUE go to make_editor's sadr= argument, not to the preset."""
    import pytest
    import typer

    from attnedit.cli.main import _with_sadr
    from attnedit.editing.registry import make_editor

    method, params, sadr = _with_sadr("rome", ["steps=3", "sadr_heads=all"], True, 0.5, None, "6-29", None)
    assert (method, params) == ("rome+sadr", {"steps": "3"})
    assert sadr == {"heads": "all", "gamma": 0.5, "layers": "6-29"}
    settings = make_editor(method, "smollm2-135m", overrides=params, sadr=sadr).terms[0].settings
    assert (settings.gamma, settings.heads, settings.layers) == (0.5, "all", (6, 29))
    with pytest.raises(typer.BadParameter, match="gamma is given twice"):
        _with_sadr("rome+sadr", ["sadr_gamma=0.1"], False, 0.5, None, None, None)
    # without +sadr, the settings are refused by make_editor
    method, params, sadr = _with_sadr("rome", ["sadr_gamma=0.1"], False, None, None, None, None)
    with pytest.raises(ValueError, match="need a '\\+sadr' method"):
        make_editor(method, "smollm2-135m", overrides=params, sadr=sadr)
