"""Pick an edit layer for a method on a model by measurement: ES/PS/NS/RS/DNS per candidate layer.

Uses cases away from the table's cases (default: records 900.. of the merged CounterFact file), so the
choice is not tuned on the evaluation set. Writes bench/results/sweep_<method>.json.

    python bench/sweep_layers.py --method rome --layers 2,5,8,11,14 --start 900 --count 12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.editing.registry import make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import summarize
from attnedit.runs.units import edit_each

WIKITEXT = "../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="rome")
    ap.add_argument(
        "--layers", default="2,5,8,11,14", help="candidates; for MEMIT-like methods 'a-b' windows joined by ;"
    )
    ap.add_argument("--data", default="../shared/data/sadr_merged_counterfact.json")
    ap.add_argument("--start", type=int, default=900)
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--stats-corpus", default=WIKITEXT)
    ap.add_argument("--stats-samples", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model()
    cases = load_cases(args.data).cases[args.start : args.start + args.count]
    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    sep = ";" if ";" in args.layers or "-" in args.layers else ","
    rows = []
    for layers in args.layers.split(sep):
        editor = make_editor(
            args.method,
            bundle,
            overrides={
                "layers": layers,
                "stats_corpus": args.stats_corpus,
                "stats_samples": str(args.stats_samples),
            },
        )
        records, seconds = edit_each(bundle, editor, evaluator, cases)
        summary = summarize(records)
        row = {"layers": layers, **{k: summary[k]["mean"] for k in ("ES", "PS", "NS", "RS", "DNS", "AvgS")}}
        row["median_seconds_per_edit"] = sorted(seconds)[len(seconds) // 2]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out) / f"sweep_{args.method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "method": args.method,
                "model": bundle.name,
                "cases": f"{args.data}[{args.start}:{args.start + args.count}]",
                "stats_corpus": args.stats_corpus,
                "stats_samples": args.stats_samples,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
