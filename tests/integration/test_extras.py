"""A missing optional extra is one line naming the ``pip install`` to run (exit 2), before any model loads.

The extras are simulated as missing by ``sys.modules[name] = None`` (``importlib.util.find_spec`` then
finds nothing and an import fails), in-process for the commands (typer's ``CliRunner``, with every
model loader replaced by one that records its calls) and in a subprocess for the exact stderr.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import attnedit
from attnedit.cli.main import app
from attnedit.core import extras
from attnedit.core.deltas import model_hash
from attnedit.core.extras import EXTRAS, MissingExtraError, require_extra
from attnedit.editing.spec import MethodSpec, parse_method, register, registered

ROOT = Path(__file__).resolve().parents[2]
MEMAT_LINE = "method 'memat' needs scikit-learn, which is not installed: pip install 'attnedit[memat]'"
RAY_LINE = "--backend ray needs ray, which is not installed: pip install 'attnedit[ray]'"
SERVE_LINE = "attnedit serve needs fastapi, which is not installed: pip install 'attnedit[serve]'"


def _missing(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every model loader of attnedit (``core.models.load_model`` and each module's reference to it)
    replaced by one that records the call and refuses to load."""
    from attnedit.core import models

    calls: list[tuple] = []
    original = models.load_model

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("a model was loaded")

    for name, module in list(sys.modules.items()):
        if not name.startswith("attnedit") or module is None:
            continue
        for attr in ("load_model", "_load_model"):
            if getattr(module, attr, None) is original:
                monkeypatch.setattr(module, attr, recording)
    return calls


def _one_line_error(result, line: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {line}"], result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


# --- the table of extras is pyproject.toml's -----------------------------------------------------------


def test_the_extras_table_matches_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # docs and dev build the site and run the tests: no code of the package needs them
    assert set(EXTRAS) == set(declared) - {"docs", "dev"}
    for extra, modules in EXTRAS.items():
        distributions = {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower() for req in declared[extra]}
        assert set(modules.values()) == distributions, extra


def test_require_extra_names_only_what_is_missing(monkeypatch):
    require_extra("serve", "attnedit serve")  # installed in the test environment: no error
    _missing(monkeypatch, "uvicorn")
    assert extras.missing_modules("serve") == ["uvicorn"]
    with pytest.raises(MissingExtraError) as err:
        require_extra("serve", "attnedit serve")
    assert (
        str(err.value)
        == "attnedit serve needs uvicorn, which is not installed: pip install 'attnedit[serve]'"
    )
    _missing(monkeypatch, "fastapi")
    with pytest.raises(MissingExtraError, match="needs fastapi and uvicorn, which are not installed"):
        require_extra("serve", "attnedit serve")
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require_extra("gpu", "x")


def test_a_method_declares_its_extras_once():
    needs = {spec.name: spec.requires for spec in registered()}
    assert needs["memat"] == ("memat",)
    assert all(extra in EXTRAS for spec_needs in needs.values() for extra in spec_needs)
    assert [name for name, spec_needs in needs.items() if spec_needs] == ["memat"]
    with pytest.raises(ValueError, match=r"requires=\['cuda'\]: not extras of attnedit"):
        register(MethodSpec(name="toy-extra", summary="", build=lambda p, t: None, requires=("cuda",)))


# --- the command line: one line, exit 2, no model loaded -------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "sample", "--method", "memat"],
        ["eval", "sample", "--method", "memat+sadr", "--mode", "batch"],
        # with ray installed the method's extra is the one missing (the ray mark: the env without ray
        # checks the backend first)
        pytest.param(
            ["eval", "sample", "--method", "memat", "--sadr", "--backend", "ray"], marks=pytest.mark.ray
        ),
        ["edit", "--file", "sample", "--method", "memat"],
        ["inspect", "--file", "sample", "--method", "memat", "--html", "{tmp}/page.html"],
        ["stats", "--method", "memat"],
        ["analyze", "drift", "sample", "--method", "memat"],
    ],
    ids=lambda args: " ".join(args[:3]),
)
def test_memat_without_scikit_learn(monkeypatch, loads, tmp_path, args):
    _missing(monkeypatch, "sklearn")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] in ("eval", "analyze"):
        args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    _one_line_error(result, MEMAT_LINE)
    assert loads == []
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_other_methods_need_no_extra(monkeypatch, loads, tmp_path):
    """Without scikit-learn, ROME goes past the method check: the model loader is reached."""
    _missing(monkeypatch, "sklearn")
    result = CliRunner().invoke(app, ["stats", "--method", "rome"])
    assert len(loads) == 1 and result.exit_code == 1  # the recording loader refused


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_ray_backend_without_ray(monkeypatch, loads, tmp_path, command):
    _missing(monkeypatch, "ray")
    args = ["eval", "sample"] if command == "eval" else ["analyze", "drift", "sample"]
    result = CliRunner().invoke(app, [*args, "--backend", "ray", "--out", str(tmp_path / "out")])
    _one_line_error(result, RAY_LINE)
    assert loads == []


def test_serve_without_the_serve_extra(monkeypatch, loads):
    _missing(monkeypatch, "fastapi")
    result = CliRunner().invoke(app, ["serve"])
    _one_line_error(result, SERVE_LINE)
    assert loads == []


@pytest.mark.parametrize(
    ("module", "args", "line"),
    [
        ("sklearn", ["--method", "memat"], MEMAT_LINE),
        ("ray", ["--backend", "ray"], RAY_LINE),
    ],
    ids=["memat", "ray"],
)
def test_a_missing_extra_in_a_fresh_process(tmp_path, module, args, line):
    """The exact stderr of a real process: one line, no traceback, exit 2, nothing written."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from attnedit.cli.main import app\n"
        f"app(['eval', 'sample', *{args!r}, '--out', {str(tmp_path / 'o')!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {line}"
    assert not (tmp_path / "o" / "results.jsonl").exists()


# --- the Python API and the inspector: the same message --------------------------------------------------


def test_api_editor_and_edit_without_scikit_learn(monkeypatch, tiny_tokenizer):
    from helpers import make_tiny

    bundle = make_tiny("llama", tiny_tokenizer)
    before = model_hash(bundle.model)
    request = attnedit.EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris")
    _missing(monkeypatch, "sklearn")
    with pytest.raises(MissingExtraError) as err:
        attnedit.editor(bundle, "memat")
    assert str(err.value) == MEMAT_LINE
    with pytest.raises(MissingExtraError) as err:
        attnedit.edit(bundle, "memat+sadr", request, heads=4)
    assert str(err.value) == MEMAT_LINE
    assert isinstance(err.value, ImportError)  # what a Python user catching a missing module expects
    assert model_hash(bundle.model) == before
    parse_method("memat")  # naming or listing the method needs no extra
    assert "memat" in attnedit.methods()


def test_inspector_refuses_memat_without_scikit_learn_naming_the_method(monkeypatch, tiny_tokenizer):
    from helpers import make_tiny

    from attnedit.serve.inspector import InputError, build_editor

    bundle = make_tiny("llama", tiny_tokenizer)
    _missing(monkeypatch, "sklearn")
    with pytest.raises(InputError) as err:
        build_editor(bundle, "memat", {})
    assert err.value.field == "method" and err.value.message == MEMAT_LINE
