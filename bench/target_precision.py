"""Seconds of the target optimisation with its matrix products in float32 (the default) and in bfloat16
(``-p target_matmul=bfloat16``), on the same cases in the same process, alternating, best of R.

    python bench/target_precision.py --rome-cases 12 --memit-requests 36 --threads 2   # idle machine

ROME: whole edits (statistics cached before timing) of merged CounterFact cases 1..N, each setting
timed R times per case, the best kept (this VM's speed drifts between runs). MEMIT: one group of
requests (cases 1..M; the SmolLM2 preset optimises up to 42 together), ``optimise_targets`` alone, and
how far the bfloat16 targets are from the float32 ones. Writes bench/results/target_precision.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from attnedit import __version__
from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.core.sites import Site
from attnedit.editing.base import method_templates, target_settings
from attnedit.editing.optimise import optimise_targets
from attnedit.editing.registry import make_editor

MERGED = "../shared/data/sadr_merged_counterfact.json"
WIKITEXT = "../shared/data/wikitext2_test.txt"
SETTINGS = ("model", "bfloat16")


def rome(bundle, cases, reps: int) -> dict:
    editors = {mm: make_editor("rome", bundle, overrides={"target_matmul": mm}) for mm in SETTINGS}
    for editor in editors.values():  # statistics and templates cached, kernels warm
        editor.apply(bundle, [cases[0]]).revert()
    best: dict[str, list[float]] = {mm: [] for mm in SETTINGS}
    for case in cases[1:]:
        for mm, editor in editors.items():
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                applied = editor.apply(bundle, [case])
                times.append(time.perf_counter() - start)
                applied.revert()
            best[mm].append(min(times))
        print(case.case_id, {mm: round(v[-1], 2) for mm, v in best.items()}, flush=True)
    medians = {mm: statistics.median(v) for mm, v in best.items()}
    return {
        "cases": [c.case_id for c in cases[1:]],
        "seconds_per_edit": {mm: [round(x, 3) for x in v] for mm, v in best.items()},
        "median": {mm: round(m, 3) for mm, m in medians.items()},
        "speedup_of_medians": round(medians["model"] / medians["bfloat16"], 3),
    }


def memit(bundle, cases, reps: int) -> dict:
    editor = make_editor("memit", bundle, overrides={"stats_corpus": WIKITEXT, "stats_samples": 50})
    templates = method_templates(bundle, editor.params)
    site = Site("layer", editor.params.layers[-1])
    requests = [c.request for c in cases]
    out: dict = {"requests": len(requests), "seconds": {}}
    targets = {}
    for mm in SETTINGS:
        editor.params.target_matmul = mm
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            result = optimise_targets(bundle, requests, templates, [site], target_settings(editor.params))
            times.append(time.perf_counter() - start)
        out["seconds"][mm] = round(min(times), 2)
        targets[mm] = result.target(site)
        print("memit", mm, out["seconds"][mm], flush=True)
    a, b = targets["model"], targets["bfloat16"]
    out["speedup"] = round(out["seconds"]["model"] / out["seconds"]["bfloat16"], 3)
    out["relative_target_difference"] = round(float((a - b).norm() / a.norm()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rome-cases", type=int, default=12)
    ap.add_argument("--memit-requests", type=int, default=36)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/target_precision.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model()
    cases = load_cases(MERGED).cases
    out = {
        "command": "python bench/target_precision.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": f"{platform.machine()}, {args.threads} threads",
        "versions": {"attnedit": __version__, "torch": torch.__version__},
        "rome": rome(bundle, cases[: args.rome_cases + 1], args.reps),
        "memit_group": memit(bundle, cases[1 : args.memit_requests + 1], 1),
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"rome": out["rome"]["median"], "memit_group": out["memit_group"]}))


if __name__ == "__main__":
    main()
