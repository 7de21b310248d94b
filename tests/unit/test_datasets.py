"""Data sets by name: the registry's lookup order, and the real download code against a local HTTP
server on 127.0.0.1 (redirects, a missing file, a wrong checksum, a truncated body, a timeout, a full
disk, concurrent downloads), and ``attnedit data list | fetch | verify``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnedit.cli.main import app
from attnedit.core import datasets
from attnedit.core.data import DataFormatError, load_cases, load_texts
from attnedit.core.datasets import DataSet, DataSetError, dataset_files, resolve, verify
from attnedit.core.download import DownloadError, Pinned, download

# a small MEMIT-format zsRE file, written for these tests
RECORDS = [
    {
        "subject": f"Subject {i}",
        "src": f"What is the home country of Subject {i}?",
        "pred": "France",
        "rephrase": f"Which country is Subject {i} from?",
        "alt": "Spain",
        "answers": ["France"],
        "loc": "nq question: who wrote the iliad",
        "loc_ans": "Homer",
        "cond": "",
    }
    for i in range(40)
]
BODY = json.dumps(RECORDS, indent=1).encode()
SHA = hashlib.sha256(BODY).hexdigest()


@dataclass
class Server:
    """A local HTTP server: ``files`` by path; ``mode`` per path changes how it answers."""

    files: dict[str, bytes] = field(default_factory=dict)
    mode: dict[str, str] = field(default_factory=dict)  # path -> truncate | truncate-once | slow | redirect
    log: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header) of each request
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path, rng = self.path, self.headers.get("Range", "")
            server.log.append((path, rng))
            mode = server.mode.get(path, "")
            if mode == "redirect":
                self.send_response(302)
                self.send_header("Location", path + ".real")
                self.end_headers()
                return
            if mode == "slow":
                time.sleep(3)
            body = server.files.get(path.removesuffix(".real"))
            if body is None:
                self.send_error(404)
                return
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng and mode != "no-range" else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if mode == "truncate" or (mode == "truncate-once" and not start):
                self.wfile.write(body[start : start + (len(body) - start) // 2])
                self.wfile.flush()
                time.sleep(0.2)  # the client reads the first half before it sees the connection close
                self.close_connection = True
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def registry(monkeypatch, tmp_path, server) -> DataSet:
    """An empty ATTNEDIT_DATA, a fresh cache, and one registered set served by ``server``."""
    monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNEDIT_DATA", raising=False)
    server.files["/zsre.json"] = BODY
    ds = DataSet(
        name="toy-zsre",
        title="a toy zsRE set",
        source="tests",
        license="CC0",
        format="memit_zsre",
        records=len(RECORDS),
        files=(Pinned("toy_zsre.json", SHA, len(BODY), (server.url("/zsre.json"),)),),
    )
    monkeypatch.setitem(datasets.DATASETS, ds.name, ds)
    return ds


def pinned(server: Server, *paths: str, body: bytes = BODY) -> Pinned:
    return Pinned("f.json", hashlib.sha256(body).hexdigest(), len(body), tuple(server.url(p) for p in paths))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


def test_a_redirect_is_followed_and_the_file_verified(server, tmp_path):
    server.files["/a.json"] = BODY
    server.mode["/a.json"] = "redirect"
    path = download(pinned(server, "/a.json"), tmp_path / "f.json", "data set 'x'", progress=False)
    assert path.read_bytes() == BODY
    assert [p for p, _ in server.log] == ["/a.json", "/a.json.real"]
    assert leftovers(tmp_path) == ["f.json"]


def test_a_missing_address_falls_back_to_the_next(server, tmp_path):
    server.files["/b.json"] = BODY
    path = download(
        pinned(server, "/gone.json", "/b.json"), tmp_path / "f.json", "data set 'x'", progress=False
    )
    assert path.read_bytes() == BODY


def test_404_is_one_line_naming_the_set_and_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        download(pinned(server, "/gone.json"), tmp_path / "f.json", "data set 'toy'", progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data set 'toy': could not download f.json")
    assert "404" in message and "check the network" in message
    assert leftovers(tmp_path) == []


def test_a_wrong_checksum_is_refused_and_nothing_kept(server, tmp_path):
    server.files["/c.json"] = BODY
    wrong = Pinned("f.json", "0" * 64, len(BODY), (server.url("/c.json"),))
    with pytest.raises(DownloadError, match=r"sha256 is .* not the pinned 000000000000"):
        download(wrong, tmp_path / "f.json", "data set 'x'", progress=False)
    assert leftovers(tmp_path) == []


def test_more_bytes_than_pinned_are_refused(server, tmp_path):
    server.files["/d.json"] = BODY + b"extra"
    with pytest.raises(DownloadError, match="more than the expected"):
        download(pinned(server, "/d.json"), tmp_path / "f.json", "data set 'x'", progress=False)
    assert leftovers(tmp_path) == []


def test_a_truncated_body_is_resumed_with_a_range_request(server, tmp_path):
    server.files["/e.json"] = BODY
    server.mode["/e.json"] = "truncate-once"
    path = download(pinned(server, "/e.json"), tmp_path / "f.json", "data set 'x'", progress=False)
    assert path.read_bytes() == BODY
    ranges = [r for _, r in server.log]
    assert ranges[0] == "" and ranges[1] == f"bytes={len(BODY) // 2}-"


def test_a_download_that_keeps_stopping_resumes_on_the_next_run(server, tmp_path):
    server.files["/f.json"] = BODY
    server.mode["/f.json"] = "truncate"
    dest = tmp_path / "f.json"
    with pytest.raises(DownloadError, match="run the same command again to resume") as err:
        download(pinned(server, "/f.json"), dest, "data set 'x'", progress=False)
    assert "\n" not in str(err.value)
    assert not dest.exists() and (tmp_path / "f.json.part").is_file()  # never under the final name
    kept = (tmp_path / "f.json.part").stat().st_size
    assert 0 < kept < len(BODY)
    server.mode.clear()
    server.log.clear()
    assert download(pinned(server, "/f.json"), dest, "data set 'x'", progress=False).read_bytes() == BODY
    assert server.log == [("/f.json", f"bytes={kept}-")]
    assert leftovers(tmp_path) == ["f.json"]


def test_a_server_that_ignores_range_sends_the_whole_file_again(server, tmp_path):
    server.files["/g.json"] = BODY
    (tmp_path / "f.json.part").write_bytes(BODY[:100])
    server.mode["/g.json"] = "no-range"
    assert download(pinned(server, "/g.json"), tmp_path / "f.json", "x", progress=False).read_bytes() == BODY


def test_a_timeout_is_one_line(server, tmp_path):
    server.files["/h.json"] = BODY
    server.mode["/h.json"] = "slow"
    with pytest.raises(DownloadError, match=r"no answer from 127\.0\.0\.1"):
        download(pinned(server, "/h.json"), tmp_path / "f.json", "data set 'x'", timeout=0.3, progress=False)
    assert not (tmp_path / "f.json").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(server, tmp_path):
    """A real write failure: the child process may not write files over 1 kB (RLIMIT_FSIZE, as a full
    disk refuses the write)."""
    server.files["/i.json"] = BODY
    script = f"""
