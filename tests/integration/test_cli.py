import json

import pytest
from helpers import one_line_error
from typer.testing import CliRunner

from attnedit.cli.main import app

runner = CliRunner()


def _tiny_dir(tmp_path, tokenizer):
    from helpers import make_tiny

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

    from attnedit.cli.common import MethodChoice, method_choice
    from attnedit.editing.registry import make_editor

    choice = method_choice("rome", "x.json", ["steps=3", "sadr_heads=all"], True, 0.5, None, "6-29", None)
    assert choice == MethodChoice(
        "rome+sadr", "x.json", {"steps": "3"}, {"heads": "all", "gamma": 0.5, "layers": "6-29"}
    )
    settings = (
        make_editor(choice.method, "smollm2-135m", overrides=choice.params, sadr=choice.sadr)
        .terms[0]
        .settings
    )
    assert (settings.gamma, settings.heads, settings.layers) == (0.5, "all", (6, 29))
    with pytest.raises(typer.BadParameter, match="gamma is given twice"):
        method_choice("rome+sadr", None, ["sadr_gamma=0.1"], False, 0.5, None, None, None)
    # without +sadr, the settings are refused as they are split, before any work; and by make_editor
    with pytest.raises(ValueError, match="need a '\\+sadr' method"):
        method_choice("rome", None, ["sadr_gamma=0.1"], False, None, None, None, None)
    choice = method_choice("rome", None, [], False, 0.1, None, None, None)
    with pytest.raises(ValueError, match="need a '\\+sadr' method"):
        make_editor(choice.method, "smollm2-135m", overrides=choice.params, sadr=choice.sadr)
    # a plain -p key goes to SADR on a +sadr method when the method has no such field
    plain = method_choice("rome+sadr", None, ["gamma=0.2", "layers=4"], False, None, None, None, None)
    assert (plain.params, plain.sadr) == ({"layers": "4"}, {"gamma": "0.2"})


def test_every_command_takes_the_shared_method_flags():
    """The method flags are declared once (``edit_method``) and reach eval, edit, inspect and the
    analyses of an edit alike: a SADR flag given twice is refused the same way by each, before any work."""
    from typer.testing import CliRunner

    from attnedit.cli.main import app

    commands = (["eval", "sample"], ["edit", "--subject", "X"], ["inspect", "--html", "x.html"])
    commands += (["analyze", "drift"], ["analyze", "patch"], ["analyze", "substitute"])
    for command in commands:
        flags = ["--method", "rome+sadr", "--gamma", "1", "-p", "sadr_gamma=2"]
        result = CliRunner().invoke(app, [*command, *flags])
        assert result.exit_code == 2, (command, result.output)
        assert "gamma is given twice" in result.output, command
    trace = CliRunner().invoke(app, ["analyze", "trace", "--method", "rome"])
    assert trace.exit_code == 2 and "No such option" in trace.output  # tracing reads the unedited model


# --- issue 15: flags checked before any work, one error boundary --------------------------------------


def test_bad_flags_fail_before_the_model_loads(tmp_path):
    """A model that does not exist: had the flag check come after loading, the error would name it."""
    nowhere = str(tmp_path / "no-such-model")
    for flags, needle in (
        (["--limit", "0"], "--limit must be at least 1 (got 0)"),  # ran every case
        (["--limit", "-1"], "--limit must be at least 1 (got -1)"),  # dropped the last case
        (["--first", "-2"], "--first must be 0 or more"),
    ):
        out = tmp_path / "o"
        for command in (["eval", "sample"], ["analyze", "trace", "sample"]):
            result = runner.invoke(app, [*command, "--model", nowhere, "--out", str(out), *flags])
            one_line_error(result, needle)
        assert not out.exists()  # nothing was started
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    result = runner.invoke(app, ["eval", "sample", "--model", nowhere, "--out", str(a_file)])
    one_line_error(result, "--out", "not a directory")
    result = runner.invoke(app, ["eval", "sample", "--model", nowhere, "--out", str(a_file / "run")])
    one_line_error(result, "--out", "cannot write there")
    result = runner.invoke(app, ["analyze", "drift", "sample", "--model", nowhere, "--out", str(a_file)])
    one_line_error(result, "--out", "not a directory")
    result = runner.invoke(
        app,
        ["eval", "sample", "--model", nowhere, "--out", str(tmp_path / "o"), "--targets-cache", str(a_file)],
    )
    one_line_error(result, "--targets-cache", "not a directory")
    assert a_file.read_text() == "not a directory"
    result = runner.invoke(
        app,
        ["eval", "sample", "--model", nowhere, "--out", str(tmp_path / "o2"), "--knowedit-sampling", "case"],
    )
    one_line_error(result, "--knowedit-sampling must be one of batch, prompt, not 'case'")
    assert not (tmp_path / "o2").exists()


