"""Shared cache files survive concurrent writers (two `attnedit eval` processes, Ray actors on one
machine): each writer renames its own temporary file over the target."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from attnedit.core.files import atomic_write
from attnedit.editing.templates import read_texts, write_texts


def test_concurrent_writers_of_one_cache_file_leave_one_complete_verified_file(tmp_path: Path) -> None:
    path = tmp_path / "texts" / "shared.json"
    versions = {w: [f"writer {w} text {i} " + "x" * 200 for i in range(400)] for w in range(4)}
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for _ in range(25):
                write_texts(path, "texts", versions[w], writer=w)
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert read_texts(path, "texts") in versions.values()  # complete and verified, never a mix
    assert sorted(p.name for p in path.parent.iterdir()) == ["shared.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "entry.bin"
    path.write_bytes(b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]


def test_the_model_is_converted_once_when_processes_load_it_together(tmp_path: Path, monkeypatch) -> None:
    """Two loaders on a cold cache (the quick start's two lanes): one converts, the other waits for it
    and uses its result, instead of deleting it to put its own in place."""
    from attnedit.core import models

    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "locate_gguf", lambda spec: gguf)
    calls: list[int] = []

    def convert(gguf_path: Path, target: Path, fingerprint: str, name: str) -> None:
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other loader to arrive while this one converts
        target.mkdir(parents=True)
        (target / "attnedit_source.json").write_text(json.dumps({"fingerprint": fingerprint}))

    monkeypatch.setattr(models, "_convert", convert)
    spec = models.GGUFModel(name="tiny", distribution="unused", filename="weights.gguf", description="")
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(models.materialise_gguf(spec))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert found == [tmp_path / "cache" / "models" / "tiny"] * 2


def test_a_written_file_has_the_usual_permissions(tmp_path: Path) -> None:
    """A saved edit or cache file is readable as any file the user writes (umask), not private to the
    writer as a ``mkstemp`` file would be."""
    import os

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "edit.safetensors", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
