"""Compare two sets of run directories case by case: every number of every record except timings.

    python bench/compare_runs.py runs/before runs/after [--json bench/results/same_results.json]

Each argument holds one run directory per method (``bench/same_results.sh`` writes them). Per method it
reports the cases compared, the largest absolute difference of any per-prompt NLL (and of any other
number in the records), and the keys that differ in shape. Exit status 1 when a record is missing, a
structure differs, or a difference exceeds ``--tolerance`` (default 1e-6).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

TIMING = ("seconds",)  # keys starting with these are wall-clock timings, not results


def _numbers(value: object, path: str, out: dict[str, float | str]) -> None:
    """Flatten a record into ``path -> number`` (strings kept as they are; timings left out)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not str(key).startswith(TIMING):
                _numbers(item, f"{path}.{key}", out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _numbers(item, f"{path}[{i}]", out)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        out[path] = str(value)
    elif isinstance(value, int | float):
        out[path] = float(value)


def _records(run: Path) -> dict[str, dict]:
    """The records of a run directory by case id (none when it has no results file yet)."""
    if not (run / "results.jsonl").is_file():
        return {}
    lines = (run / "results.jsonl").read_text().splitlines()
    return {r["case_id"]: r for r in map(json.loads, filter(None, lines))}


def compare(before: Path, after: Path) -> dict:
    old, new = _records(before), _records(after)
    report: dict = {"cases": len(old), "missing": sorted(set(old) ^ set(new)), "structure": []}
    worst = {"nll": 0.0, "other": 0.0}
    for case_id in sorted(set(old) & set(new)):
        a, b = {}, {}
        _numbers(old[case_id], "", a)
        _numbers(new[case_id], "", b)
        if a.keys() != b.keys():
            report["structure"].append(f"case {case_id}: {sorted(a.keys() ^ b.keys())[:5]}")
            continue
        for key, x in a.items():
            y = b[key]
            if isinstance(x, str) or isinstance(y, str):
                if x != y:
                    report["structure"].append(f"case {case_id} {key}: {x!r} != {y!r}")
                continue
            diff = 0.0 if (math.isnan(x) and math.isnan(y)) else abs(x - y)
            kind = "nll" if "_nll" in key else "other"
            worst[kind] = max(worst[kind], diff)
    report["max_abs_diff_nll"] = worst["nll"]
    report["max_abs_diff_other"] = worst["other"]
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--json", type=Path, help="write the per-method report here")
    args = parser.parse_args()
    reports, ok = {}, True
    for run in sorted(p for p in args.before.iterdir() if (p / "results.jsonl").is_file()):
        report = compare(run, args.after / run.name)
        reports[run.name] = report
        bad = report["missing"] or report["structure"]
        bad = bad or max(report["max_abs_diff_nll"], report["max_abs_diff_other"]) > args.tolerance
        ok = ok and not bad
        print(
            f"{run.name:10s} cases {report['cases']:3d}  max |d NLL| {report['max_abs_diff_nll']:.3g}  "
            f"max |d other| {report['max_abs_diff_other']:.3g}  missing {len(report['missing'])}  "
            f"structure {len(report['structure'])}{'' if not bad else '  DIFFERS'}"
        )
        for line in report["structure"][:5]:
            print("   ", line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
