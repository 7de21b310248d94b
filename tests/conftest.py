"""Fixtures of more than one test group (unit, integration, browser): tiny randomly initialised models of
every family, built offline in the test (the builders and constants are in ``helpers``). A fixture of one
group lives in that group's ``conftest.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import transformers as T
from data_sets import DATA_SETS
from helpers import CORPUS, FAMILIES, make_tiny, make_tokenizer, torch_threads

from attnedit.core.datasets import DataSetError, dataset_path
from attnedit.core.models import ModelBundle


@pytest.fixture(scope="session")
def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    return make_tokenizer(bos=False)


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_tokenizer) -> ModelBundle:
    return make_tiny(request.param, tiny_tokenizer)


@pytest.fixture(scope="session")
def data_file() -> Callable[[str], Path]:
    """``data_file(NAME)``: the main file of registered data set NAME (one of ``data_sets.DATA_SETS``),
    found in ``$ATTNEDIT_DATA`` or the cache, never downloaded by a test. A missing set fails the test
    with one line saying what to run (``attnedit data fetch NAME``): never a silent skip. Tests using
    this fixture carry the ``data`` mark (``scripts/test.sh`` leaves them out, loudly, on a machine
    without the sets)."""

    def find(name: str) -> Path:
        assert name in DATA_SETS, f"add {name!r} to data_sets.DATA_SETS (scripts/test.sh checks that list)"
        try:
            return dataset_path(name, download_missing=False)
        except DataSetError as err:
            pytest.fail(str(err), pytrace=False)

    return find


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``data`` mark on every test that reads a full data set (uses ``data_file``)."""
    for item in items:
        if "data_file" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama saved as a local Hugging Face directory (loads like any user model)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    bundle = make_tiny("llama", tiny_tokenizer)
    bundle.model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


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
def corpus(tmp_path) -> str:
    """The path of a statistics corpus three times the tokenizer's corpus (editing tests)."""
    path = tmp_path / "corpus3.txt"
    path.write_text("\n".join(CORPUS * 3))
    return str(path)
