"""SADR settings search on the validation slice, and the diagnostics behind it.

    python bench/sadr_grid.py --method rome --cases 100 --steps 20,40,80 --gamma 0,5e-3,1e-2,4e-2,8e-2
    python bench/sadr_grid.py --method rome --cases 30 --steps 80 --gamma 0.1,0.3,1 --heads all
    python bench/sadr_grid.py --method rome --steps 20 --gamma 0 --lr 0.1,0.5,2 --kl-factor 0.0625,1

``--lr`` and ``--kl-factor`` vary the editor's own learning rate and KL factor (default: the preset's),
the other axis of figure 7.

Every (steps, gamma, heads, layers) point is one resumable ``attnedit eval`` run of ``METHOD+sadr`` over
the first ``--cases`` dev cases (no generation: FL is measured on the test cases only), in
``runs/sadr-grid/``; ``--cases`` may narrow or extend an existing point (records are kept per case).
gamma 0 is the plain editor at those steps, with the SADR diagnostics recorded.
For each point the script reports ES, PS, NS, RS, DNS, the magnitudes, and from the optimisation's
loss parts: the mean NLL, the mean unweighted SADR loss, heads selected per prompt, the drift over all
heads, and the drift per layer. Writes ``bench/results/sadr_grid_<method>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from attnedit.core.models import load_model
from attnedit.evaluation.evaluator import EvalConfig
from attnedit.evaluation.metrics import summarize
from attnedit.runs.config import RunConfig
from attnedit.runs.rundir import selected_records
from attnedit.runs.runner import run

DATA = "../shared/data/sadr_merged_counterfact.json"
WIKITEXT = "../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt"
METRICS = ("ES", "PS", "NS", "RS", "DNS", "EM", "PM", "RM", "DNM")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def point_dir(
    root: Path, method: str, steps: int, gamma: float, heads: str, layers: str, lr: str = "", kl: str = ""
) -> Path:
    extra = (f"-L{layers}" if layers else "") + (f"-lr{lr}" if lr else "") + (f"-kl{kl}" if kl else "")
    return root / f"{method}-s{steps}-g{gamma:g}-{heads}{extra}"


def diagnostics(records: list[dict]) -> dict:
    parts = [r["edit"]["loss_parts"] for r in records if r.get("edit", {}).get("loss_parts")]
    if not parts:
        return {}
    out = {}
    for key in ("nll", "kl", "sadr.unweighted", "sadr.heads_selected", "sadr.kl_all_heads"):
        values = [p[key] for p in parts if key in p]
        if values:
            out[key] = float(np.mean(values))
    by_layer = [p["sadr.kl_by_layer"] for p in parts if "sadr.kl_by_layer" in p]
    if by_layer:
        out["kl_by_layer"] = np.mean(np.asarray(by_layer), axis=0).round(5).tolist()
        out["selected_by_layer"] = (
            np.mean(np.asarray([p["sadr.selected_by_layer"] for p in parts]), axis=0).round(3).tolist()
        )
    out["steps"] = float(np.mean([r["edit"]["steps"] + 1 for r in records]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="rome")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--steps", default="20,40,80")
    ap.add_argument("--gamma", default="0,5e-3,1e-2,4e-2,8e-2")
    ap.add_argument("--heads", default="selective", help="comma list: selective, increased, all")
    ap.add_argument("--layers", default="", help="comma list of SADR layer ranges (A-B); '' = every layer")
    ap.add_argument("--lr", default="", help="comma list of the editor's learning rates ('' = preset)")
    ap.add_argument("--kl-factor", default="", help="comma list of the editor's KL factors ('' = preset)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default="runs/sadr-grid")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model("smollm2-135m")
    root = Path(args.root)
    points = list(
        itertools.product(
            [int(s) for s in args.steps.split(",")],
            _floats(args.gamma),
            args.heads.split(","),
            args.layers.split(",") if args.layers else [""],
            args.lr.split(",") if args.lr else [""],
            args.kl_factor.split(",") if args.kl_factor else [""],
        )
    )
    rows = []
    for steps, gamma, heads, layers, lr, kl in points:
        out = point_dir(root, args.method, steps, gamma, heads, layers, lr, kl)
        params = {"stats_corpus": WIKITEXT, "stats_samples": "5000", "steps": str(steps)}
        # layers explicit ("all" too): the preset's sadr block may name a range
        sadr = {"gamma": gamma, "heads": heads, "layers": layers or "all"}
        if lr:
            params["lr"] = lr
        if kl:
            params["kl_factor"] = kl
        config = RunConfig(
            data=DATA,
            out=str(out),
            method=f"{args.method}+sadr",
            limit=args.cases,
            first=args.first,
            params=params,
            sadr=sadr,
            eval=EvalConfig(fluency=False),
        )
        run(config, bundle=bundle)
        records = selected_records(out)
        summary = summarize(records)
        row = {
            "steps": steps,
            "gamma": gamma,
            "heads": heads,
            "layers": layers or "all",
            "lr": float(lr) if lr else None,
            "kl_factor": float(kl) if kl else None,
            "run": str(out),
            "cases": len(records),
            **{m: summary[m]["mean"] for m in METRICS},
            "diagnostics": diagnostics(records),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "diagnostics"}))
    target = Path(args.out or f"bench/results/sadr_grid_{args.method}.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(target.read_text()) if target.is_file() else {"points": []}
    # one entry per (run directory, case count): a run narrowed to fewer cases keeps its larger view
    done = {(r["run"], r["cases"]) for r in rows}
    keep = [p for p in previous["points"] if (p["run"], p["cases"]) not in done]
    target.write_text(json.dumps({"data": DATA, "first": args.first, "points": keep + rows}, indent=1))
    print("\n| steps | gamma | heads | layers | ES | PS | NS | RS | DNS | NLL | SADR | heads sel. | drift |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d = {k: v for k, v in r["diagnostics"].items() if not isinstance(v, list)}
        nan = float("nan")
        print(
            f"| {r['steps']} | {r['gamma']:g} | {r['heads']} | {r['layers']} | {r['ES']:.1f} | {r['PS']:.1f} "
            f"| {r['NS']:.1f} | {r['RS']:.1f} | {r['DNS']:.1f} | {d.get('nll', nan):.3f} "
            f"| {d.get('sadr.unweighted', nan):.3f} | {d.get('sadr.heads_selected', nan):.1f} "
            f"| {d.get('sadr.kl_all_heads', nan):.3f} |"
        )


if __name__ == "__main__":
    main()
