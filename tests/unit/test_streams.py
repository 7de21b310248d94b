"""Edit streams (sequential mode with checkpoints): the curves a checkpoint writes, general ability against
the unedited model, the collapse stop, exact resume after ``kill -9``, refusal of another setting, and the
PIQA / known-facts loaders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import CORPUS, FIXTURES, ROOT, tiny_run, torch_threads
from safetensors.torch import load_file

from attnedit.core.data import DataFormatError, load_known_facts, load_piqa
from attnedit.core.deltas import EditBuilder, WeightEdit, model_hash
from attnedit.core.models import ModelBundle, load_model
from attnedit.evaluation.evaluator import EvalConfig
from attnedit.evaluation.general import GeneralAbility, GeneralConfig
from attnedit.runs.config import StreamConfig
from attnedit.runs.rundir import RunConflictError, read_curves
from attnedit.runs.runner import run
from attnedit.runs.sequential import StreamCollapsedError, StreamStateError

PIQA = FIXTURES / "piqa_valid.jsonl"
KNOWN = FIXTURES / "rome_known_1000.json"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def paragraphs(tmp_path) -> Path:
    """A corpus of paragraphs long enough to be sampled for perplexity and fluency (30 words or more)."""
    path = tmp_path / "paragraphs.txt"
    path.write_text("\n".join(" ".join(CORPUS[i:] + CORPUS[:i]) for i in range(len(CORPUS))) + "\n")
    return path


def general(paragraphs: Path, **kw: Any) -> GeneralConfig:
    return GeneralConfig(piqa=str(PIQA), known=str(KNOWN), corpus=str(paragraphs), samples=6, **kw)


def stream_config(out: Path, model: Path, corpus: str, paragraphs: Path, *, method="memit", every=2, **kw):
    """Four sample cases in groups of two, a checkpoint every ``every`` edits (fixture data)."""
    stream = StreamConfig(checkpoint_every=every, sample=3, general=general(paragraphs, corpus_samples=4))
    return tiny_run(
        out, model, corpus, method=method, limit=4, mode="sequential", batch_size=2, stream=stream, **kw
    )


# -- the loaders -------------------------------------------------------------------------------------------


def test_piqa_questions_come_with_their_labels_from_the_file_beside_them():
    questions = load_piqa(PIQA)
    labels = [int(line) for line in (FIXTURES / "piqa_valid_labels.lst").read_text().split()]
    assert [q.label for q in questions] == labels and len(questions) == 12
    first = json.loads(PIQA.read_text().splitlines()[0])
    assert questions[0].goal == first["goal"] and questions[0].solutions == (first["sol1"], first["sol2"])


def test_piqa_errors_name_the_line_and_field(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    with pytest.raises(DataFormatError, match=r"q.jsonl\[line 1\]: field 'label'"):
        load_piqa(bad)
    (tmp_path / "q_labels.lst").write_text("2\n")
    with pytest.raises(DataFormatError, match=r"q_labels.lst line 1: a PIQA label is 0 or 1, not '2'"):
        load_piqa(bad)
    (tmp_path / "q_labels.lst").write_text("1\n1\n")
    with pytest.raises(DataFormatError, match="2 labels for the 1 questions"):
        load_piqa(bad)
    inline = tmp_path / "inline.jsonl"
    inline.write_text(json.dumps({"goal": "g", "sol1": "", "sol2": "b", "label": 1}) + "\n")
    with pytest.raises(
        DataFormatError, match=r"inline.jsonl\[line 1\]: field 'sol1': expected a non-empty string, got ''"
    ):
        load_piqa(inline)


def test_known_facts_load_and_name_a_bad_record(tmp_path):
    facts = load_known_facts(KNOWN)
    assert len(facts) == 12 and facts[0].prompt == "Vinson Massif is located in the continent of"
    bad = tmp_path / "known.json"
    bad.write_text(json.dumps([{"subject": "X", "prompt": "X is in"}]))
    with pytest.raises(DataFormatError, match=r"known.json\[0\]: field 'attribute': missing"):
        load_known_facts(bad)


# -- general ability --------------------------------------------------------------------------------------


def test_general_ability_of_the_unedited_model_is_its_reference(tiny, paragraphs):
    measures = GeneralAbility(tiny, general(paragraphs, corpus_samples=3, fluency_prompts=2))
    reference = measures.reference().values
    again = measures.measure()
    for key in ("piqa", "ppl", "known", "fluency"):
        assert again[key] == reference[key], key
    assert reference["known"] == 1.0 and 0 <= reference["piqa"] <= 1 and reference["ppl"] > 1
    assert measures.manifest()["sampled"] == {"piqa": 6, "known": 6, "corpus": 3}


def test_general_ability_sees_a_changed_model(tiny, paragraphs):
    measures = GeneralAbility(tiny, general(paragraphs, corpus_samples=3))
    reference = measures.reference().values
    embed = tiny.model.get_input_embeddings().weight
    original = embed.detach().clone()
    with torch.no_grad():
        embed.mul_(0).add_(torch.randn_like(embed, generator=torch.Generator().manual_seed(0)))
    try:
        changed = measures.measure()
    finally:
        with torch.no_grad():
            embed.copy_(original)
    assert changed["ppl"] != reference["ppl"] and changed["known"] < 1.0


# -- checkpoints --------------------------------------------------------------------------------------------


def test_a_stream_writes_a_checkpoint_line_every_n_edits(tmp_path, tiny_dir, corpus, paragraphs):
    out = tmp_path / "run"
    run(stream_config(out, tiny_dir, corpus, paragraphs), progress=False)
    lines = read_curves(out)
    assert [line["edits"] for line in lines] == [0, 2, 4]
    first, *later = lines
    assert first["edited"] == {} and first["weights"] == {} and first["general"]["known"] == 1.0
    for line in later:
        assert {"ES", "PS", "NS"} <= line["edited"].keys()
        assert line["sample"] == min(3, line["edits"])
        assert {"piqa", "ppl", "known", "fluency"} <= line["general"].keys()
        assert line["weights"] and all(w["change"] > 0 and w["norm"] > 0 for w in line["weights"].values())
        assert line["seconds"] > 0 and "collapsed" not in line
    # the accumulated change grows as the edits pile up
    name = next(iter(later[0]["weights"]))
    assert later[1]["weights"][name]["change"] != later[0]["weights"][name]["change"]
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["edits_applied"] == 2 for r in records)
    state = json.loads((out / "stream" / "state.json").read_text())
    assert state["groups"] == 2 and state["edits"] == 4 and state["collapsed"] is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stream"]["checkpoint_every"] == 2 and manifest["stream"]["general"]["samples"] == 6


def test_checkpoints_work_on_every_family(tmp_path, tiny, corpus, paragraphs):
    """The stream on a tiny model of every family (MEMIT at layers 0-1), one checkpoint per group."""
    out = tmp_path / "run"
    config = stream_config(out, Path("unused"), corpus, paragraphs)
    from attnedit.editing.registry import make_editor

    editor = make_editor(config.method, tiny, config.preset, config.params)
    original = model_hash(tiny.model)
    run(config, bundle=tiny, editor=editor, progress=False)
    assert model_hash(tiny.model) == original  # every edit reverted at the end
    lines = read_curves(out)
    assert [line["edits"] for line in lines] == [0, 2, 4]
    assert all(line["weights"] and line["edited"]["ES"]["n"] >= 1 for line in lines[1:])


@dataclass
class Blowup:
    """An editor that adds ``scale`` times a fixed pattern to one weight matrix per group (to make a model
    collapse): the unembedding's (``random``: a random pattern; its logits then swamp the text's) or the
    first MLP's output projection."""

    scale: float
    random: bool = False
    name: str = "blowup"
    preset: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    calls: int = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "random": self.random}

    def prepare(self, bundle: ModelBundle, cases) -> None:
        pass

    def apply(self, bundle: ModelBundle, cases):
        self.calls += 1
        params = dict(bundle.model.named_parameters())
        if self.random:
            weight = bundle.adapter.unembedding(bundle.model).weight
            name = next(n for n, p in params.items() if p is weight)
            pattern = torch.randn(weight.shape, generator=torch.Generator().manual_seed(self.calls))
        else:
            name = bundle.adapter.weight_name("mlp_down", 0)
            weight = params[name]
            pattern = torch.ones_like(weight)
        with EditBuilder(bundle.model) as builder:
            builder.add(name, self.scale * pattern)
            meta = {"method": self.name, "hyperparameters": {}, "requests": [c.request for c in cases]}
            return builder.finish(meta)  # type: ignore[arg-type]


