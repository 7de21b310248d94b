"""Seconds of one target optimisation (the shared heart of MEMIT, IntAttn-Edit, PMET and their +sadr
variants) on KnowEdit zsRE requests, for the cost estimates of the large KnowEdit tables.

    python bench/target_cost.py --method memit --requests 24 --matmul bfloat16 --threads 1
    # two at once, to see whether 1-thread processes slow each other on this machine:
    python bench/target_cost.py ... & python bench/target_cost.py ...; wait

Requests: zsRE held-out cases from ``--first`` (200: inside the batch-300/500 tables' range, so nothing
is tuned on them). Statistics are not computed (only the targets). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attnedit import __version__
from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.editing.base import method_templates
from attnedit.editing.registry import make_editor

ZSRE = "../shared/data/knowedit_zsre_test_all.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="memit", help="memit, intattn, pmet, or one of them +sadr")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--first", type=int, default=200)
    ap.add_argument("--matmul", default="bfloat16", help="the target_matmul parameter: model or bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model("smollm2-135m")
    cases = load_cases(ZSRE, skip_invalid=True).cases[args.first : args.first + args.requests]
    editor = make_editor(args.method, bundle, overrides={"target_matmul": args.matmul})
    templates = method_templates(bundle, editor.params)
    start = time.perf_counter()
    editor.optimise(bundle, [c.request for c in cases], templates, "en")
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "attnedit_version": __version__,
                "method": args.method,
                "requests": len(cases),
                "matmul": args.matmul,
                "threads": args.threads,
                "seconds": round(seconds, 1),
                "seconds_per_request": round(seconds / len(cases), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