import resource, signal, sys
from pathlib import Path
from attnedit.core.download import DownloadError, Pinned, download
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
try:
    file = Pinned("f.json", {SHA!r}, {len(BODY)}, ({server.url("/i.json")!r},))
    download(file, Path({str(tmp_path)!r}) / "f.json", "data set 'toy'", progress=False)
except DownloadError as err:
    print(err)
    sys.exit(3)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("data set 'toy': no room to write f.json")
    assert "ATTNEDIT_CACHE" in done.stdout
    assert leftovers(tmp_path) == []


def test_concurrent_downloads_of_one_file_transfer_it_once(server, tmp_path):
    server.files["/j.json"] = BODY
    server.mode["/j.json"] = "slow"  # the first holds the lock a while
    results: list[bytes] = []

    def one() -> None:
        results.append(
            download(pinned(server, "/j.json"), tmp_path / "f.json", "x", progress=False).read_bytes()
        )

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [BODY] * 3 and len(server.log) == 1


# -- the registry ------------------------------------------------------------------------------------------


def test_a_name_is_found_in_attnedit_data_first_then_the_cache_then_downloaded(
    registry, server, tmp_path, monkeypatch
):
    assert resolve("toy-zsre").read_bytes() == BODY  # downloaded into the cache
    assert len(server.log) == 1
    assert resolve("toy-zsre") == tmp_path / "cache" / "data" / "toy_zsre.json"
    assert len(server.log) == 1  # found in the cache: no second download
    local = tmp_path / "mine"
    local.mkdir()
    (local / "toy_zsre.json").write_text(json.dumps(RECORDS[:3]))  # a local (filtered) copy wins
    monkeypatch.setenv("ATTNEDIT_DATA", f"{tmp_path / 'empty'}:{local}")
    assert resolve("toy-zsre") == local / "toy_zsre.json"
    assert len(load_cases("toy-zsre").cases) == 3
    statuses = verify(["toy-zsre"])
    assert [(s.where, s.matches, s.problem) for s in statuses] == [("ATTNEDIT_DATA", False, False)]