def test_a_stream_stops_when_perplexity_blows_up(tmp_path, tiny, corpus, paragraphs):
    """On a tiny model of every family: random logits of scale 100 after the first group."""
    out = tmp_path / "run"
    bundle = tiny
    original = model_hash(bundle.model)
    config = stream_config(out, Path("unused"), corpus, paragraphs)
    with pytest.raises(StreamCollapsedError, match=r"collapsed after 2 edits \(perplexity .* above 10 x"):
        run(config, bundle=bundle, editor=Blowup(100.0, random=True), progress=False)
    assert model_hash(bundle.model) == original
    lines = read_curves(out)
    assert [line["edits"] for line in lines] == [0, 2] and "above 10 x" in lines[-1]["collapsed"]
    assert not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text()
    editor = Blowup(100.0, random=True)  # a rerun refuses at once, computing nothing
    with pytest.raises(StreamCollapsedError, match="this stream stopped earlier"):
        run(config, bundle=bundle, editor=editor, progress=False)
    assert editor.calls == 0


def test_a_stream_stops_on_non_finite_weights(tmp_path, tiny_dir, corpus, paragraphs):
    """Each group adds 3e38 to a float32 matrix: the second overflows to infinity; the stream stops after
    it, whether or not a checkpoint is due."""
    out = tmp_path / "run"
    bundle = load_model(str(tiny_dir))
    config = stream_config(out, tiny_dir, corpus, paragraphs, every=100)
    with pytest.raises(StreamCollapsedError, match=r"after 4 edits \(non-finite weights in .*mlp"):
        run(config, bundle=bundle, editor=Blowup(3e38), progress=False)
    state = json.loads((out / "stream" / "state.json").read_text())
    assert state["collapsed"].startswith("after 4 edits: non-finite weights")


