"""Median seconds per edit of finished runs (from ``seconds_edit`` in results.jsonl), and the ROME run's
metrics on the first 30 cases next to the official SADR/EasyEdit figures measured on the same cases.

    python bench/edit_speed.py runs/table-rome runs/table-memit runs/table-pmet runs/table-ft

Writes bench/results/editing.json. Timings are only meaningful from runs on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from attnedit.evaluation.metrics import summarize
from attnedit.runs.rundir import selected_records

# the official code on SmolLM2, layer 5, 20 steps, 2 threads, first 30 dev cases (issue 3)
OFFICIAL_ROME = {"seconds_per_edit": 35.0, "ES": 100.0, "PS": 97.0, "RS": 8.1, "DNS": 26.7}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="bench/results/editing.json")
    args = ap.parse_args()
    out: dict = {"official_rome_first30": OFFICIAL_ROME, "runs": {}}
    for run_dir in args.runs:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
        records = selected_records(run_dir)
        seconds = [r["seconds_edit"] for r in records]
        first30 = summarize(records[:30])
        row = {
            "method": manifest["method"],
            "cases": len(records),
            "threads": manifest["torch_threads"],
            "median_seconds_per_edit": statistics.median(seconds),
            "p90_seconds_per_edit": sorted(seconds)[int(0.9 * (len(seconds) - 1))],
            "first30": {k: first30[k]["mean"] for k in ("ES", "PS", "NS", "RS", "DNS")},
        }
        out["runs"][run_dir] = row
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