def test_a_missing_set_without_downloads_says_what_to_run(registry):
    with pytest.raises(DataSetError) as err:
        dataset_files("toy-zsre", download_missing=False)
    assert "run `attnedit data fetch toy-zsre`" in str(err.value) and "\n" not in str(err.value)


def test_an_existing_file_wins_over_a_name_and_an_unknown_name_is_named(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy-zsre").write_text(json.dumps(RECORDS[:2]))
    assert len(load_cases("toy-zsre").cases) == 2
    with pytest.raises(FileNotFoundError, match="no such file, and no data set of that name"):
        load_cases("no-such-set")


def test_names_work_for_cases_and_texts(registry, server, monkeypatch):
    dataset = load_cases("toy-zsre")
    assert dataset.format == "memit_zsre" and len(dataset.cases) == len(RECORDS)
    assert dataset.sha256 == SHA and dataset.cases[0].request.subject == "Subject 0"
    texts = b"first text\n\nsecond text\n"
    server.files["/wiki.txt"] = texts
    corpus = DataSet(
        "toy-text",
        "a toy corpus",
        "tests",
        "CC0",
        "text",
        2,
        (Pinned("toy.txt", hashlib.sha256(texts).hexdigest(), len(texts), (server.url("/wiki.txt"),)),),
    )
    monkeypatch.setitem(datasets.DATASETS, corpus.name, corpus)
    assert load_texts("toy-text") == ["first text", "second text"]
    with pytest.raises(
        DataFormatError, match=r"'toy-text' holds a toy corpus \(format text\), not edit cases"
    ):
        load_cases("toy-text")


def test_every_builtin_set_is_pinned():
    """Every registered set names its source and license, and every file a sha256, a size and an
    https address."""
    assert datasets.BUILTIN, "no data sets registered"
    for ds in datasets.BUILTIN:
        assert ds.source and ds.license and ds.records > 0, ds.name
        for f in ds.files:
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0, (ds.name, f.name)
            assert f.size > 0 and f.urls and all(u.startswith("https://") for u in f.urls), (ds.name, f.name)


# -- the CLI -----------------------------------------------------------------------------------------------


def test_data_fetch_list_and_verify(registry, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["data", "list"])
    assert listed.exit_code == 0 and "| toy-zsre | a toy zsRE set | 40 |" in listed.output
    assert "| missing |" in listed.output.split("toy-zsre")[1].splitlines()[0]
    fetched = runner.invoke(app, ["data", "fetch", "toy-zsre"])
    assert fetched.exit_code == 0, fetched.output
    line = [
        row for row in runner.invoke(app, ["data", "list", "--json"]).output.splitlines() if "toy-zsre" in row
    ]
    assert json.loads(line[0])["present"] == "cache"
    ok = runner.invoke(app, ["data", "verify", "toy-zsre"])
    assert ok.exit_code == 0 and "ok: the pinned upstream file" in ok.output
    cached = tmp_path / "cache" / "data" / "toy_zsre.json"
    cached.write_bytes(BODY[:-1] + b" ")
    bad = runner.invoke(app, ["data", "verify", "toy-zsre"])
    assert bad.exit_code == 1 and "CORRUPT" in bad.output


def test_data_fetch_of_an_unknown_name_is_one_line(registry):
    result = CliRunner().invoke(app, ["data", "fetch", "toy-zsre", "nope"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: no data set named 'nope'; registered: {', '.join(datasets.DATASETS)} (attnedit data list)"
    ]


def test_data_fetch_failure_is_one_line(registry, server):
    server.files.clear()
    result = CliRunner().invoke(app, ["data", "fetch", "toy-zsre"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0])
    assert errors[0].startswith("error: data set 'toy-zsre': could not download toy_zsre.json")


def test_eval_by_name(registry, tiny_dir, tmp_path):
    """``attnedit eval NAME``: the set is downloaded and evaluated like a file."""
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            *("eval", "toy-zsre", "--model", str(tiny_dir), "--method", "none", "--limit", "2"),
            *("--no-fluency", "--ppl-corpus", "none", "--out", str(out), "--threads", "1"),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["sha256"] == SHA
    assert manifest["data"]["data_set"] == {"name": "toy-zsre", "pinned_sha256": SHA, "upstream": True}
    assert sum(1 for _ in (out / "results.jsonl").open()) == 2
