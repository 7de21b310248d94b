"""Screenshots of the edit inspector on SmolLM2 for docs/inspector.md, and the case they show.

    python bench/inspector_screenshots.py [--runs runs/] [--scan 20] [--sadr-candidates 2]

1. Serves the inspector on SmolLM2 (``attnedit.load_model("smollm2-135m")``, uvicorn in a thread on a
   free port, as ``tests/browser/test_browser.py`` does), one torch thread.
2. Chooses the case by measuring it through the inspector's own API: each of the first ``--scan``
   cases of the shipped sample set (merged CounterFact, ``load_cases("sample")``) is edited with ROME
   at the served preset (``POST /api/edits``, its paraphrase, neighbour and relation prompts as the
   page's sample picker fills them), and its drift grid fetched (``GET /api/edits/{id}/grid``); the
   seconds from POST to grid are recorded. A candidate is a case whose rewrite succeeds under ROME
   (P(o_new) > P(o_true) on the edit prompt) while a distracted neighbour fails (P(o_new) > P(o_true)
   with the edit sentence prepended). Candidates are ranked by failing distracted neighbours, then by
   the largest P(o_new) - P(o_true) on one; the best ``--sadr-candidates`` are edited with ROME+SADR,
   and the first on which ROME+SADR fails fewer distracted neighbours (its rewrite still succeeding)
   is shown, else the best-ranked one. ``--case I`` skips the scan.
3. Drives the page in the system's headless Chromium (Playwright): one ROME edit alone (seconds from
   the Edit click to the rendered grid), then ROME and ROME+SADR side by side on the case, and saves
   PNGs into docs/figures/inspector/: ``form_answers`` (a), ``drift_grid`` (b; the probe prompt is the
   failing distracted neighbour, SADR-selected heads outlined), ``head_row`` (c), ``patching`` (d),
   ``error`` (e) and, with ``--runs``, ``runs`` (f).

At most ``scan + sadr_candidates + 3`` edits run (25 with the defaults). Writes
bench/results/inspector_screenshots.json: the scan, the chosen case with its answers as the page showed
them, and the timings with the machine's load (``--machine-note`` says what else ran: timings on a
shared machine are not idle figures). Needs the serve extra, Playwright and Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import uvicorn
from playwright.sync_api import Page, sync_playwright

import attnedit
from attnedit.core.deltas import model_hash
from attnedit.serve.app import create_app

MODEL = "smollm2-135m"
FIGURES = Path("docs/figures/inspector")
OUT = Path("bench/results/inspector_screenshots.json")
VIEWPORT = {"width": 1600, "height": 1000}
EDIT_TIMEOUT_MS = 600_000  # two queued edits on a busy shared machine


# --- the server and its API ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(runs: Path | None) -> tuple[str, Any, uvicorn.Server, threading.Thread]:
    """The inspector on SmolLM2, served by uvicorn in a daemon thread; (url, app, server, thread)."""
    bundle = attnedit.load_model(MODEL)
    app = create_app(bundle, runs)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", app, server, thread


def call(url: str, path: str, body: dict | None = None) -> Any:
    """GET (or POST ``body`` as JSON) and decode the JSON answer; a 4xx/5xx answer raises."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=EDIT_TIMEOUT_MS / 1000) as response:
        return json.loads(response.read())


def edit_request(case: dict, method: str) -> dict:
    """The API body for a sample case, with the probe prompts the page's sample picker fills in."""
    keys = ("prompt", "subject", "target_new", "target_true", "paraphrase", "neighbors", "relation")
    return {"method": method, "params": {}, **{k: case[k] for k in keys}}


def summarise(results: list[dict]) -> dict:
    """The rewrite's success and each distracted neighbour's P(o_new), P(o_true) after the edit."""
    rewrite = next(r for r in results if r["kind"] == "rewrite")
    dns = [
        {"prompt": r["prompt"], "p_new": r["after"]["p_new"], "p_true": r["after"]["p_true"]}
        | {"p_new_before": r["before"]["p_new"], "p_true_before": r["before"]["p_true"]}
        for r in results
        if r["kind"] == "distracted_neighbor"
    ]
    failing = [d for d in dns if d["p_new"] > d["p_true"]]
    return {
        "rewrite_success": rewrite["after"]["p_new"] > rewrite["after"]["p_true"],
        "rewrite": {"p_new": rewrite["after"]["p_new"], "p_true": rewrite["after"]["p_true"]},
        "dn_failing": len(failing),
        "dn_total": len(dns),
        "dn_worst_margin": max((d["p_new"] - d["p_true"] for d in dns), default=None),
        "distracted_neighbors": dns,
        "answers": results,
    }


