"""The stream table from the runs of ``bench/stream_table.sh``: per data set the final table (every edit
scored on the final model, 95% intervals), paired differences against MEMIT (and of each +SADR variant
against its base method), the curves (``attnedit report``'s figure and table at every 100 edits), and
the costs read from the checkpoint lines: edit seconds per batch of 100, and a checkpoint's share of the
stream's time.

    python bench/stream_table.py [cf|zsre ...]    # -> bench/results/streams/SET/ (report.md, paired*.md,
                                                  #    curves.png/.md/.json, costs.json)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from attnedit.runs.rundir import read_curves

ROOT = Path(__file__).resolve().parents[1]
RUNS = Path(os.environ.get("OUT", Path.home() / ".cache/attnedit/streams/table"))
RESULTS = ROOT / "bench" / "results" / "streams"
ORDER = ("none", "memit", "alphaedit", "memit-sadr", "alphaedit-sadr", "rome")


def finished(run: Path) -> bool:
    return (run / "summary.json").is_file() or any(line.get("collapsed") for line in read_curves(run))


def costs(run: Path) -> dict[str, Any]:
    """Edit seconds per group and the checkpoints' share of the stream's time, from its checkpoint lines
    (every line but the unedited model's)."""
    lines = read_curves(run)
    manifest = json.loads((run / "manifest.json").read_text())
    last = lines[-1]
    groups = int(last["groups"])
    measured = [line for line in lines if line["edits"] > 0]
    checkpoint = sum(float(line["seconds"]) for line in measured)
    edits = float(last["seconds_edits"])
    return {
        "batch_size": manifest["batch_size"],
        "groups": groups,
        "edits": int(last["edits"]),
        "seconds_edits": edits,
        "seconds_per_group": edits / groups if groups else None,
        "seconds_checkpoints": checkpoint,
        "seconds_per_checkpoint": checkpoint / len(measured) if measured else None,
        "seconds_general_per_checkpoint": (
            sum(float(line["seconds_general"]) for line in measured) / len(measured) if measured else None
        ),
        "checkpoint_share": checkpoint / (edits + checkpoint) if edits else None,
        "collapsed": last.get("collapsed"),
    }


def report(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "attnedit.cli.main", "report", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main(sets: list[str]) -> None:
    for name in sets:
        runs = [RUNS / name / r for r in ORDER if (RUNS / name / r).is_dir() and finished(RUNS / name / r)]
        if not runs:
            print(f"{name}: no finished run under {RUNS / name}")
            continue
        out = RESULTS / name
        out.mkdir(parents=True, exist_ok=True)
        scored = [r for r in runs if (r / "summary.json").is_file()]
        points = ",".join(str(100 * k) for k in range(1, 11))
        text = report([*map(str, runs), "--out", str(out), "--at", points])
        if any(r.name == "memit" for r in scored) and len(scored) > 1:
            text += "\n" + report([*map(str, scored), "--against", "memit"])
        for base in ("memit", "alphaedit"):
            pair = [RUNS / name / base, RUNS / name / f"{base}-sadr"]
            if all(p in scored for p in pair):
                text += "\n" + report([*map(str, pair), "--against", base])
        cost = {r.name: costs(r) for r in runs if read_curves(r)}
        (out / "costs.json").write_text(json.dumps(cost, indent=1) + "\n")
        (out / "tables.md").write_text(text)
        print(text)
        print(json.dumps(cost, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:] or ["cf", "zsre"])
