"""Seconds per edit of every method at its SmolLM2 preset, with the metrics on the same cases, and
the covariance time for one layer.

Statistics are computed (or loaded from the cache) before timing: the per-edit time excludes them,
as in the issue's target. Run on an idle machine:

    python bench/bench_editing.py --methods rome,memit,pmet,ft --cases 30 --threads 2

Writes bench/results/editing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.editing.covariance import StatsSpec, _accumulate, corpus_texts, second_moments
from attnedit.editing.registry import make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import summarize
from attnedit.runs.units import edit_each

WIKITEXT = "../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="rome,memit,pmet,ft")
    ap.add_argument("--data", default="../shared/data/sadr_merged_counterfact.json")
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--stats-corpus", default=WIKITEXT)
    ap.add_argument("--stats-samples", type=int, default=5000)
    ap.add_argument("--covariance-layer", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/editing.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model()
    cases = load_cases(args.data).cases[: args.cases]
    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    spec = StatsSpec(corpus=args.stats_corpus, samples=args.stats_samples)
    result: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
        "versions": {"torch": torch.__version__},
        "data": f"{args.data}[:{args.cases}]",
        "stats": spec.describe(),
        "methods": {},
    }

    # covariance of one layer from scratch (no cache), texts already read
    texts = corpus_texts(bundle, spec, progress=False)
    with tempfile.TemporaryDirectory():
        t0 = time.perf_counter()
        _accumulate(bundle, {"mlp_down": [args.covariance_layer]}, texts, spec, progress=False)
        result["covariance"] = {
            "layer": args.covariance_layer,
            "texts": len(texts),
            "seconds": time.perf_counter() - t0,
        }
    print(json.dumps(result["covariance"]), flush=True)

    overrides = {"stats_corpus": args.stats_corpus, "stats_samples": str(args.stats_samples)}
    for method in [m for m in args.methods.split(",") if m]:
        editor = make_editor(method, bundle, overrides={} if method == "ft" else overrides)
        if method != "ft":
            second_moments(bundle, "mlp_down", editor.params.layers, spec, progress=False)  # untimed
        records, seconds = edit_each(bundle, editor, evaluator, cases)
        summary = summarize(records)
        row = {
            "hyperparameters": editor.hyperparameters(),
            "median_seconds_per_edit": statistics.median(seconds),
            "p90_seconds_per_edit": sorted(seconds)[int(0.9 * (len(seconds) - 1))],
            "seconds": seconds,
            **{k: summary[k]["mean"] for k in ("ES", "PS", "NS", "RS", "DNS", "AvgS") if k in summary},
        }
        result["methods"][method] = row
        print(
            method,
            json.dumps({k: v for k, v in row.items() if k not in ("seconds", "hyperparameters")}),
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
