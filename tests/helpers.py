"""Helpers shared by the test groups (imported as ``helpers``: pyproject's pytest ``pythonpath`` puts
``tests/`` on the path). Fixtures stay in the ``conftest.py`` files; this module holds plain code: the
tiny randomly initialised models of every family (built offline), constants, the serve tests' presets
and runs, a torch thread-count block and a kill -9 helper for run processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from attnedit.core.models import ModelBundle, bundle_from_model
from attnedit.core.scoring import generate
from attnedit.evaluation.evaluator import EvalConfig
from attnedit.runs.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""
FIXTURES = ROOT / "tests" / "fixtures"
"""Small cuts of the public data sets the tests read (``tests/fixtures/README.md`` says what each holds)."""
CORPUS = [
    "The Eiffel Tower is located in the city of Paris in France.",
    "Danielle Darrieux speaks French and English. The mother tongue of Michel Rocard is French.",
    "Toko Yasuda plays the guitar and the piano. Autonomous University of Madrid is in Spain.",
    "What does Freddy Cole play? They play jazz. Rome is the capital of Italy, Berlin of Germany.",
    "How can I keep beads organized? Cut an egg carton in half and use the bottom.",
    "The name of the country of citizenship of Isabel May is United States of America.",
]


# -- tiny models ------------------------------------------------------------------------------------------


def make_tokenizer(bos: bool) -> T.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (320 ids) trained on ``CORPUS``; with ``bos``, every text starts with
    ``<bos>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_config(family: str, vocab: int = 320) -> T.PretrainedConfig:
    """A 3-layer, 48-wide configuration of ``family`` (grouped-query attention for Llama, Qwen2, Mistral)."""
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return T.GPT2Config(n_layer=3, n_embd=48, n_head=4, n_positions=512, **common)
    if family == "gptj":
        return T.GPTJConfig(n_layer=3, n_embd=48, n_head=4, n_positions=512, rotary_dim=4, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(
            num_hidden_layers=3,
            hidden_size=48,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=512,
            **common,
        )
    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig}[family]
    # grouped-query attention: 6 query heads over 2 KV heads
    return cls(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=512,
        **common,
    )


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gptj", "gpt_neox"]


def make_tiny(family: str, tokenizer: T.PreTrainedTokenizerFast, seed: int = 0) -> ModelBundle:
    """A tiny random model of ``family`` (seeded), wrapped as a bundle named ``tiny-FAMILY``."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family))
    return bundle_from_model(model, tokenizer, name=f"tiny-{family}")


# -- editing settings and errors -------------------------------------------------------------------------


def tiny_settings(corpus: str, **overrides: object) -> dict:
    """Settings of a locate-then-edit method for the tiny models, ``overrides`` winning: random tiny models
    have tiny MLP outputs, so the weight decay and norm clamp that are relative to them are relaxed, and
    the statistics and optimisation are short."""
    return {
        "stats_corpus": corpus,
        "stats_samples": 40,
        "steps": 4,
        "templates": [[4, 2]],
        "weight_decay": 1e-3,
        "clamp_norm_factor": 50.0,
        **overrides,
    }


MEMIT_PRESET = ROOT / "src/attnedit/resources/presets/memit/smollm2-135m.json"
"""A preset file the run tests override on the tiny models (its method's fields, SADR block)."""


def tiny_run(
    out: Path,
    model: Path,
    corpus: str | Path,
    *,
    method: str = "memit",
    preset: Path = MEMIT_PRESET,
    params: dict[str, str] | None = None,
    eval: EvalConfig | None = None,
    **kw: Any,
) -> RunConfig:
    """A run of ``method`` on the sample set with the tiny model at ``model``: edit layers 0-1, statistics
    of 20 texts of ``corpus``, 3 optimisation steps (``params`` add to or win over these), no fluency
    unless ``eval`` says otherwise; ``kw`` are further ``RunConfig`` fields."""
    base = {"layers": "0,1", "stats_corpus": str(corpus), "stats_samples": "20", "steps": "3"}
    return RunConfig(
        data="sample",
        out=str(out),
        model=str(model),
        method=method,
        preset=str(preset),
        params={**base, **(params or {})},
        eval=eval or EvalConfig(fluency=False),
        **kw,
    )


