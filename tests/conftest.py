"""Shared fixtures: tiny randomly initialised models of every family, built offline in the test."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from attnedit.core.models import ModelBundle, bundle_from_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS = [
    "The Eiffel Tower is located in the city of Paris in France.",
    "Danielle Darrieux speaks French and English. The mother tongue of Michel Rocard is French.",
    "Toko Yasuda plays the guitar and the piano. Autonomous University of Madrid is in Spain.",
    "What does Freddy Cole play? They play jazz. Rome is the capital of Italy, Berlin of Germany.",
    "How can I keep beads organized? Cut an egg carton in half and use the bottom.",
    "The name of the country of citizenship of Isabel May is United States of America.",
]


def _tokenizer(bos: bool) -> T.PreTrainedTokenizerFast:
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


@pytest.fixture(scope="session")
def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    return _tokenizer(bos=False)


@pytest.fixture(scope="session")
def tiny_bos_tokenizer() -> T.PreTrainedTokenizerFast:
    return _tokenizer(bos=True)


def tiny_config(family: str, vocab: int = 320) -> T.PretrainedConfig:
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
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family))
    return bundle_from_model(model, tokenizer, name=f"tiny-{family}")


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_tokenizer) -> ModelBundle:
    return make_tiny(request.param, tiny_tokenizer)


@pytest.fixture(scope="session")
def smollm2() -> ModelBundle:
    """The real SmolLM2-135M (dequantised once into the attnedit cache)."""
    from attnedit.core.models import load_model

    torch.set_num_threads(int(os.environ.get("ATTNEDIT_TEST_THREADS", "2")))
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"../shared/data not found at {SHARED_DATA}: the tests read the shared data sets")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama saved as a local Hugging Face directory (loads like any user model)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    bundle = make_tiny("llama", tiny_tokenizer)
    bundle.model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch on ``n`` threads inside the block; the earlier count is restored after it, on error too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny-model tests (restored afterwards)."""
    with torch_threads(1):
        yield


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """The attnedit cache (statistics, templates) in the test's own directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATTNEDIT_CACHE", str(cache))
    return cache


@pytest.fixture
def corpus_file(tmp_path, isolated_cache) -> Path:
    """A small text corpus for statistics, with the attnedit cache in the test's own directory."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS))
    return path


@pytest.fixture
def corpus(tmp_path) -> str:
    """The path of a statistics corpus three times the tokenizer's corpus (editing tests)."""
    path = tmp_path / "corpus3.txt"
    path.write_text("\n".join(CORPUS * 3))
    return str(path)


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
