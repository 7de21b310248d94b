"""Downloads of pinned files: streamed, resumable, verified, renamed into place only when whole.

A file is written to ``NAME.part`` next to its final name. An interrupted transfer (the connection
closed early, a timeout mid-body) leaves that partial file, and the next attempt asks the server for the
rest (an HTTP ``Range`` request; a server that ignores it sends the whole file again). Once the bytes
are all there, their size and sha256 must match the pinned ones; only then is the file renamed to its
final name, so a file under the final name is always complete and verified. A wrong checksum removes
the partial file. Concurrent downloads of one file wait for each other (a ``flock``), so one process
downloads and the others find the finished file.

Every failure is a ``DownloadError`` whose message is one line: the file, what went wrong at each
address tried, and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from attnedit.core.files import exclusive

logger = logging.getLogger(__name__)

RESUMES = 3  # transfers that stop early are resumed this many times per address before giving up
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space left, quota, file-size limit


class DownloadError(OSError):
    """A pinned file could not be downloaded (its message: one line, what happened and what to do)."""


@dataclass(frozen=True)
class Pinned:
    """A file to download: where from (tried in order), and the size and sha256 it must have."""

    name: str  # its file name on this machine
    sha256: str
    size: int
    urls: tuple[str, ...]


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Stopped(Exception):
    """A transfer that ended before the whole file (resumable)."""


class _Failed(Exception):
    """An address that cannot give the file (not found, refused, wrong bytes): try the next one."""


def human_size(size: int) -> str:
    """``size`` bytes for people: ``9.7 kB``, ``45.1 MB``."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _transfer(client: httpx.Client, url: str, part: Path, pinned: Pinned, progress: bool) -> None:
    """Stream ``url`` into ``part``, continuing a partial file where the server allows it."""
    have = part.stat().st_size if part.exists() else 0
    if have > pinned.size:
        part.unlink()
        have = 0
    # identity: the bytes of the file itself, so that a Range offset counts the file's bytes
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    overflow = False
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416:  # the partial file does not fit this server's file
                part.unlink(missing_ok=True)
                raise _Stopped("the server refused to resume; starting over")
            if response.status_code >= 400:
                raise _Failed(f"{url} answered {response.status_code} {response.reason_phrase}")
            if response.status_code != 206:  # the whole file: start from its first byte
                have = 0
            mode = "ab" if have else "wb"
            bar = tqdm(
                total=pinned.size,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=pinned.name,
                disable=not progress,
                leave=False,
            )
            with bar, open(part, mode) as fh:
                for chunk in response.iter_bytes():  # as they arrive: a transfer that stops keeps them
                    if have + len(chunk) > pinned.size:
                        overflow = True
                        break
                    fh.write(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
    except httpx.TimeoutException as err:
        host = urlsplit(url).netloc
        raise _Stopped(f"no answer from {host} in time ({type(err).__name__})") from None
    except (httpx.RemoteProtocolError, httpx.ReadError) as err:
        raise _Stopped(f"the connection closed early ({err})") from None
    except httpx.HTTPError as err:  # refused, unknown host, too many redirects, ...
        raise _Failed(f"{url}: {type(err).__name__}: {err}") from None
    if overflow:
        part.unlink()
        raise _Failed(f"{url} sent more than the expected {pinned.size} bytes (removed)")
    if have < pinned.size:
        raise _Stopped(f"the transfer ended after {have} of {pinned.size} bytes")


def download(pinned: Pinned, dest: Path, label: str, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``pinned`` to ``dest`` (verified, atomically renamed) unless a finished file is there;
    ``label`` names what it is for in every message (e.g. ``data set 'zsre'``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    again = f"run the same command again to resume ({part} keeps the bytes so far)"
    with exclusive(dest.with_name(f".{dest.name}.lock")):
        if dest.is_file():  # another process finished it while this one waited
            return dest
        problems: list[str] = []
        stopped = False
        with httpx.Client(follow_redirects=True, timeout=timeout) as client:
            for url in pinned.urls:
                logger.info(
                    "%s: downloading %s from %s (%s)", label, pinned.name, url, human_size(pinned.size)
                )
                for attempt in range(RESUMES + 1):
                    try:
                        _transfer(client, url, part, pinned, progress)
                        break
                    except _Stopped as err:
                        stopped = True
                        if attempt == RESUMES:
                            problems.append(f"{url}: {err}")
                        else:
                            logger.warning("%s: %s; resuming", label, err)
                    except _Failed as err:
                        problems.append(str(err))
                        break
                    except OSError as err:
                        part.unlink(missing_ok=True)
                        if err.errno in NO_ROOM:
                            raise DownloadError(
                                f"{label}: no room to write {pinned.name} in {dest.parent} "
                                f"({err.strerror}; it needs {human_size(pinned.size)}): free space there, or "
                                "set ATTNEDIT_CACHE to a folder on another disk"
                            ) from None
                        raise DownloadError(f"{label}: cannot write {part}: {err.strerror}") from None
                else:
                    continue
                if not part.is_file() or part.stat().st_size != pinned.size:
                    continue  # stopped for good at this address (recorded above)
                digest = sha256_of(part)
                if digest != pinned.sha256:
                    part.unlink()
                    problems.append(
                        f"{url} gave a file whose sha256 is {digest[:12]}..., not the pinned "
                        f"{pinned.sha256[:12]}... (removed)"
                    )
                    continue
                part.replace(dest)
                logger.info("%s: %s verified (sha256 %s...)", label, dest, digest[:12])
                return dest
    if stopped and part.is_file():
        todo = again
    else:
        todo = (
            "check the network and try again, or download the file by hand into a folder listed in "
            "ATTNEDIT_DATA"
        )
    raise DownloadError(f"{label}: could not download {pinned.name}: {'; '.join(problems)}; {todo}")
