"""Fixtures of the integration tests only: the real SmolLM2 and a statistics corpus file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import CORPUS

from attnedit.core.models import ModelBundle


@pytest.fixture(scope="session")
def smollm2() -> ModelBundle:
    """The real SmolLM2-135M (dequantised once into the attnedit cache)."""
    from attnedit.core.models import load_model

    torch.set_num_threads(int(os.environ.get("ATTNEDIT_TEST_THREADS", "2")))
    return load_model("smollm2-135m")


@pytest.fixture
def corpus_file(tmp_path, isolated_cache) -> Path:
    """A small text corpus for statistics, with the attnedit cache in the test's own directory."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS))
    return path
