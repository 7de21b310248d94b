"""How many model-sampled texts ROME's statistics need: the editing scores against the sample count.

    python bench/stats_size_curve.py --cases 40 --threads 2   # -> bench/results/stats_size.json + figure

SmolLM2's ROME preset estimates the key second moments C (MLP down-projection input, layer 5) from
``stats_samples`` texts sampled from the model (1,000; shipped with the package). Only the final
rank-one update depends on C, so each case's k* and v* are computed once (``Rome.target``) and the
update is made with C from 250, 500, 1,000 and 5,000 texts in turn (``Rome.update``), each scored
without fluency and reverted. The texts of each count are what ``stats_samples=N`` samples (cached).
Cases: merged CounterFact dev cases 0..N-1 (the validation slice; nothing is chosen on them here but
the sample count). Per count: ES, PS, NS, RS, DNS with 95% intervals, and the paired difference from
5,000 texts; plus the relative Frobenius distance of each C from the 5,000-text one.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from tqdm.auto import tqdm

from attnedit import __version__
from attnedit.analysis.plots import save_figure
from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.editing.base import stats_spec
from attnedit.editing.covariance import second_moments
from attnedit.editing.registry import make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import PAIRED_SCORES, paired_difference, summarize

MERGED = "../shared/data/sadr_merged_counterfact.json"


def figure(table: dict, path: Path) -> None:
    counts = sorted(table, key=int)
    fig = Figure(figsize=(5.6, 3.2))
    ax = fig.add_subplot()
    for name in PAIRED_SCORES:
        means = [table[c]["summary"][name]["mean"] for c in counts]
        ax.plot([int(c) for c in counts], means, marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([int(c) for c in counts], [str(c) for c in counts])
    ax.set_xlabel("texts sampled from the model for C (log scale)")
    ax.set_ylabel("percent")
    ax.set_title("ROME on SmolLM2: scores against the statistics' sample count", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--counts", default="250,500,1000,5000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/stats_size.json")
    ap.add_argument("--figure", default="docs/figures/stats_size_curve.png")
    ap.add_argument("--replot", action="store_true", help="only redraw the figure from --out")
    args = ap.parse_args()
    if args.replot:
        figure(json.loads(Path(args.out).read_text())["table"], Path(args.figure))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    bundle = load_model()
    editor = make_editor("rome", bundle)
    spec = stats_spec(editor.params)
    counts = [int(c) for c in args.counts.split(",")]
    layer = editor.params.layers[0]
    covs = {}
    for n in counts:
        start = time.perf_counter()
        covs[n] = second_moments(bundle, "mlp_down", [layer], replace(spec, samples=n))[layer]
        logging.warning(
            "C from %d texts: %.1f s (cached texts and statistics are reused)", n, time.perf_counter() - start
        )
    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    records: dict[int, list] = {n: [] for n in counts}
    cases = load_cases(MERGED).cases[: args.cases]
    for case in tqdm(cases, desc="cases", unit="case"):
        target = editor.target(bundle, case)
        for n in counts:
            with editor.update(bundle, target, covs[n]):
                records[n].append(evaluator.score(case))
    largest = max(counts)
    table = {}
    for n in counts:
        paired = paired_difference(records[largest], records[n]) if n != largest else {}
        summary = summarize(records[n])
        table[str(n)] = {
            "summary": {k: summary[k] for k in PAIRED_SCORES},
            f"paired_vs_{largest}": {
                k: v.__dict__ if hasattr(v, "__dict__") else v for k, v in paired.items()
            },
            f"relative_distance_of_C_from_{largest}": float(
                (covs[n] - covs[largest]).norm() / covs[largest].norm()
            ),
        }
    out = {
        "command": f"python bench/stats_size_curve.py --cases {args.cases} --threads {args.threads}",
        "cases": f"{MERGED}[0:{args.cases}] (dev)",
        "stats": {**spec.describe(), "samples": counts},
        "versions": {"torch": torch.__version__, "attnedit": __version__},
        "table": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    figure(table, Path(args.figure))


if __name__ == "__main__":
    main()
