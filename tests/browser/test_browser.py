"""The inspector page in a real headless Chromium (the system's, driven by Playwright): load the page served
on a tiny model, run an edit, wait for the drift grid, click a head, see its attention row, submit a bad
request and see the inline error; open the offline file of ``attnedit inspect --html`` (``file://``, no
server), see its grid, click a head and see its row; on the Runs tab, report ticked runs and see an edit
stream's curves. Screenshots go to the test's temporary directory."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from helpers import make_eval_runs, make_tiny, stream_lines, torch_threads, write_run_dir, write_tiny_presets
from playwright.sync_api import Page, expect, sync_playwright

from attnedit.core.deltas import model_hash
from attnedit.serve.app import create_app
from attnedit.serve.inspector import Inspector, build_case, build_editor
from attnedit.serve.offline import offline_view, write_html


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free port: its URL."""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def server(tmp_path, monkeypatch, tiny_tokenizer):
    """The inspector on a tiny Llama (ROME preset), served by uvicorn in a thread on a free port."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The city number {i} lies on the river {i % 7}." for i in range(40)))
    write_tiny_presets(tmp_path / "presets", corpus)
    monkeypatch.setenv("ATTNEDIT_PRESETS", str(tmp_path / "presets"))
    monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / "cache"))
    with torch_threads(1):
        bundle = make_tiny("llama", tiny_tokenizer)
        app = create_app(bundle, None)
        with _serving(app) as url:
            yield url, app, bundle


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no system Chromium for the browser test: apt-get install chromium (Debian's package)")
    return path


def test_page_edits_shows_grid_head_row_and_errors(server, tmp_path):
    url, app, bundle = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            expect(page.locator("#model-name")).to_have_text("tiny-llama")
            assert page.locator("#method-a option").count() >= 13  # 7 methods and 6 +sadr variants
            page.fill("textarea[name=neighbors]", "The Louvre is located in the city of")
            page.click("#edit-button")
            # the grid: 3 layers x 6 heads of the tiny Llama
            page.wait_for_selector(".grid svg rect.cell", timeout=60_000)
            assert page.locator(".grid svg rect.cell").count() == 18
            expect(page.locator(".answers tr")).to_have_count(4)  # header, rewrite, neighbour, distracted
            expect(page.locator(".progress")).to_contain_text("step 0")
            page.screenshot(path=str(shots / "grid.png"), full_page=True)
            # a head of layer 2 (the layer above the edit): its attention row before and after
            page.click(".grid svg rect.cell[data-layer='2'][data-head='1']")
            page.wait_for_selector(".head-row .tokens.after .token")
            tokens = page.locator(".head-row .tokens.before .token")
            assert tokens.count() == page.locator(".head-row .tokens.after .token").count() >= 5
            assert page.locator(".head-row .tokens.before .token.subject").count() >= 1
            expect(page.locator(".head-row h4")).to_contain_text("layer 2, head 1")
            page.screenshot(path=str(shots / "head.png"), full_page=True)
            # a subject that is not in the prompt: an inline error naming the field
            page.fill("input[name=prompt]", "The Eiffel Tower is in")
            page.fill("input[name=subject]", "Big Ben")
            page.click("#edit-button")
            error = page.locator("#form-error")
            expect(error).to_be_visible()
            expect(error).to_contain_text("subject")
            assert "invalid" in (page.get_attribute("input[name=subject]", "class") or "")
            page.screenshot(path=str(shots / "error.png"), full_page=True)
        finally:
            browser.close()
    assert all((shots / f"{name}.png").stat().st_size > 0 for name in ("grid", "head", "error"))
    assert model_hash(bundle.model) == app.state.inspector.original_hash


def test_browser_test_needs_the_system_chromium():
    """The check above fails, never skips, without Chromium: CI must install it (.ci/run does)."""
    assert Path(_chromium()).is_file()


@pytest.fixture
def offline_file(tmp_path, monkeypatch, tiny_tokenizer) -> Path:
    """The offline view of a ROME edit on a tiny Llama (what ``attnedit inspect --html`` writes)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The city number {i} lies on the river {i % 7}." for i in range(40)))
    write_tiny_presets(tmp_path / "presets", corpus)
    monkeypatch.setenv("ATTNEDIT_PRESETS", str(tmp_path / "presets"))
    monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / "cache"))
    with torch_threads(1):
        bundle = make_tiny("llama", tiny_tokenizer)
        case, probes = build_case(
            bundle,
            "{} is located in the city of",
            "Eiffel Tower",
            "Rome",
            "Paris",
            {"neighbors": ["The Louvre is located in the city of"]},
        )
        inspector = Inspector(bundle)
        try:
            view = offline_view(inspector, "rome", case, probes, build_editor(bundle, "rome", {}))
        finally:
            inspector.close()
    return write_html(view, tmp_path / "view.html")


