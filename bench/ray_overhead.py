"""``--backend ray`` against the local loop (issue 19, docs/scaling.md "Measurements").

    OMP_NUM_THREADS=1 python bench/ray_overhead.py --part overhead --cases 200   # an idle machine
    OMP_NUM_THREADS=1 python bench/ray_overhead.py --part rome --cases 20
    OMP_NUM_THREADS=1 python bench/ray_overhead.py --part rome --cases 40 --param target_matmul=bfloat16
    (--model tiny: the tests' tiny Llama; --data: default the SADR merged CounterFact set in ../shared)

``overhead``: method ``none`` (no edit: a unit is the scoring of one case), no fluency; a local run with 1
thread against Ray with 2 workers x 1 thread. The overhead per unit is (Ray wall x workers - local wall) /
cases, which includes the actors' start-up (loading the model); ``ray.init`` is reported apart.
``rome``: ROME on SmolLM2, 2 workers x 1 thread against one local process with 2 threads (near parity
expected on 2 cores). Both check that the records agree (timings aside) and write
bench/results/ray_overhead.json (merged with what is there).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TIMINGS = ("seconds_eval", "seconds_edit", "seconds_scoring", "seconds_generation")


def _tiny_model(root: Path) -> str:
    """The tests' tiny Llama saved as a local directory (tests/helpers.py builds it offline)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import make_tiny, make_tokenizer

    tok = make_tokenizer(bos=False)
    bundle = make_tiny("llama", tok)
    path = root / "tiny-llama"
    bundle.model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _timed_run(config, ray_options, threads: int) -> tuple[float, list[dict]]:
    import torch

    from attnedit.runs.rundir import read_results
    from attnedit.runs.runner import run

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run(config, progress=False, ray=ray_options)
    wall = time.perf_counter() - t0
    records = read_results(Path(config.out) / "results.jsonl")
    return wall, records


def _differences(x, y, out: list) -> None:
    """Collect where two records differ (timings aside): a float's absolute difference, or None for
    anything else (a metric outcome, a text, a list length)."""
    if isinstance(x, dict) and isinstance(y, dict):
        for k in set(x) | set(y):
            if k not in TIMINGS:
                _differences(x.get(k), y.get(k), out)
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for u, v in zip(x, y, strict=True):
            _differences(u, v, out)
    elif isinstance(x, float) and isinstance(y, float):
        if x != y:
            out.append(abs(x - y))
    elif x != y:
        out.append(None)


def _compare(a: list[dict], b: list[dict]) -> dict:
    """Equal records, or how they differ: runs with other thread counts reduce in another order, so their
    floats may differ in the last digits while every outcome and text is the same."""
    left, right = ({r["case_id"]: r for r in x} for x in (a, b))
    if sorted(left) != sorted(right):
        return {"records_equal": False, "same_cases": False}
    out: list = []
    for case_id, record in left.items():
        _differences(record, right[case_id], out)
    floats = [d for d in out if d is not None]
    return {
        "records_equal": not out,
        "other_differences": len(out) - len(floats),  # outcomes, texts: must be 0
        "float_differences": len(floats),
        "max_float_difference": max(floats, default=0.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("overhead", "rome"), required=True)
    ap.add_argument("--model", default="smollm2-135m", help="'tiny' for the tests' tiny Llama")
    ap.add_argument("--data", default="../shared/data/sadr_merged_counterfact.json")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench/results/ray_overhead.json")
    ap.add_argument("--param", action="append", default=[], help="KEY=VALUE preset override (both runs)")
    ap.add_argument(
        "--recompare",
        help="a finished run's temporary root (ray-overhead-*): redo only the comparison of its records",
    )
    args = ap.parse_args()
    out = Path(args.out)
    params = dict(p.split("=", 1) for p in args.param)
    key = f"{args.part}-{args.model}-{args.cases}" + "".join(f"-{k}={v}" for k, v in sorted(params.items()))
    if args.recompare:
        from attnedit.runs.rundir import read_results

        runs = [read_results(Path(args.recompare) / name / "results.jsonl") for name in ("local", "ray")]
        previous = json.loads(out.read_text())
        previous[key] |= _compare(*runs)
        out.write_text(json.dumps(previous, indent=1) + "\n")
        print(json.dumps(previous[key], indent=1))
        return

    import ray

    from attnedit.evaluation.evaluator import EvalConfig
    from attnedit.runs.config import RunConfig
    from attnedit.runs.executors import RayOptions

    root = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    model = _tiny_model(root) if args.model == "tiny" else args.model
    method = "none" if args.part == "overhead" else "rome"
    fluency = args.part == "rome"

    def config(name: str) -> RunConfig:
        return RunConfig(
            data=args.data,
            out=str(root / name),
            model=model,
            method=method,
            limit=args.cases,
            eval=EvalConfig(fluency=fluency),
            params=params,
            generation_cases=max(1, args.cases // (2 * args.workers)) if fluency else 16,
        )

    local_threads = 1 if args.part == "overhead" else args.workers
    local_wall, local_records = _timed_run(config("local"), None, local_threads)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False)
    ray_start = time.perf_counter() - t0
    try:
        ray_wall, ray_records = _timed_run(config("ray"), RayOptions(workers=args.workers), 1)
    finally:
        ray.shutdown()
    result = {
        "model": args.model,
        "method": method,
        "cases": args.cases,
        "workers": args.workers,
        "local_threads": local_threads,
        "params": params,
        "local_seconds": round(local_wall, 2),
        "ray_init_seconds": round(ray_start, 2),
        "ray_seconds": round(ray_wall, 2),
        **_compare(local_records, ray_records),
    }
    if args.part == "overhead":
        # each worker is as fast as the local process: what Ray adds per unit, actor start-up included
        result["overhead_seconds_per_unit"] = round((ray_wall * args.workers - local_wall) / args.cases, 4)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    previous[key] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
