"""Exact resume of a stream on SmolLM2: the same AlphaEdit stream run once uninterrupted and once killed
with SIGKILL (after its first group's state is saved, and again during its final scoring) and resumed;
the records (timings aside), the checkpoint lines, every saved edit and the final weights' sha256 must be
equal. Dev records only (CounterFact, MEND form, val split, records 300-329).

    python bench/stream_resume_check.py            # -> bench/results/stream_resume_smollm2.json

Run directories under ~/.cache/attnedit/streams/resume_check (removed first: the check starts afresh).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from attnedit.core.deltas import WeightEdit

ROOT = Path(__file__).resolve().parents[1]
WORK = Path.home() / ".cache" / "attnedit" / "streams" / "resume_check"
RESULT = ROOT / "bench" / "results" / "stream_resume_smollm2.json"


def command(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "attnedit.cli.main",
        "eval",
        "counterfact-mend-val",
        *("--first", "300", "--limit", "30", "--method", "alphaedit", "--mode", "sequential"),
        *("--batch-size", "10", "--checkpoint-every", "10", "--checkpoint-sample", "20"),
        *("--general-samples", "30", "--no-fluency", "--ppl-corpus", "none", "--threads", "2"),
        *("-p", "target_matmul=bfloat16", "--out", str(out)),
    ]


def kill_when(cmd: list[str], ready: Callable[[], bool]) -> float:
    """Start ``cmd``, SIGKILL it once ``ready()``; returns the seconds it ran."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not ready():
        time.sleep(0.05)
    if proc.poll() is not None:
        raise SystemExit("the run ended before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.time() - t0


def lines(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("seconds")} for row in rows]


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    whole, resumed = WORK / "whole", WORK / "resumed"
    t0 = time.time()
    subprocess.run(command(whole), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds_whole = time.time() - t0
    state = resumed / "stream" / "state.json"

    def saved_one() -> bool:
        try:
            return json.loads(state.read_text())["groups"] >= 1
        except (OSError, ValueError):
            return False

    def scoring() -> bool:
        results = resumed / "results.jsonl"
        return results.is_file() and results.read_bytes().count(b"\n") >= 5

    killed = [kill_when(command(resumed), saved_one)]
    groups_at_kill = json.loads(state.read_text())["groups"]
    killed.append(kill_when(command(resumed), scoring))
    subprocess.run(command(resumed), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    same_edits = True
    for k in range(3):
        a = WeightEdit.load(whole / "edits" / f"{k:05d}.safetensors").deltas
        b = WeightEdit.load(resumed / "edits" / f"{k:05d}.safetensors").deltas
        same_edits &= a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ends = [json.loads((d / "stream" / "state.json").read_text()) for d in (whole, resumed)]
    result = {
        "command": " ".join(command(Path("OUT"))[1:]),
        "machine": "2 CPU cores, no GPU",
        "seconds_uninterrupted": round(seconds_whole, 1),
        "killed_after_seconds": [round(s, 1) for s in killed],
        "groups_saved_at_first_kill": groups_at_kill,
        "same_records": lines(whole / "results.jsonl") == lines(resumed / "results.jsonl"),
        "same_curves": lines(whole / "curves.jsonl") == lines(resumed / "curves.jsonl"),
        "same_edits": same_edits,
        "same_final_weights": ends[0]["weights_sha256"] == ends[1]["weights_sha256"],
        "records": len(lines(whole / "results.jsonl")),
        "checkpoints": len(lines(whole / "curves.jsonl")),
    }
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