def test_the_collapse_factor_is_checked():
    with pytest.raises(ValueError, match="--collapse-factor must be above 1"):
        StreamConfig(checkpoint_every=1, collapse_factor=1.0)
    with pytest.raises(ValueError, match="--checkpoint-every must be at least 1"):
        StreamConfig(checkpoint_every=0)


def test_checkpoints_need_sequential_mode(tmp_path, tiny_dir, corpus):
    with pytest.raises(ValueError, match="--checkpoint-every needs --mode sequential"):
        tiny_run(tmp_path, tiny_dir, corpus, stream=StreamConfig(checkpoint_every=2))


# -- resume ----------------------------------------------------------------------------------------------


def test_a_stream_is_not_resumed_with_other_checkpoints(tmp_path, tiny_dir, corpus, paragraphs):
    out = tmp_path / "run"
    bundle = load_model(str(tiny_dir))
    run(stream_config(out, tiny_dir, corpus, paragraphs), bundle=bundle, progress=False)
    with pytest.raises(RunConflictError, match="stream"):
        run(stream_config(out, tiny_dir, corpus, paragraphs, every=4), bundle=bundle, progress=False)


def test_a_stream_whose_saved_weights_differ_is_refused(tmp_path, tiny_dir, corpus, paragraphs):
    """A state whose weights digest does not match the re-applied edits (another model build) is refused
    with a message, never continued."""
    out = tmp_path / "run"
    bundle = load_model(str(tiny_dir))
    config = stream_config(out, tiny_dir, corpus, paragraphs)
    run(config, bundle=bundle, progress=False)
    (out / "results.jsonl").unlink()
    state_file = out / "stream" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "weights_sha256": "0" * 64}))
    with pytest.raises(StreamStateError, match="gives other weights than the stream had"):
        run(config, bundle=bundle, progress=False)


def _stream_command(out: Path, model: Path, corpus: str, paragraphs: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "attnedit.cli.main",
        "eval",
        "sample",
        "--model",
        str(model),
        "--method",
        "alphaedit",
        "--preset",
        str(ROOT / "src/attnedit/resources/presets/alphaedit/smollm2-135m.json"),
        *("-p", "layers=0,1", "-p", f"stats_corpus={corpus}", "-p", "stats_samples=20", "-p", "steps=3"),
        *("-p", "templates=[[3, 1]]", "-p", "nullspace_rule=fraction", "-p", "nullspace_threshold=0.5"),
        *("--limit", "6", "--mode", "sequential", "--batch-size", "2", "--checkpoint-every", "2"),
        *("--checkpoint-sample", "3", "--general-piqa", str(PIQA), "--general-known", str(KNOWN)),
        *("--general-corpus", str(paragraphs), "--general-samples", "6", "--no-fluency"),
        *("--ppl-corpus", "none", "--threads", "1", "--out", str(out)),
    ]


def _kill_when(cmd: list[str], env: dict[str, str], ready, timeout: float = 300) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"  # type: ignore[union-attr]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _comparable(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSON-lines file without their timings (``seconds*``)."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("seconds")} for line in lines]


