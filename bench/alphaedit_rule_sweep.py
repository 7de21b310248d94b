"""The table of the AlphaEdit rule sweep (``bench/alphaedit_rule_sweep.sh``, dev cases only): per run the
scores of the 300 dev edits on the final model of its stream, perplexity, and the edit seconds.

    python bench/alphaedit_rule_sweep.py     # -> bench/results/alphaedit_rule_sweep.json, a table on stdout
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from attnedit.evaluation.metrics import harmonic_mean

ROOT = Path(__file__).resolve().parents[1]
RUNS = Path(os.environ.get("OUT", Path.home() / ".cache/attnedit/streams/rule_sweep"))
RESULT = ROOT / "bench" / "results" / "alphaedit_rule_sweep.json"
KEYS = ("ES", "PS", "NS", "GES", "GPS", "PPL")


def main() -> None:
    rows = []
    for run in sorted(p for p in RUNS.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((run / "summary.json").read_text())
        records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
        row = {"run": run.name, "cases": len(records)}
        for key in KEYS:
            entry = summary.get(key) or {}
            row[key] = entry.get("mean")
            row[f"{key}_ci95"] = entry.get("ci95")
        row["S"] = harmonic_mean([row["ES"], row["PS"], row["NS"]])
        row["seconds_edit_per_case"] = sum(r["seconds_edit"] for r in records) / len(records)
        rows.append(row)
    RESULT.write_text(json.dumps({"runs": str(RUNS), "rows": rows}, indent=1) + "\n")
    print("| run | cases | ES | PS | NS | S | GES | GPS | PPL | s/edit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            f"{r[k]:.1f} ± {r[k + '_ci95']:.1f}" if r[k + "_ci95"] else f"{r[k]:.1f}"
            for k in ("ES", "PS", "NS")
        ]
        print(
            f"| {r['run']} | {r['cases']} | {' | '.join(cells)} | {r['S']:.1f} | {r['GES']:.1f} "
            f"| {r['GPS']:.1f} | {r['PPL']:.2f} | {r['seconds_edit_per_case']:.2f} |"
        )


if __name__ == "__main__":
    main()