def test_read_only_out_fails_before_the_model_loads(tmp_path, monkeypatch):
    """An --out on a read-only file system. Tests run as root (CI), who may write anywhere a mode bit
    forbids, so the file system's answer is simulated: the write of the probe file fails with EROFS, as
    it does on a read-only mount."""
    import errno
    import os
    import pathlib

    def read_only(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", read_only)
    nowhere = str(tmp_path / "no-such-model")
    for command in (["eval", "sample"], ["analyze", "trace", "sample"]):
        result = runner.invoke(app, [*command, "--model", nowhere, "--out", str(tmp_path / "ro")])
        one_line_error(result, "--out", "cannot write there", "Read-only file system")


def test_edit_save_checked_before_the_edit(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    request = ["edit", "--subject", "Paris", "--prompt", "{} is in", "--target-new", "Rome"]
    nowhere = ["--model", str(tmp_path / "no-such-model")]
    for save, needle in ((a_file / "edit.safetensors", "cannot write there"), (tmp_path, "is a directory")):
        result = runner.invoke(app, [*request, *nowhere, "--save", str(save)])
        one_line_error(result, "--save", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no stray temp file


def test_preset_and_data_errors_are_one_line(tmp_path, tiny_tokenizer):
    """-p steps=0 (was a KeyError traceback), -p lr=inf (a NonFiniteLossError traceback), a target_new
    equal to target_true (caught only at edit time, so --skip-invalid could not skip it)."""
    from attnedit.core.data import sample_path

    model = str(_tiny_dir(tmp_path, tiny_tokenizer))
    records = json.loads(sample_path().read_text())[:2]
    rewrite = records[1]["requested_rewrite"]
    rewrite["target_new"] = rewrite["target_true"].upper()
    data = tmp_path / "same.json"
    data.write_text(json.dumps(records))
    fast = ["--max-new-tokens", "2", "--generation-prompts", "1", "--ppl-corpus", "none"]
    rome = ["--method", "rome", "--preset", "smollm2-135m", "-p", "layers=1", "-p", "stats_samples=4"]
    for override, needle in (("steps=0", "steps=0"), ("steps=-5", "steps=-5"), ("lr=inf", "lr=inf")):
        result = runner.invoke(
            app, ["eval", "sample", "--model", model, *rome, "-p", override, "--out", str(tmp_path / "p")]
        )
        one_line_error(result, needle, "--param")
    result = runner.invoke(app, ["eval", str(data), "--model", model, "--out", str(tmp_path / "d"), *fast])
    one_line_error(result, "same.json[1]", "target_new", "equals target_true")
    result = runner.invoke(
        app, ["eval", str(data), "--model", model, "--out", str(tmp_path / "d2"), "--skip-invalid", *fast]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d2" / "summary.json").read_text())["ES"]["n"] == 1


@pytest.mark.parametrize("error", ["UnitsFailedError", "PrepareFailedError"])
def test_units_whose_workers_died_are_one_line_with_exit_code_1(tmp_path, monkeypatch, error):
    import attnedit.runs.runner
    from attnedit.runs import executors

    def died(config, ray=None):
        raise getattr(executors, error)("2 case(s) failed on every try: ['3', '4']")

    monkeypatch.setattr(attnedit.runs.runner, "run", died)
    result = runner.invoke(app, ["eval", "sample", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: 2 case(s) failed on every try: ['3', '4']"


def test_unexpected_error_keeps_traceback_and_says_bug(tmp_path, monkeypatch):
    import attnedit.runs.runner

    def broken(config):
        raise KeyError("oops")

    monkeypatch.setattr(attnedit.runs.runner, "run", broken)
    result = runner.invoke(app, ["eval", "sample", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "KeyError: 'oops'" in result.stderr
    assert "this is a bug in attnedit" in result.stderr.splitlines()[-1]


def test_eval_repair_quarantines_unreadable_lines_and_keeps_every_record(tmp_path, tiny_tokenizer):
    model = str(_tiny_dir(tmp_path, tiny_tokenizer))
    out = tmp_path / "run"
    args = ["eval", "sample", "--model", model, "--limit", "3", "--out", str(out), "--no-fluency"]
    args += ["--ppl-corpus", "none"]
    assert runner.invoke(app, args).exit_code == 0
    results = out / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text(lines[0] + "{not json\n" + lines[1] + lines[2])
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "line 2" in refused.output and "--repair" in refused.output
    repaired = runner.invoke(app, [*args, "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert "1 unreadable line" in repaired.output
    assert results.read_text() == "".join(lines)  # every valid record kept, nothing recomputed twice
    assert (out / "results.jsonl.quarantine").read_text() == "{not json\n"


def test_typer_usage_errors_raised_in_a_command_are_usage_errors(tmp_path, monkeypatch):
    """typer ships its own copy of click: a ``typer.BadParameter`` raised inside a command is a usage error
    (exit 2, the flag named), not reported as a bug by the error boundary."""
    from typer.testing import CliRunner

    from attnedit.cli.main import app

    monkeypatch.chdir(tmp_path)  # short paths: the error box wraps long lines
    result = CliRunner().invoke(app, ["serve", "--runs", "missing"])
    assert result.exit_code == 2 and "--runs" in result.output and "is not a directory" in result.output
    assert "internal error" not in result.output
    result = CliRunner().invoke(
        app, ["eval", "sample", "-p", "foo", "--limit", "1", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "--param expects KEY=VALUE" in result.output
    assert "internal error" not in result.output