def test_a_stream_killed_twice_ends_as_an_uninterrupted_one(tmp_path, tiny_dir, corpus, paragraphs):
    """AlphaEdit on a tiny model, 3 groups, checkpoints every 2 edits: killed with SIGKILL once after its
    first group's state is saved and once in its final scoring, then resumed: the records (timings aside),
    the curves, every saved edit and the stream's state are those of an uninterrupted stream."""
    env = {**os.environ, "ATTNEDIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run(
        _stream_command(whole, tiny_dir, corpus, paragraphs), env=env, check=True, capture_output=True
    )

    state = resumed / "stream" / "state.json"

    def first_group_saved() -> bool:
        return state.is_file() and json.loads(state.read_text())["groups"] >= 1

    def scoring_started() -> bool:
        results = resumed / "results.jsonl"
        return results.is_file() and results.read_bytes().count(b"\n") >= 1

    cmd = _stream_command(resumed, tiny_dir, corpus, paragraphs)
    _kill_when(cmd, env, first_group_saved)
    assert json.loads(state.read_text())["groups"] < 3
    _kill_when(cmd, env, scoring_started)
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    assert _comparable(resumed / "results.jsonl") == _comparable(whole / "results.jsonl")
    assert _comparable(resumed / "curves.jsonl") == _comparable(whole / "curves.jsonl")
    for k in range(3):
        a = WeightEdit.load(whole / "edits" / f"{k:05d}.safetensors").deltas
        b = WeightEdit.load(resumed / "edits" / f"{k:05d}.safetensors").deltas
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ends = [json.loads((d / "stream" / "state.json").read_text()) for d in (whole, resumed)]
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"] and ends[0]["groups"] == 3
    states = [load_file(d / "stream" / "editor-00002.safetensors") for d in (whole, resumed)]
    assert states[0].keys() == states[1].keys() and all(
        torch.equal(states[0][n], states[1][n]) for n in states[0]
    )


def test_the_api_runs_and_resumes_a_stream(tmp_path, tiny_dir, corpus, paragraphs):
    """``attnedit.stream`` is the command line's stream from Python; the same call again resumes (nothing
    recomputed) and ``attnedit.curves`` reads the checkpoints."""
    from helpers import MEMIT_PRESET

    import attnedit

    bundle = load_model(str(tiny_dir))
    settings = {"layers": [0, 1], "stats_corpus": corpus, "stats_samples": 20, "steps": 3}
    kw: dict[str, Any] = {
        "bundle": bundle,
        "preset": str(MEMIT_PRESET),
        "batch_size": 2,
        "checkpoint_every": 4,
        "checkpoint_sample": 2,
        "limit": 4,
        "general": general(paragraphs, corpus_samples=2),
        "eval": attnedit.EvalConfig(fluency=False),
        "progress": False,
    }
    summary = attnedit.stream("sample", "memit", tmp_path / "run", **kw, **settings)
    assert summary["ES"]["n"] == 4
    lines = attnedit.curves(tmp_path / "run")
    assert [line["edits"] for line in lines] == [0, 4]
    assert attnedit.stream("sample", "memit", tmp_path / "run", **kw, **settings) == summary
    assert len(attnedit.curves(tmp_path / "run")) == 2


def test_scoring_many_cases_at_once_gives_their_case_by_case_records(tiny):
    """``Evaluator.score_many`` (a checkpoint's scoring) equals ``score`` per case up to float rounding:
    the same comparisons, KnowEdit values and generated answers."""
    from attnedit.core.data import load_cases
    from attnedit.evaluation.evaluator import Evaluator

    knowedit = load_cases(FIXTURES / "knowedit_zsre_test_all.json", skip_invalid=True).cases[:3]
    cases = load_cases("sample").cases[:5] + knowedit
    evaluator = Evaluator(tiny, EvalConfig(fluency=False))
    refs = [evaluator.reference(c) if c.locality else None for c in cases]
    together = evaluator.score_many(cases, refs)
    for case, ref, record in zip(cases, refs, together, strict=True):
        alone = evaluator.score(case, ref)
        assert record["case_id"] == alone["case_id"] and record.keys() == alone.keys()
        for key, entry in alone["comparisons"].items():
            for side in ("right_nll", "wrong_nll"):
                assert record["comparisons"][key][side] == pytest.approx(entry[side], rel=1e-4, abs=1e-5)
        for key, values in alone.get("knowedit", {}).items():
            assert record["knowedit"][key] == pytest.approx(values, abs=1e-6)
        assert record["generated_answers"] == alone["generated_answers"]
        assert record["generation_score"] == alone["generation_score"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--general-samples", "0"], "--general-samples"),
        (["--checkpoint-every", "10"], "--checkpoint-every needs --mode sequential"),
        (["--mode", "sequential", "--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
        (
            ["--mode", "sequential", "--checkpoint-every", "5", "--collapse-factor", "0.5"],
            "--collapse-factor",
        ),
    ],
)
def test_stream_flags_are_checked_before_anything_loads(tmp_path, flags, message):
    from typer.testing import CliRunner

    from attnedit.cli.main import app

    result = CliRunner().invoke(app, ["eval", "sample", "--model", str(tmp_path / "absent"), *flags])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not (tmp_path / "absent").exists()
