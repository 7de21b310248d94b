"""MEMAT on SmolLM2: the K sweep and the head-accuracy heatmap, on one batch of dev cases (the tuning part).

One MEMIT edit of cases FIRST..FIRST+N-1 (the SmolLM2 MEMIT preset), one head ranking on it, then for each K
the corrections of the K best heads on top of that same MEMIT edit, each evaluated on all N cases (K=0 is
MEMIT alone). MEMIT and the ranking are computed once (the MEMIT edit is saved, so a rerun re-applies it);
each K's records are written as it finishes, so an interrupted sweep continues where it stopped.

    python bench/memat_k_sweep.py [--first 0] [--n 100] [--ks 0,1,2,4,8,16,32] [-p key=value ...]
        [--data FILE] [--language en] [--out runs/memat-ksweep] [--threads 2]

-> OUT/k{K}.json (records + summary), bench/results/memat/k_sweep.json (summaries, paired differences
   against K=0, the chosen heads, the timings), docs/figures/memat_head_accuracy.png (heatmap, top-16 marked)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from tqdm.auto import tqdm

from attnedit.analysis.plots import save_figure
from attnedit.core.data import file_sha256, load_cases
from attnedit.core.deltas import EditBuilder, WeightEdit
from attnedit.core.models import load_model
from attnedit.editing.base import edit_metadata
from attnedit.editing.registry import make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import paired_difference, summarize
from attnedit.runs.rundir import seed_everything

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("memat_k_sweep")
W = "../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt"


def _records(bundle, cases) -> list[dict]:
    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    return [evaluator.score(case) for case in tqdm(cases, desc="evaluate", unit="case", leave=False)]


def heatmap(accuracy: list[list[float]], top: list[list[int]], path: Path, title: str) -> None:
    """Validation accuracy of every head (layer x head), the chosen heads framed."""
    values = torch.tensor(accuracy)
    fig = Figure(figsize=(4.2, 7))
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.5, vmax=max(0.51, float(values.max())))
    for layer, head in top:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="validation accuracy")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/sadr_merged_counterfact.json")
    ap.add_argument("--language", default=None, help="the edit language of multilingual data")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--ks", default="0,1,2,4,8,16,32")
    ap.add_argument("-p", "--param", action="append", default=[], help="MEMAT parameter override key=value")
    ap.add_argument("--out", default="runs/memat-ksweep")
    ap.add_argument("--result", default=str(ROOT / "bench/results/memat/k_sweep.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs/figures/memat_head_accuracy.png"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    seed_everything(0)
    ks = [int(k) for k in args.ks.split(",")]
    overrides = {"stats_corpus": W, "stats_samples": "5000"}
    overrides.update(dict(item.split("=", 1) for item in args.param))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    kwargs = {"language": args.language} if args.language else {}
    dataset = load_cases(args.data, **kwargs)
    cases = dataset.cases[args.first : args.first + args.n]
    bundle = load_model("smollm2-135m")
    editor = make_editor("memat", bundle, overrides=overrides)
    settings = {
        "data": args.data,
        "data_sha256": file_sha256(args.data),
        "language": args.language,
        "first": args.first,
        "n": len(cases),
        "hyperparameters": editor.hyperparameters(),
        "seed": 0,
    }
    stamp = out / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        raise SystemExit(f"{out} holds a sweep with other settings; use another --out")
    stamp.write_text(json.dumps(settings, indent=1))

    seconds: dict[str, float] = {}
    saved = out / "memit.safetensors"
    t0 = time.perf_counter()
    if saved.is_file():
        memit = WeightEdit.load(saved).apply(bundle.model)
        seconds["memit"] = float(memit.edit.info.get("seconds", float("nan")))
    else:
        with EditBuilder(bundle.model) as builder:
            requests, info = editor.edit_mlp(builder, bundle, cases)
        memit = builder.finish(edit_metadata(editor, bundle, requests, info))
        seconds["memit"] = time.perf_counter() - t0
        memit.edit.info["seconds"] = seconds["memit"]
        memit.edit.save(saved)
    targets = editor.head_targets(cases)
    choice = editor.classify(bundle, targets, seconds)

    results: dict[str, dict] = {}
    for k in ks:
        path = out / f"k{k}.json"
        if path.is_file():
            results[str(k)] = json.loads(path.read_text())
            continue
        t0 = time.perf_counter()
        if k == 0:
            records, memat = _records(bundle, cases), {}
        else:
            step: dict[str, float] = {}
            with EditBuilder(bundle.model) as builder:
                memat = editor.correct(bundle, targets, choice, k, builder, step)
            heads_edit = builder.applied
            try:
                records = _records(bundle, cases)
            finally:
                heads_edit.revert()
            memat["seconds"] = step
        entry = {"k": k, "summary": summarize(records), "memat": memat, "records": records}
        entry["seconds_total"] = time.perf_counter() - t0
        path.write_text(json.dumps(entry))
        results[str(k)] = entry
        logger.info(
            "K=%d: ES %.1f EM %.1f PS %.1f PM %.1f NS %.1f",
            k,
            *(entry["summary"][m]["mean"] for m in ("ES", "EM", "PS", "PM", "NS")),
        )
    memit.revert()

    base = results.get("0")
    table = {}
    for k, entry in results.items():
        row = {"summary": entry["summary"], "heads": entry["memat"].get("heads", [])}
        if base is not None and k != "0":
            row["paired_vs_memit"] = paired_difference(base["records"], entry["records"])
        table[k] = row
    accuracy = choice.ranking.val_accuracy
    best = choice.ranking.order[0]
    result = {
        "settings": settings,
        "seconds": seconds,
        "classifier_records": choice.used,
        "records_succeeded": int(sum(choice.succeeded)),
        "classifier_train_records": choice.ranking.n_train,
        "classifier_val_records": choice.ranking.n_val,
        "best_head": list(best),
        "best_accuracy": float(accuracy[best]),
        "head_val_accuracy": accuracy.round(4).tolist(),
        "by_k": table,
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=1))
    top = [list(h) for h in choice.ranking.top(16)]
    title = f"MEMAT head classifiers, SmolLM2 (cases {args.first}-{args.first + len(cases) - 1})"
    heatmap(result["head_val_accuracy"], top, Path(args.figure), title)
    logger.info("best head %s: %.3f validation accuracy; wrote %s", best, accuracy[best], args.result)


if __name__ == "__main__":
    main()