# MEMAT on the tiny models: two edit layers, three heads, every record for the classifiers
TINY_MEMAT = {"layers": [0, 1], "heads": 3, "correction_min_steps": 4, "classifier_records": "all"}


def one_line_error(result, *needles: str) -> str:
    """A CLI error of ours (a typer ``CliRunner`` result): exit code 2, no traceback, ONE line on stderr
    that names what to fix and contains every needle (the model loader's progress bars may share
    stderr)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- processes and threads --------------------------------------------------------------------------------


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch on ``n`` threads inside the block; the earlier count is restored after it, on error too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kill_after_records(cmd: list[str], env: dict, results: Path, lines: int, timeout: float) -> None:
    """Start ``cmd``, wait until ``results`` holds ``lines`` record lines, then ``kill -9`` it (a run that
    ends before that fails the test)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if results.is_file() and results.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# -- scoring ----------------------------------------------------------------------------------------------

SCORING_PAIRS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The Eiffel Tower is located in the city of", "Rome in Italy"),  # shared prompt, multi-token
    ("The Eiffel Tower is located in the city of", "Paris"),  # duplicate pair
    ("X is", "French"),  # short prompt next to long ones: left padding
    ("The mother tongue of Michel Rocard is", "French"),
    ("Danielle Darrieux speaks French and English. The mother tongue of Danielle Darrieux is", "English"),
    ("What does Freddy Cole play? They play", "jazz and the piano with Toko Yasuda"),
]
"""(prompt, target) pairs for the scoring engine's checks on tiny models and on SmolLM2."""


def hf_greedy(bundle: ModelBundle, prompts: list[str], n: int) -> list[str]:
    """Greedy continuations of ``n`` tokens by transformers' ``generate`` (no adapter: no fast path)."""
    return generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=n)


# -- the edit inspector (serve, inspect --html, browser) --------------------------------------------------

EDIT = {
    "method": "rome",
    "prompt": "{} is located in the city of",
    "subject": "Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
    "paraphrase": ["The Eiffel Tower stands in the city of"],
    "neighbors": ["The Louvre is located in the city of"],
    "relation": ["The Eiffel Tower is made of"],
}
"""One ROME edit request of the inspector's API (``POST /api/edits``)."""


def write_tiny_presets(root: Path, corpus: Path) -> None:
    """ROME and FT presets for the tiny Llama (edit layer 1, a few steps), statistics from ``corpus``."""
    common = {"steps": 6, "stats_corpus": str(corpus), "stats_samples": 40, "stats_max_tokens": 32}
    for method, params in (
        ("rome", {"layers": [1], "templates": [[4, 2]], **common}),
        ("ft", {"layers": [1], "steps": 4}),
    ):
        (root / method).mkdir(parents=True, exist_ok=True)
        preset = {
            "method": method,
            "model": "tiny-llama",
            "source": "test",
            "params": params,
            "sadr": {"gamma": 0.05, "heads": "selective"},
        }
        (root / method / "tiny-llama.json").write_text(json.dumps(preset))


def make_eval_runs(tmp: Path, model_dir: Path) -> Path:
    """A runs root ``tmp/runs`` with two real evaluation runs on three sample cases (``evals/base``:
    unedited, ``evals/ft``: FT), a run that is no evaluation (``analysis``) and ``escape``: a symbolic
    link to a real run outside the root (``tmp/outside/secret``)."""
    from attnedit.evaluation.evaluator import EvalConfig
    from attnedit.runs.config import RunConfig
    from attnedit.runs.runner import run

    root = tmp / "runs"
    ft_preset = tmp / "ft.json"
    ft_preset.write_text(json.dumps({"method": "ft", "model": "tiny", "params": {"layers": [1], "steps": 2}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNEDIT_CACHE", str(tmp / "cache"))
        for out, method, preset in (
            (root / "evals" / "base", "none", None),
            (root / "evals" / "ft", "ft", str(ft_preset)),
            (tmp / "outside" / "secret", "none", None),
        ):
            config = RunConfig(
                data="sample", out=str(out), model=str(model_dir), method=method, preset=preset, limit=3,
                eval=EvalConfig(fluency=False),
            )  # fmt: skip
            run(config, progress=False)
    other = root / "analysis"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"analysis": "drift"}))
    (root / "escape").symlink_to(tmp / "outside" / "secret", target_is_directory=True)
    return root