def timed_edit(url: str, case: dict, method: str) -> dict:
    """Edit through the API and fetch the edit prompt's drift grid; the answers and the seconds."""
    t0 = time.perf_counter()
    done = call(url, "/api/edits", edit_request(case, method))
    t1 = time.perf_counter()
    grid = call(url, f"/api/edits/{done['id']}/grid")
    t2 = time.perf_counter()
    return {
        "case_index": case["index"],
        "case_id": case["case_id"],
        "method": method,
        "edit_id": done["id"],
        "server_edit_s": done["seconds"],  # answers before, the edit, answers after, revert
        "post_s": t1 - t0,
        "grid_s": t2 - t1,
        "post_to_grid_s": t2 - t0,
        "grid_shape": [grid["layers"], grid["heads"]],
        "selected_heads": sum(map(sum, grid["selected"])),
        **summarise(done["results"]),
    }


def chosen_case(selection: dict) -> int:
    """The shown case of a scan (see the module docstring)."""
    return (selection["repaired_by_sadr"] or selection["candidates"])[0]


def shown_neighbor(results: dict) -> dict:
    """The distracted neighbour the grid, head row and patching show: of those failing under ROME whose
    plain neighbour does not fail (the edit sentence in the context is what breaks them), the one with
    the largest P(o_new) - P(o_true); any failing one if there is none such."""
    plain = {r["prompt"]: r["after"] for r in results["answers"] if r["kind"] == "neighbor"}
    failing = [d for d in results["distracted_neighbors"] if d["p_new"] > d["p_true"]]
    if not failing:
        raise SystemExit(f"case {results['case_index']}: no distracted neighbour fails under ROME")
    clean = [
        d
        for d in failing
        if any(d["prompt"].endswith(" " + p) and a["p_new"] < a["p_true"] for p, a in plain.items())
    ]
    return max(clean or failing, key=lambda d: d["p_new"] - d["p_true"])


def scan_cases(url: str, cases: list[dict], scan: int, sadr_candidates: int) -> dict:
    """What was measured to choose the shown case."""
    rome = []
    for case in cases[:scan]:
        row = timed_edit(url, case, "rome")
        rome.append(row)
        print(
            f"case {case['index']} ({case['subject']} -> {case['target_new']}): rewrite "
            f"{'ok' if row['rewrite_success'] else 'fails'}, distracted neighbours failing "
            f"{row['dn_failing']}/{row['dn_total']}, POST->grid {row['post_to_grid_s']:.2f} s "
            f"(edit {row['server_edit_s']:.2f} s)",
            flush=True,
        )
    candidates = sorted(
        (r for r in rome if r["rewrite_success"] and r["dn_failing"] > 0),
        key=lambda r: (-r["dn_failing"], -r["dn_worst_margin"]),
    )
    if not candidates:
        raise SystemExit(f"no case among the first {scan} fails a distracted neighbour under ROME")
    sadr = []
    for row in candidates[:sadr_candidates]:
        other = timed_edit(url, cases[row["case_index"]], "rome+sadr")
        sadr.append(other)
        print(
            f"case {row['case_index']} rome+sadr: rewrite {'ok' if other['rewrite_success'] else 'fails'}, "
            f"distracted neighbours failing {other['dn_failing']}/{other['dn_total']}",
            flush=True,
        )
    repaired = [
        s["case_index"]
        for s, r in zip(sadr, candidates, strict=False)
        if s["rewrite_success"] and s["dn_failing"] < r["dn_failing"]
    ]
    rule = (
        "rewrite succeeds and a distracted neighbour fails under ROME; ranked by failing distracted "
        "neighbours, then the largest P(o_new) - P(o_true) on one; the first of the top "
        f"{sadr_candidates} on which ROME+SADR fails fewer (rewrite still succeeding), else the top one"
    )
    return {
        "rule": rule,
        "rome": rome,
        "candidates": [r["case_index"] for r in candidates],
        "rome_sadr": sadr,
        "repaired_by_sadr": repaired,
    }


# --- the page ----------------------------------------------------------------------------------------


def _box(page: Page, selectors: list[str], pad: int = 8, max_height: int = 2000) -> dict:
    """The page-coordinate rectangle around every element the selectors match (for a clipped shot),
    at most the viewport's width (wide tables are cut at its right edge) and ``max_height`` tall."""
    boxes = [
        b
        for s in selectors
        for b in (page.locator(s).nth(i).bounding_box() for i in range(page.locator(s).count()))
        if b
    ]
    scroll = page.evaluate("[window.scrollX, window.scrollY]")
    left = min(b["x"] for b in boxes) + scroll[0] - pad
    top = min(b["y"] for b in boxes) + scroll[1] - pad
    right = max(b["x"] + b["width"] for b in boxes) + scroll[0] + pad
    bottom = max(b["y"] + b["height"] for b in boxes) + scroll[1] + pad
    left, top = max(0, left), max(0, top)
    width = min(right - left, VIEWPORT["width"] - left)
    return {"x": left, "y": top, "width": width, "height": min(bottom - top, max_height)}


