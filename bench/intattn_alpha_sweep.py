"""IntAttn-Edit on SmolLM2: sensitivity to alpha (the paper's figure), on one batch of dev cases.

One target optimisation and the two families' full updates (MLP down-projections and W_o, each from the
unedited model) are computed once for cases FIRST..FIRST+N-1 and saved; each alpha then applies
``(1 - alpha) D_mlp + alpha D_attn`` (``editing.intattn.mix``, exactly what ``intattn`` applies) and
scores the N cases (KnowEdit metrics as EasyEdit computes them, against the unedited model's answers for
locality). alpha = 0 is MEMIT. Each alpha's records are written as it finishes; a rerun continues.

    python bench/intattn_alpha_sweep.py --data ../shared/data/knowedit_zsre_test_all.json [--first 0]
        [--n 100] [--alphas 0,0.1,...,1] [-p key=value ...] [--out runs/intattn-alpha-zsre] [--threads 2]

-> OUT/alpha{A}.json (records + summary), bench/results/intattn/alpha_sweep_NAME.json,
   docs/figures/intattn_alpha_NAME.png (NAME: --name, default the data file's stem)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from attnedit.analysis.plots import save_figure
from attnedit.core.data import file_sha256, load_cases
from attnedit.core.deltas import EditBuilder
from attnedit.core.models import load_model
from attnedit.editing.methods.intattn import mix
from attnedit.editing.registry import make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import summarize
from attnedit.runs.rundir import seed_everything

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("intattn_alpha_sweep")
W = "../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt"
SHOWN = ("KE_EDIT", "KE_GEN", "KE_PORT", "KE_LOC")


def figure(table: dict[str, dict], path: Path, title: str) -> None:
    """Each KnowEdit metric against alpha."""
    alphas = sorted(table, key=float)
    fig = Figure(figsize=(5.6, 3.2))
    ax = fig.add_subplot()
    for name in SHOWN:
        values = [table[a].get(name, {}).get("mean") for a in alphas]
        if any(v is not None for v in values):
            ax.plot([float(a) for a in alphas], values, marker="o", ms=3, label=name)
    ax.set_xlabel("alpha (share of the W_o updates)")
    ax.set_ylabel("percent")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/knowedit_zsre_test_all.json")
    ap.add_argument("--name", default=None)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    ap.add_argument("-p", "--param", action="append", default=[], help="intattn parameter override key=value")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    seed_everything(0)
    name = args.name or Path(args.data).stem
    out = Path(args.out or f"runs/intattn-alpha-{name}")
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"stats_corpus": W, "stats_samples": "5000"}
    overrides.update(dict(item.split("=", 1) for item in args.param))

    # records that cannot be edited (e.g. target_new equal to the true answer) are left out, as
    # ``attnedit eval --skip-invalid`` does; the settings list them
    dataset = load_cases(args.data, skip_invalid=True)
    cases = dataset.cases[args.first : args.first + args.n]
    bundle = load_model("smollm2-135m")
    editor = make_editor("intattn", bundle, overrides=overrides)
    hyper = editor.hyperparameters()
    hyper.pop("alpha", None)  # every alpha is applied; the one in the preset is not used
    settings = {
        "data": args.data,
        "data_sha256": file_sha256(args.data),
        "first": args.first,
        "n": len(cases),
        "case_ids": [case.case_id for case in cases],
        "skipped_in_file": dataset.skipped,
        "hyperparameters": hyper,
        "seed": 0,
    }
    stamp = out / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        raise SystemExit(f"{out} holds a sweep with other settings; use another --out")
    stamp.write_text(json.dumps(settings, indent=1))

    evaluator = Evaluator(bundle, EvalConfig(fluency=False))
    ref_path = out / "references.json"
    if ref_path.is_file():
        references = json.loads(ref_path.read_text())
    else:
        references = [evaluator.reference(case) for case in tqdm(cases, desc="unedited answers", leave=False)]
        ref_path.write_text(json.dumps(references))

    saved = out / "updates.safetensors"
    meta_path = out / "updates.json"
    if saved.is_file() and meta_path.is_file():
        flat = load_file(str(saved))
        updates: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            component, weight = key.split("::", 1)
            updates.setdefault(component, {})[weight] = tensor
        meta = json.loads(meta_path.read_text())
    else:
        t0 = time.perf_counter()
        found = editor.family_updates(bundle, cases, both=True)
        updates = found.updates
        flat = {f"{c}::{w}": d.contiguous() for c, family in updates.items() for w, d in family.items()}
        save_file(flat, str(saved))
        meta = {"seconds": {**found.seconds, "total": time.perf_counter() - t0}, "target": found.info}
        meta_path.write_text(json.dumps(meta, indent=1))

    results: dict[str, dict] = {}
    for alpha in [float(a) for a in args.alphas.split(",")]:
        path = out / f"alpha{alpha:g}.json"
        if path.is_file():
            results[f"{alpha:g}"] = json.loads(path.read_text())
            continue
        with EditBuilder(bundle.model) as builder:
            mix(builder, updates, alpha)
        edit = builder.applied
        try:
            records = [
                evaluator.score(case, ref)
                for case, ref in tqdm(zip(cases, references, strict=True), total=len(cases), leave=False)
            ]
        finally:
            edit.revert()
        entry = {"alpha": alpha, "summary": summarize(records), "records": records}
        path.write_text(json.dumps(entry))
        results[f"{alpha:g}"] = entry
        logger.info(
            "alpha=%g: %s",
            alpha,
            {m: round(entry["summary"][m]["mean"], 1) for m in SHOWN if m in entry["summary"]},
        )

    table = {a: {m: e["summary"][m] for m in e["summary"] if m.startswith("KE_")} for a, e in results.items()}
    result = {"settings": settings, "updates": meta, "by_alpha": table}
    target = ROOT / f"bench/results/intattn/alpha_sweep_{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    title = f"IntAttn-Edit on SmolLM2, {name} cases {args.first}-{args.first + len(cases) - 1} (one batch)"
    figure(table, ROOT / f"docs/figures/intattn_alpha_{name}.png", title)
    logger.info("wrote %s", target)


if __name__ == "__main__":
    main()