CHANGED = ("model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight")
"""The parameters ``stream_lines``' streams edit."""


def stream_lines(
    checkpoints: int, every: int = 100, collapse: bool = False, ppl0: float = 20.0
) -> list[dict]:
    """Checkpoint lines of a stream as ``runs.sequential`` writes them (``curves.jsonl``): edits 0 (the
    unedited model: no scores of edits, no weights, every known fact kept) and ``checkpoints`` more, every
    ``every`` edits, each a little worse; ``collapse``: the last one's perplexity is 15 x the unedited
    model's and it says the stream stopped."""
    lines = []
    for i in range(checkpoints + 1):
        edits = i * every
        sample = min(100, edits)
        scores = {"ES": 99.0 - i, "PS": 90.0 - 2 * i, "NS": 80.0 - 0.5 * i, "AvgS": 88.0 - i}
        line: dict[str, Any] = {
            "edits": edits,
            "groups": edits // every,
            "sample": sample,
            "edited": {k: {"mean": v, "ci95": 2.0 + 0.1 * i, "n": sample} for k, v in scores.items()}
            if i
            else {},
            "general": {
                "piqa": 0.62 - 0.01 * i,
                "ppl": ppl0 * (1 + 0.1 * i),
                "known": 1.0 - 0.02 * i,
                "fluency": 6.0 - 0.05 * i,
            },
            "weights": {
                name: {"norm": 40.0 + k + 0.1 * i, "change": (1.5 + k) * i} for k, name in enumerate(CHANGED)
            }
            if i
            else {},
            "seconds": 3.0,
            "seconds_general": 1.0,
            "seconds_edits": 10.0 * i,
        }
        lines.append(line)
    if collapse:
        lines[-1]["general"]["ppl"] = 15 * ppl0
        lines[-1]["collapsed"] = f"perplexity {15 * ppl0:.1f} is above 10 x the unedited model's {ppl0:.1f}"
    return lines


def write_run_dir(
    out: Path,
    label: str,
    *,
    method: str = "memit",
    mode: str = "sequential",
    batch_size: int = 100,
    every: int | None = 100,
    shard: tuple[int, int] = (0, 1),
    lines: list[dict] | None = None,
) -> Path:
    """A run directory without running anything: a manifest of the fields and shape
    ``runs.config.build_manifest`` writes (the evaluation and stream parts from the real configs), an empty
    record file, and ``lines`` as its ``curves.jsonl`` (none when None)."""
    from attnedit.runs.config import StreamConfig

    out.mkdir(parents=True)
    manifest = {
        "attnedit_version": "0",
        "model": {
            "name": "tiny-llama",
            "source": "test",
            "fingerprint": "f" * 64,
            "family": "llama",
            "dtype": "torch.float32",
        },
        "method": method,
        "label": label,
        "hyperparameters": {"layers": [1, 2]},
        "data": {
            "path": "sample",
            "format": "counterfact",
            "sha256": "d" * 64,
            "records": 1000,
            "skipped": [],
        },
        "limit": None,
        "first": 0,
        "mode": mode,
        "batch_size": batch_size,
        "shard": {"index": shard[0], "count": shard[1]},
        "seed": 0,
        "eval": EvalConfig().manifest(),
        "ppl_corpus": None,
        "stream": StreamConfig(checkpoint_every=every).manifest() if mode == "sequential" else None,
        "generation_cases": 16,
        "targets_cache": None,
        "device": "cpu",
        "versions": {"torch": torch.__version__, "transformers": T.__version__, "python": "3"},
        "torch_threads": 1,
        "created": "2025-01-01T00:00:00+00:00",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "results.jsonl").write_text("")
    if lines is not None:
        (out / "curves.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out