def test_offline_file_shows_grid_and_head_rows_without_requests(offline_file, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(offline_file.as_uri())
            page.wait_for_selector("body[data-ready='1']")
            expect(page.locator("#model-name")).to_contain_text("offline view")
            assert not page.locator("#edit-form").is_visible()
            page.wait_for_selector(".grid svg rect.cell")
            assert page.locator(".grid svg rect.cell").count() == 18
            expect(page.locator(".answers tr")).to_have_count(4)  # header, rewrite, neighbour, distracted
            # the probe selector offers the embedded prompts: the rewrite and the distracted neighbour
            expect(page.locator(".probe option")).to_have_count(2)
            page.click(".grid svg rect.cell[data-layer='2'][data-head='1']")
            page.wait_for_selector(".head-row .tokens.after .token")
            tokens = page.locator(".head-row .tokens.before .token")
            assert tokens.count() == page.locator(".head-row .tokens.after .token").count() >= 5
            assert page.locator(".head-row .tokens.before .token.subject").count() >= 1
            expect(page.locator(".head-row h4")).to_contain_text("layer 2, head 1")
            page.screenshot(path=str(shots / "offline-head.png"), full_page=True)
            # the distracted neighbour's grid and rows, and its patching curve, are in the file too
            page.select_option(".probe", index=1)
            page.wait_for_selector(".grid svg rect.cell")
            page.click(".grid svg rect.cell[data-layer='2'][data-head='0']")
            expect(page.locator(".head-row h4")).to_contain_text("layer 2, head 0")
            page.click(".patch-button")
            page.wait_for_selector(".patching svg polyline", state="attached")  # a flat line: no height
            assert page.locator(".patching svg polyline").count() == 2
            page.screenshot(path=str(shots / "offline-patching.png"), full_page=True)
        finally:
            browser.close()
    assert requested == [offline_file.as_uri()]  # the file itself, nothing else
    assert all((shots / f"{name}.png").stat().st_size > 0 for name in ("offline-head", "offline-patching"))


@contextlib.contextmanager
def _runs_tab(app: FastAPI) -> Iterator[Page]:
    """The served page in a headless Chromium, on its Runs tab (the browser closed afterwards)."""
    with _serving(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            page.click(".tab[data-tab='runs-tab']")
            yield page
        finally:
            browser.close()


def test_runs_tab_reports_ticked_runs(tmp_path, tiny_dir, tiny_tokenizer):
    """The Runs tab: tick two runs, see their report, then their paired differences against one."""
    with torch_threads(1):
        root = make_eval_runs(tmp_path, tiny_dir)
        app = create_app(make_tiny("llama", tiny_tokenizer), root)
    with _runs_tab(app) as page:
        page.wait_for_selector("#runs-table input.tick")
        expect(page.locator("#report-button")).to_be_disabled()
        assert page.locator("#runs-table input.tick[data-path='analysis']").count() == 0
        page.check("#runs-table input.tick[data-path='evals/base']")
        page.check("#runs-table input.tick[data-path='evals/ft']")
        expect(page.locator("#run-detail")).to_be_hidden()  # ticking does not open the run
        page.click("#report-button")
        expect(page.locator("#report-table tr")).to_have_count(3)  # header, none, ft
        expect(page.locator("#report-table")).to_contain_text("evals/ft")
        page.select_option("#report-against", "none")
        expect(page.locator("#paired-table tr")).to_have_count(2)  # header, ft - none
        expect(page.locator("#paired-table")).to_contain_text("ft - none")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 0


def test_runs_tab_draws_a_stream_s_curves(tmp_path, tiny_tokenizer):
    """The Runs tab: click an edit stream that collapsed: a chart per metric with a cross on its last
    checkpoint, and its checkpoint table; a run without curves shows none."""
    root = tmp_path / "runs"
    lines = stream_lines(3, collapse=True)
    write_run_dir(root / "alpha", "alphaedit", method="alphaedit", lines=lines)
    write_run_dir(root / "batch", "memit", mode="batch")
    with torch_threads(1):
        app = create_app(make_tiny("llama", tiny_tokenizer), root)
    with _runs_tab(app) as page:
        page.click("#runs-table tr.clickable:has-text('alphaedit')")
        page.wait_for_selector("#curve-charts svg.curve")
        charts = page.locator("#curve-charts svg.curve")
        # ES, PS, NS, PIQA, ppl, known, fluency, change
        expect(charts).to_have_count(8)
        assert page.locator("#curve-charts svg.curve[data-metric='ES'] circle").count() == len(lines) - 1
        assert page.locator("#curve-charts svg.curve[data-metric='ppl'] circle").count() == len(lines)
        expect(page.locator("#curve-charts .collapse-mark")).to_have_count(8)
        expect(page.locator("#curves-table tr")).to_have_count(1 + len(lines))  # header, checkpoints
        expect(page.locator("#curves-table")).to_contain_text(lines[-1]["collapsed"])
        expect(page.locator("#curves-note")).to_contain_text("the stream stopped")
        page.screenshot(path=str(tmp_path / "curves.png"), full_page=True)
        page.click("#runs-table tr.clickable:has-text('memit')")
        expect(page.locator("#run-title")).to_have_text("batch")
        expect(page.locator("#run-curves")).to_be_hidden()
    assert (tmp_path / "curves.png").stat().st_size > 0