def shoot(page: Page, name: str, selectors: list[str], max_height: int = 2000) -> str:
    path = FIGURES / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, clip=_box(page, selectors, max_height=max_height))
    print(f"saved {path}", flush=True)
    return path.as_posix()


def column(i: int) -> str:
    return f"#columns .column:nth-of-type({i})"


def wait_grid(page: Page, i: int) -> None:
    page.wait_for_selector(f"{column(i)} .grid svg rect.cell", timeout=EDIT_TIMEOUT_MS)


def edit_id(page: Page, i: int) -> str:
    href = page.get_attribute(f"{column(i)} .downloads a[href$='view.json']", "href") or ""
    return href.split("/")[3]  # /api/edits/{id}/view.json


def drive_page(url: str, case: dict, dn_prompt: str, runs: bool) -> dict:
    """The screenshots of the page on ``case``; the page-side timing and the ids of the shown edits."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no system Chromium: apt-get install chromium")
    out: dict[str, Any] = {"screenshots": {}}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            page.select_option("#sample", str(case["index"]))
            # ROME alone: from the Edit click to the rendered drift grid, as a user sees it
            page.select_option("#method-a", "rome")
            t0 = time.perf_counter()
            page.click("#edit-button")
            wait_grid(page, 1)
            out["page_rome_click_to_grid_s"] = time.perf_counter() - t0
            out["page_rome_server_edit_s"] = call(url, f"/api/edits/{edit_id(page, 1)}")["seconds"]
            # ROME and ROME+SADR side by side (queued together, run one after the other)
            page.check("#compare")
            page.select_option("#method-b", "rome+sadr")
            page.click("#edit-button")
            wait_grid(page, 1)
            wait_grid(page, 2)
            ids = [edit_id(page, 1), edit_id(page, 2)]
            out["edit_ids"] = dict(zip(("rome", "rome+sadr"), ids, strict=True))
            shots = out["screenshots"]
            shots["form_answers"] = shoot(page, "form_answers", ["#edit-form", ".answers"])
            # (b) the drift grid on the failing distracted neighbour in both columns
            for i in (1, 2):
                page.select_option(f"{column(i)} .probe", dn_prompt)
                wait_grid(page, i)
            grids = [call(url, f"/api/edits/{k}/grid?prompt={urllib.parse.quote(dn_prompt)}") for k in ids]
            shots["drift_grid"] = shoot(page, "drift_grid", [".probe", ".grid"])
            # (c) ROME's most-drifted head among those SADR would select (any head if none), both columns
            kl, selected = grids[0]["kl"], grids[0]["selected"]
            cells = [(lay, h) for lay, row in enumerate(selected) for h, s in enumerate(row) if s]
            cells = cells or [(lay, h) for lay in range(grids[0]["layers"]) for h in range(grids[0]["heads"])]
            layer, head = max(cells, key=lambda c: kl[c[0]][c[1]])
            for i in (1, 2):
                page.click(f"{column(i)} .grid svg rect.cell[data-layer='{layer}'][data-head='{head}']")
                page.wait_for_selector(f"{column(i)} .head-row .tokens.after .token")
            out["head"] = {
                "layer": layer,
                "head": head,
                "kl": {"rome": kl[layer][head], "rome+sadr": grids[1]["kl"][layer][head]},
            }
            out["dn_grid"] = {
                name: {"max_kl": max(map(max, g["kl"])), "selected_heads": sum(map(sum, g["selected"]))}
                for name, g in zip(("rome", "rome+sadr"), grids, strict=True)
            }
            shots["head_row"] = shoot(page, "head_row", [".head-row"])
            # (d) the patching curve of the same prompt, both columns
            for i in (1, 2):
                page.click(f"{column(i)} .patch-button")
            for i in (1, 2):
                page.wait_for_selector(f"{column(i)} .patching svg polyline", timeout=EDIT_TIMEOUT_MS)
            shots["patching"] = shoot(page, "patching", [".patch-button", ".patching"])
            out["patching"] = {
                name: call(url, f"/api/edits/{k}/patching?prompt={urllib.parse.quote(dn_prompt)}")
                for name, k in out["edit_ids"].items()
            }  # computed for the page already: the server answers from its cache
            out["answers_shown"] = {
                name: call(url, f"/api/edits/{k}")["results"] for name, k in out["edit_ids"].items()
            }
            # (e) a bad request: a subject that is not in the prompt, answered inline
            page.fill("input[name=subject]", "Big Ben")
            page.click("#edit-button")
            page.wait_for_selector("#form-error:not([hidden])")
            out["error_text"] = page.inner_text("#form-error")
            shots["error"] = shoot(page, "error", ["#edit-form"])
            if runs:  # (f) the runs tab: the list and the first run's records
                page.click("button[data-tab='runs-tab']")
                page.wait_for_selector("#runs-table tr.clickable")
                rows = page.locator("#runs-table tr.clickable")
                # a ROME run if there is one (the records of the method shown above), else the first
                rome = rows.filter(has_text="rome")
                (rome if rome.count() else rows).first.click()
                page.wait_for_selector("#records-table tr")
                out["runs_shown"] = page.inner_text("#run-title")
                shots["runs"] = shoot(page, "runs", ["#runs-table", "#run-detail"], max_height=900)
        finally:
            browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, default=None, help="the runs browser's root (e.g. runs/)")
    ap.add_argument("--scan", type=int, default=20, help="sample cases edited with ROME to choose from")
    ap.add_argument("--sadr-candidates", type=int, default=2, help="candidates also edited with ROME+SADR")
    ap.add_argument("--case", type=int, default=None, help="show this sample case, without the scan")
    ap.add_argument(
        "--reuse-scan",
        type=Path,
        default=None,
        help="take the scan from this earlier output JSON (redo the screenshots without the scan's edits)",
    )
    ap.add_argument(
        "--machine-note",
        default="busy: another benchmark ran concurrently on this 2-core machine; not an idle figure",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    url, app, server, thread = serve(args.runs)
    try:
        cases = call(url, "/api/sample")["cases"]
        methods = call(url, "/api/methods")["methods"]
        settings = {m["name"]: m for m in methods if m["name"] in ("rome", "rome+sadr")}
        if args.case is not None:
            chosen, scan = args.case, {"rule": "given with --case"}
        else:
            if args.reuse_scan is not None:
                scan = json.loads(args.reuse_scan.read_text())["selection"]
                scan["reused_from"] = "an earlier run of this script (the same scan, not repeated)"
            else:
                scan = scan_cases(url, cases, args.scan, args.sadr_candidates)
            chosen = chosen_case(scan)
        case = cases[chosen]
        rome = next((r for r in scan.get("rome", []) if r["case_index"] == chosen), None)
        if rome is None or "answers" not in rome:  # --case, or a scan saved without the answers
            rome = timed_edit(url, case, "rome")
        dn = shown_neighbor(rome)
        print(
            f"showing case {chosen} ({case['case_id']}), distracted neighbour: {dn['prompt']!r}", flush=True
        )
        page = drive_page(url, case, dn["prompt"], args.runs is not None)
        assert model_hash(app.state.inspector.bundle.model) == app.state.inspector.original_hash
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    timings = [r["post_to_grid_s"] for r in scan.get("rome", [])] or [rome["post_to_grid_s"]]
    overheads = [r["post_to_grid_s"] - r["server_edit_s"] for r in scan.get("rome", [])] or [
        rome["post_to_grid_s"] - rome["server_edit_s"]
    ]
    out = {
        "model": MODEL,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "state": args.machine_note,
        },
        "versions": {
            "attnedit": attnedit.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "settings": settings,
        "runs_root": str(args.runs) if args.runs else None,
        "chosen": {
            "case_index": chosen,
            "case_id": case["case_id"],
            "request": edit_request(case, "rome"),
            "distracted_neighbor_shown": dn,
            "rome": rome,
        },
        "selection": scan,
        "speed": {
            "what": "ROME through the API: POST /api/edits (answers before, edit, answers after, revert) "
            "then GET /api/edits/{id}/grid (the edit prompt's drift grid, one batched pass)",
            "post_to_grid_median_s": statistics.median(timings),
            "post_to_grid_max_s": max(timings),
            "post_to_grid_minus_edit_median_s": statistics.median(overheads),
            "post_to_grid_minus_edit_max_s": max(overheads),
            "n": len(timings),
            "page_rome_click_to_grid_s": page["page_rome_click_to_grid_s"],
            "page_rome_server_edit_s": page["page_rome_server_edit_s"],
            "machine_state": args.machine_note,
        },
        "page": {
            k: v for k, v in page.items() if k not in ("page_rome_click_to_grid_s", "page_rome_server_edit_s")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({"chosen": out["chosen"]["case_index"], "speed": out["speed"]}, indent=1))


if __name__ == "__main__":
    main()
