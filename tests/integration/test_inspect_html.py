"""``attnedit inspect ... --html FILE`` on a tiny Llama: one self-contained offline file whose embedded view
is what the inspector's API answers for the same request (the page itself is opened in Chromium by
``tests/browser/test_browser.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import EDIT, make_tiny, torch_threads, write_tiny_presets
from typer.testing import CliRunner

from attnedit.api import load_model
from attnedit.cli.main import app as cli
from attnedit.core.deltas import model_hash
from attnedit.serve.app import create_app
from attnedit.serve.offline import ROW_DIGITS, VIEW_ID, render_html

EMBEDDED = re.compile(rf'<script type="application/json" id="{VIEW_ID}">(.*?)</script>', re.DOTALL)


def embedded_view(text: str) -> dict:
    blocks = EMBEDDED.findall(text)
    assert len(blocks) == 1
    return json.loads(blocks[0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama saved as ``tiny-llama`` (its presets match by name), presets and a private cache."""
    tmp = tmp_path_factory.mktemp("inspect")
    model_dir = tmp / "tiny-llama"
    make_tiny("llama", tiny_tokenizer).model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(f"The city number {i} lies on the river {i % 7}." for i in range(40)))
    write_tiny_presets(tmp / "presets", corpus)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNEDIT_PRESETS", str(tmp / "presets"))
        mp.setenv("ATTNEDIT_CACHE", str(tmp / "cache"))
        with torch_threads(1):
            yield tmp, model_dir


def inspect_args(model_dir: Path, html: Path) -> list[str]:
    args = ["inspect", "--model", str(model_dir), "--method", "rome", "--html", str(html)]
    args += ["--prompt", EDIT["prompt"], "--subject", EDIT["subject"]]
    args += ["--target-new", EDIT["target_new"], "--target-true", EDIT["target_true"]]
    flags = {"--paraphrase": "paraphrase", "--neighbor": "neighbors", "--relation": "relation"}
    for flag, key in flags.items():
        for prompt in EDIT[key]:
            args += [flag, prompt]
    return args


@pytest.fixture(scope="module")
def offline(setup) -> tuple[str, dict]:
    """The offline file of the test request (its text and embedded view)."""
    tmp, model_dir = setup
    html = tmp / "out" / "view.html"
    result = CliRunner().invoke(cli, inspect_args(model_dir, html))
    assert result.exit_code == 0, result.output
    assert str(html) in result.output
    text = html.read_text(encoding="utf-8")
    return text, embedded_view(text)


def test_the_file_is_self_contained(offline):
    text, view = offline
    assert "http://" not in text and "https://" not in text
    # nothing is loaded from elsewhere: no stylesheet link, no script or image source
    assert "<link" not in text and not re.search(r"\ssrc\s*=", text)
    assert "<style>" in text and "<script>" in text and "fetch(" in text  # the served page's own script
    assert view["offline"] is True and view["model"].endswith("tiny-llama")
    assert "<title>attnedit inspector: rome on Eiffel Tower</title>" in text


def test_the_embedded_view_is_the_apis_view(setup, offline):
    """The same request through the API gives the same answers, grids and patching curves; the head rows
    are the API's, rounded to ``ROW_DIGITS`` decimals."""
    _, model_dir = setup
    _, view = offline
    bundle = load_model(str(model_dir))
    with TestClient(create_app(bundle)) as client:
        edited = client.post("/api/edits", json=EDIT).json()
        assert edited["results"] == view["results"]
        kinds = [r["kind"] for r in view["results"]]
        assert kinds == ["rewrite", "paraphrase", "neighbor", "distracted_neighbor", "relation"]
        # the rewrite prompt and the distracted neighbour prompt, in that order
        embedded_prompts = [view["results"][i]["prompt"] for i in (0, 3)]
        assert [g["prompt"] for g in view["grids"]] == embedded_prompts
        assert [r["prompt"] for r in view["head_rows"]] == embedded_prompts
        for grid, rows in zip(view["grids"], view["head_rows"], strict=True):
            api = client.get(f"/api/edits/{edited['id']}/grid", params={"prompt": grid["prompt"]}).json()
            assert {k: v for k, v in grid.items() if k != "id"} == {k: v for k, v in api.items() if k != "id"}
            assert (len(rows["before"]), len(rows["before"][0])) == (grid["layers"], grid["heads"]) == (3, 6)
            for layer in range(grid["layers"]):
                for head in range(grid["heads"]):
                    one = client.get(
                        f"/api/edits/{edited['id']}/head",
                        params={"layer": layer, "head": head, "prompt": grid["prompt"]},
                    ).json()
                    for side in ("before", "after"):
                        assert len(rows[side][layer][head]) == len(grid["tokens"])
                        assert rows[side][layer][head] == [round(v, ROW_DIGITS) for v in one[side]]
            # layer 1's MLP edit moves only layer 2's attention
            assert max(rows["after"][2][h] != rows["before"][2][h] for h in range(6))
            assert rows["after"][0] == rows["before"][0]
        for curve in view["patching"]:
            params = {"prompt": curve["prompt"], "window": curve["window"]}
            assert client.get(f"/api/edits/{edited['id']}/patching", params=params).json() == curve
        assert [c["prompt"] for c in view["patching"]] == embedded_prompts
        assert view["patching"][0]["window"] == 3  # the default 10, clipped to the model's 3 layers
        assert model_hash(bundle.model) == client.app.state.inspector.original_hash


def test_inspect_takes_a_case_of_a_data_file(setup, tmp_path):
    _, model_dir = setup
    html = tmp_path / "case.html"
    args = ["inspect", "--model", str(model_dir), "--file", "sample", "--index", "1", "--html", str(html)]
    args += ["-p", "steps=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    view = embedded_view(html.read_text(encoding="utf-8"))
    from attnedit.api import load_cases

    case = load_cases("sample")[1]
    assert view["request"]["subject"] == case.request.subject
    assert view["request"]["neighbors"] == [p.prompt for p in case.neighborhood]
    assert view["hyperparameters"]["steps"] == 2
    distracted = [r["prompt"] for r in view["results"] if r["kind"] == "distracted_neighbor"]
    assert [g["prompt"] for g in view["grids"]] == [case.request.text, *distracted]
    assert len(distracted) == len(case.neighborhood) > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--prompt", "The Eiffel Tower is in", "--subject", "Big Ben"], "--subject"),
        (["--target-true", " "], "--target-true"),
        (["--neighbor", "x" * 500], "--neighbor"),
    ],
)
def test_bad_requests_name_the_flag_and_write_nothing(setup, tmp_path, change, message):
    _, model_dir = setup
    html = tmp_path / "bad.html"
    result = CliRunner().invoke(cli, inspect_args(model_dir, html) + change)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not html.exists()


def test_missing_flags_are_named(setup, tmp_path):
    _, model_dir = setup
    result = CliRunner().invoke(
        cli, ["inspect", "--model", str(model_dir), "--subject", "X", "--html", str(tmp_path / "v.html")]
    )
    assert result.exit_code == 2
    assert all(flag in result.output for flag in ("--prompt", "--target-new", "--target-true"))


def test_embedded_text_cannot_end_its_script_block():
    view = {
        "request": {"method": "rome", "subject": "<b>&"},
        "note": "</script><script>alert(1)</script> & <!--",
    }
    text = render_html(view)
    assert text.count("</script>") == 2  # the data block's and the page script's own
    assert embedded_view(text) == view
    assert "<title>attnedit inspector: rome on &lt;b&gt;&amp;</title>" in text
