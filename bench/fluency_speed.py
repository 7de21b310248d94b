"""Fluency generation: one case at a time with its edit applied, against many edited cases in one
decoding batch (each row with its own weight deltas, ``Evaluator.add_fluency``).

    python bench/fluency_speed.py --cases 16 --threads 2

ROME edits the first ``--cases`` merged CounterFact cases on SmolLM2 (preset; statistics from 5,000
WikiText-2 lines); then (1) per case: apply the edit, generate 100 greedy tokens from its rewrite and
paraphrase prompts, revert; (2) all cases at once on the unedited model with per-row deltas. Reports
seconds per case for both, and how many generations are identical. Writes
bench/results/fluency_speed.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from attnedit import __version__
from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.editing.registry import make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sadr_merged_counterfact.json")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--stats-corpus", default="../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt"
    )
    ap.add_argument("--out", default="bench/results/fluency_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundle = load_model("smollm2-135m")
    cases = load_cases(args.data).cases[: args.cases]
    editor = make_editor("rome", bundle, overrides={"stats_corpus": args.stats_corpus, "stats_samples": 5000})
    evaluator = Evaluator(bundle, EvalConfig(fluency_prompts="rewrite"))
    edits = []
    for case in cases:
        applied = editor.apply(bundle, [case])
        edits.append(applied.edit)
        applied.revert()

    alone = [{} for _ in cases]
    t0 = time.perf_counter()
    for case, edit, record in zip(cases, edits, alone, strict=True):
        applied = edit.apply(bundle.model)
        try:
            evaluator.add_fluency([case], [record])
        finally:
            applied.revert()
    seconds_alone = time.perf_counter() - t0

    together = [{} for _ in cases]
    t0 = time.perf_counter()
    evaluator.add_fluency(cases, together, [edit.deltas for edit in edits])
    seconds_together = time.perf_counter() - t0

    pairs = [
        (a, b)
        for x, y in zip(alone, together, strict=True)
        for a, b in zip(x["generations"], y["generations"], strict=True)
    ]
    fl_alone = [v for r in alone for v in r["fluency"]]
    fl_together = [v for r in together for v in r["fluency"]]
    result = {
        "cases": len(cases),
        "generations": len(pairs),
        "identical_generations": sum(a == b for a, b in pairs),
        "mean_fl_alone": sum(fl_alone) / len(fl_alone),
        "mean_fl_together": sum(fl_together) / len(fl_together),
        "seconds_per_case_alone": seconds_alone / len(cases),
        "seconds_per_case_together": seconds_together / len(cases),
        "speedup": seconds_alone / seconds_together,
        "max_new_tokens": evaluator.config.max_new_tokens,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "attnedit": __version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
