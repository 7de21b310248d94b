"""What one merged CounterFact case's evaluation runs through the model, and whether the scorer's batch
split matters: forward calls, real and padded tokens per case (a pre-hook on the base model), and the
seconds per case with ``length_batches``' per-call cost at several values (alternating per case, best
of 2).

    python bench/eval_tokens.py --cases 25 --call-costs 48,100,150,250 --threads 2   # idle machine

Writes bench/results/eval_tokens.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnedit.core import scoring
from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.evaluation.evaluator import EvalConfig, Evaluator

MERGED = "../shared/data/sadr_merged_counterfact.json"


def count(bundle, evaluator: Evaluator, cases) -> dict:
    n = {"calls": 0, "real_tokens": 0, "padded_tokens": 0}

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        n["calls"] += 1
        n["padded_tokens"] += ids.numel()
        n["real_tokens"] += int(mask[:, -ids.shape[1] :].sum())

    handle = bundle.model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for case in cases:
            evaluator.evaluate(case)
    finally:
        handle.remove()
    return {k: round(v / len(cases), 1) for k, v in n.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=25)
    ap.add_argument("--call-costs", default="48,100,150,250")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/eval_tokens.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model()
    cases = load_cases(MERGED).cases[: args.cases + 1]
    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    evaluator.evaluate(cases[0])  # warm-up
    default = scoring.length_batches.__defaults__
    costs = [int(c) for c in args.call_costs.split(",")]
    seconds: dict[int, list[float]] = {c: [] for c in costs}
    try:
        per_case = count(bundle, evaluator, cases[1:])
        for case in cases[1:]:
            for cost in costs:
                scoring.length_batches.__defaults__ = (cost,)
                times = []
                for _ in range(2):
                    start = time.perf_counter()
                    evaluator.evaluate(case)
                    times.append(time.perf_counter() - start)
                seconds[cost].append(min(times))
    finally:
        scoring.length_batches.__defaults__ = default
    out = {
        "command": f"python bench/eval_tokens.py --cases {args.cases} --call-costs {args.call_costs} "
        f"--threads {args.threads}",
        "cases": [c.case_id for c in cases[1:]],
        "per_case": per_case,
        "mean_seconds_per_case_by_call_cost": {c: round(sum(v) / len(v), 3) for c, v in seconds.items()},
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
