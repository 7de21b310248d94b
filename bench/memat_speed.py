"""Seconds per batch of MEMIT and MEMAT, and the share of each MEMAT step, from a MEMAT run's saved edits.

Each saved MEMAT edit (``--save-edits``) records the seconds of its steps (``info.memat.seconds``: memit,
activations, classifiers, corrections), all measured in the same process on the same batch, so the MEMIT
step is the baseline the target (MEMAT at most 1.5x MEMIT) compares against. ``--memit RUN`` adds the
seconds of a separate MEMIT run's edits on the same cases (``seconds_edit`` summed per batch).

    python bench/memat_speed.py runs/memat-ee-memat [--memit runs/memat-ee-memit] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

from attnedit.core.deltas import WeightEdit
from attnedit.runs.rundir import RESULTS, read_results

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("memit", "activations", "classifiers", "corrections")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--memit", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/memat/speed.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    batches = []
    for path in sorted((args.run / "edits").glob("*.safetensors")):
        edit = WeightEdit.load(path)
        seconds = edit.info["memat"]["seconds"]
        total = sum(seconds[s] for s in STEPS)
        batches.append(
            {
                "edit": path.name,
                "requests": len(edit.requests),
                "seconds": {s: round(seconds[s], 2) for s in STEPS},
                "total": round(total, 2),
                "share": {s: round(seconds[s] / total, 3) for s in STEPS},
                "memat_over_memit": round(total / seconds["memit"], 3),
            }
        )
    if not batches:
        raise SystemExit(f"{args.run}: no saved edits (run MEMAT with --save-edits)")
    result: dict = {"run": str(args.run), "batches": batches}
    if args.memit is not None:
        per_batch: dict[int, float] = defaultdict(float)
        manifest = json.loads((args.memit / "manifest.json").read_text())
        size = manifest["batch_size"]
        order = {case_id: i for i, case_id in enumerate(manifest["case_ids"])}
        for record in read_results(args.memit / RESULTS):
            per_batch[order[record["case_id"]] // size] += record["seconds_edit"]
        seconds = [round(per_batch[k], 2) for k in sorted(per_batch)]
        result["memit_run"] = {"run": str(args.memit), "seconds_per_batch": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for b in batches:
        logging.info(
            "%s: %d requests, %.1f s (MEMIT %.1f s, x%.2f); classifiers %.1f s",
            b["edit"],
            b["requests"],
            b["total"],
            b["seconds"]["memit"],
            b["memat_over_memit"],
            b["seconds"]["classifiers"],
        )


if __name__ == "__main__":
    main()
