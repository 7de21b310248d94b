"""Fixtures of the unit tests only."""

from __future__ import annotations

import pytest
import transformers as T
from helpers import make_tokenizer


@pytest.fixture(scope="session")
def tiny_bos_tokenizer() -> T.PreTrainedTokenizerFast:
    return make_tokenizer(bos=True)
