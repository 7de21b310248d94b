"""The method registry: a method is declared once (a ``MethodSpec`` registered by its own module) and every
front end sees it: the CLI's ``--method`` help, ``attnedit.methods()``, the inspector's list and schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import make_tiny

import attnedit
from attnedit.editing.presets import PresetError
from attnedit.editing.spec import parse_method, register, unregister

# a whole method in one module: its parameter model, its editor, one registration
TOY_MODULE = '''
from dataclasses import dataclass, field

import torch
from pydantic import Field

from attnedit.core.deltas import EditBuilder
from attnedit.editing.base import edit_metadata
from attnedit.editing.presets import Layers, Params, params_dict
from attnedit.editing.spec import MethodSpec, register


class ToyParams(Params):
    """Scale one layer's MLP down-projection."""

    layers: Layers = Field(description="the layer scaled")
    scale: float = Field(1.5, gt=0, description="the factor")


@dataclass
class Toy:
    params: ToyParams
    terms: list = field(default_factory=list)
    name: str = "toy"
    preset: str = ""

    def hyperparameters(self):
        terms = [t.describe() for t in self.terms]
        return {"preset": self.preset, **params_dict(self.params), "terms": terms}

    def prepare(self, bundle, cases):
        pass

    def apply(self, bundle, cases):
        name = bundle.adapter.weight_name("mlp_down", self.params.layers[0])
        weight = bundle.model.get_parameter(name)
        with EditBuilder(bundle.model) as builder:
            builder.add(name, weight.detach() * (self.params.scale - 1))
            requests = [c.request for c in cases]
            return builder.finish(edit_metadata(self, bundle, requests, {}))


SPEC = register(MethodSpec(name="toy", summary="a toy: scales one MLP", params=ToyParams,
                           build=lambda params, terms: Toy(params, terms=terms)))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method registered (its module importable as ``toy_method``), with a preset for the tiny
    Llama in a user preset directory; unregistered afterwards."""
    (tmp_path / "toy_method.py").write_text(TOY_MODULE)
    presets = tmp_path / "presets" / "toy"
    presets.mkdir(parents=True)
    preset = {"method": "toy", "model": "tiny-llama", "source": "test", "params": {"layers": [1]}}
    (presets / "tiny-llama.json").write_text(json.dumps(preset))
    monkeypatch.setenv("ATTNEDIT_PRESETS", str(tmp_path / "presets"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    sys.modules.pop("toy_method", None)
    module = importlib.import_module("toy_method")
    yield module
    unregister("toy")
    sys.modules.pop("toy_method", None)


def test_a_registered_method_is_in_the_api_the_cli_help_and_the_inspector(toy, tmp_path, tiny_tokenizer):
    assert "toy" in attnedit.methods() and "toy+sadr" in attnedit.method_choices()
    assert parse_method("toy+sadr").spec is toy.SPEC
    # the CLI's --method help is built from the registry (a fresh process that imports the module first)
    script = (
        "import toy_method, sys; from attnedit.cli.main import app; "
        "sys.argv = ['attnedit', 'eval', '--help']; app()"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "COLUMNS": "300"}
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert "toy" in shown.stdout, shown.stdout + shown.stderr
    # the inspector lists it with its preset settings and its JSON schema (types, ranges, help)
    from fastapi.testclient import TestClient

    from attnedit.serve.app import create_app

    bundle = make_tiny("llama", tiny_tokenizer)
    with TestClient(create_app(bundle, None)) as client:
        listed = {m["name"]: m for m in client.get("/api/methods").json()["methods"]}
        assert listed["toy"]["preset"] == "tiny-llama" and listed["toy"]["settings"] == {"layers": [1]}
        scale = listed["toy"]["schema"]["properties"]["scale"]
        assert scale["exclusiveMinimum"] == 0 and scale["default"] == 1.5 and scale["description"]
        assert "sadr_gamma" in listed["toy+sadr"]["schema"]["properties"]
        assert "sadr_gamma" in listed["toy+sadr"]["fields"]
        refused = client.post(
            "/api/edits",
            json={
                "method": "toy",
                "prompt": "{} is in",
                "subject": "Paris",
                "target_new": "Rome",
                "target_true": "France",
                "params": {"scale": -1},
            },
        )
        assert refused.status_code == 422 and "scale" in refused.text
    # and it edits by name, reverting exactly
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    request = attnedit.EditRequest("{} is in", "Paris", "Rome", "France")
    with attnedit.edit(bundle, "toy", request, scale=2.0) as applied:
        assert applied.edit.hyperparameters["scale"] == 2.0
        name = bundle.adapter.weight_name("mlp_down", 1)
        assert torch.equal(bundle.model.get_parameter(name), 2.0 * before[name])
    assert all(torch.equal(v, before[k]) for k, v in bundle.model.state_dict().items())


def test_a_name_is_registered_once_and_the_syntax_is_parsed_in_one_place(toy):
    with pytest.raises(ValueError, match="registered already"):
        register(type(toy.SPEC)(name="toy", summary="another", build=toy.SPEC.build))
    with pytest.raises(ValueError, match="plain name"):
        register(type(toy.SPEC)(name="a+b", summary="", build=toy.SPEC.build))
    for bad in ("toy+foo", "none+sadr", "", "nope"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)
    assert parse_method(" rome+sadr ").name == "rome+sadr"


def test_settings_are_split_once_between_the_method_and_sadr():
    rome, rome_sadr = parse_method("rome"), parse_method("rome+sadr")
    # a field of the method stays the method's, +sadr or not; sadr_KEY is always SADR's
    assert rome_sadr.split({"layers": [4], "sadr_layers": "20-29", "gamma": 0.1, "steps": 3}) == (
        {"layers": [4], "steps": 3},
        {"layers": "20-29", "gamma": 0.1},
    )
    # MEMAT has a field "heads" of its own: heads= is MEMAT's, sadr_heads= SADR's
    assert parse_method("memat+sadr").split({"heads": 8, "sadr_heads": "all"}) == (
        {"heads": 8},
        {"heads": "all"},
    )
    for settings in ({"gamma": 0.1}, {"sadr_layers": "1-2"}):
        with pytest.raises(PresetError, match=r"need a '\+sadr' method \(e.g. rome\+sadr\)"):
            rome.split(settings)
    assert rome.split({"unknown": 1}) == ({"unknown": 1}, {})  # named by the parameter model, not here
    assert rome_sadr.fields()[-4:] == ["sadr_gamma", "sadr_heads", "sadr_layers", "sadr_prompt_reduction"]
