"""Seconds per batch of MEMIT and IntAttn-Edit on SmolLM2 (same process, same batch), and the statistics pass.

1. Statistics: with an empty cache (a temporary ``ATTNEDIT_CACHE``), the MLP and W_o second moments of
   ``--stats-samples`` WikiText-2 lines computed in ONE corpus pass (``second_moments_of``), against the
   two computed one after the other (two passes).
2. Editing (statistics cached, excluded): MEMIT, then IntAttn-Edit at the preset's fixed alpha, then
   IntAttn-Edit with ``alpha=trace``, each on the same batch of ``--n`` KnowEdit cases, each edit reverted
   before the next. Each IntAttn edit also records its own steps (``info.intattn.seconds``).
Time only on an idle machine.

    python bench/intattn_speed.py [--data ../shared/data/knowedit_zsre_test_all.json] [--first 100] [--n 100]
        [--stats-samples 1000] [--threads 2]

-> bench/results/intattn/speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.editing.base import stats_spec
from attnedit.editing.covariance import second_moments_of
from attnedit.editing.registry import make_editor
from attnedit.runs.rundir import seed_everything

ROOT = Path(__file__).resolve().parents[1]
W = "../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt"
logger = logging.getLogger("intattn_speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/knowedit_zsre_test_all.json")
    ap.add_argument("--first", type=int, default=100)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--stats-samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/intattn/speed.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    seed_everything(0)
    bundle = load_model("smollm2-135m")
    cases = load_cases(args.data, skip_invalid=True).cases[args.first : args.first + args.n]
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": args.threads,
        "data": args.data,
        "first": args.first,
        "n": len(cases),
    }

    # 1. statistics, empty cache: one pass for both components against one pass each
    probe = make_editor(
        "intattn", bundle, overrides={"stats_corpus": W, "stats_samples": str(args.stats_samples)}
    )
    p = probe.params
    wanted = {"mlp_down": sorted(p.layers), "attn_o": sorted(p.attn_layers)}
    stats: dict[str, float] = {}
    previous = os.environ.get("ATTNEDIT_CACHE")
    for how in ("one pass", "two passes"):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["ATTNEDIT_CACHE"] = cache
            bundle.cache.pop("second_moments", None)
            t0 = time.perf_counter()
            if how == "one pass":
                second_moments_of(bundle, wanted, stats_spec(p), progress=False)
            else:
                for component, layers in wanted.items():
                    second_moments_of(bundle, {component: layers}, stats_spec(p), progress=False)
            stats[how] = round(time.perf_counter() - t0, 2)
    if previous is None:
        os.environ.pop("ATTNEDIT_CACHE", None)
    else:
        os.environ["ATTNEDIT_CACHE"] = previous
    bundle.cache.pop("second_moments", None)
    result["statistics"] = {"samples": args.stats_samples, "seconds": stats, "layers": wanted}
    logger.info("statistics: %s", stats)

    # 2. editing, statistics cached (5,000 lines, as the tables use), computed before timing
    overrides = {"stats_corpus": W, "stats_samples": "5000"}
    runs = [("memit", {}), ("intattn", {}), ("intattn-trace", {"alpha": "trace"})]
    editors = {
        label: make_editor(label.removesuffix("-trace"), bundle, overrides={**overrides, **extra})
        for label, extra in runs
    }
    spec = editors["intattn"].params
    second_moments_of(
        bundle, {"mlp_down": sorted(spec.layers), "attn_o": sorted(spec.attn_layers)}, stats_spec(spec)
    )
    edits: dict[str, dict] = {}
    for label, _ in runs:
        t0 = time.perf_counter()
        applied = editors[label].apply(bundle, cases)
        seconds = time.perf_counter() - t0
        applied.revert()
        entry = {"seconds": round(seconds, 2)}
        if "intattn" in applied.edit.info:
            info = applied.edit.info["intattn"]
            entry["steps"] = {k: round(v, 2) for k, v in info["seconds"].items()}
            entry["alpha"] = info["alpha"]
        edits[label] = entry
        logger.info("%s: %.1f s for %d edits", label, seconds, len(cases))
    for label in ("intattn", "intattn-trace"):
        edits[label]["over_memit"] = round(edits[label]["seconds"] / edits["memit"]["seconds"], 3)
    result["edits"] = edits
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
