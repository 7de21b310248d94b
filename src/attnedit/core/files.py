"""The cache's root, and atomic file replacement for files that several processes may write at once
(the shared caches under ``$ATTNEDIT_CACHE``, saved edits): each writer writes its own temporary file
in the target's directory and renames it over the target, so a reader sees one complete file, never a
mix."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Root of attnedit's caches: ``$ATTNEDIT_CACHE`` or ``~/.cache/attnedit``."""
    root = (
        os.environ.get("ATTNEDIT_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnedit"
    )
    return Path(root)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary path next to ``path`` (unique to this call, so two
    processes writing the same file never write into one temporary file), then rename it over
    ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique by process and call; ``write`` creates it, so it gets the usual permissions (umask)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the block, waiting for
    other holders: for one-time work that concurrent processes must not do at once (the model's
    conversion into the cache), which the holder then re-checks before doing it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
