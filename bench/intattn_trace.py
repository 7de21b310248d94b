"""IntAttn-Edit on SmolLM2: which attention and MLP layers hold facts, causal tracing of the unedited model.

For each of the first N facts of ROME's known-facts file (dev facts: none of them is a KnowEdit case), the
causal trace that ``-p alpha=trace`` uses (``editing.intattn.traced_alpha``: logit measure, one layer
restored at a time, 10 noise samples) at every layer, for the MLP and the attention outputs at the
subject's last token. One line per fact in OUT/cases.jsonl, so an interrupted run continues.

The choice written to the result:
- MLP layers: the SmolLM2 MEMIT preset's (chosen by bench/sweep_layers.py; not re-chosen here);
- attention layers: the window of ``--attn-window`` consecutive layers, none above the last MLP layer
  (W_o above it cannot move the residual MEMIT's target is read from), with the largest summed mean
  attention effect;
- alpha (fixed, for the model): the attention share of the summed effects over those layers, the paper's
  formula.

    python bench/intattn_trace.py [--n 50] [--attn-window 3] [--out runs/intattn-trace] [--threads 2]

-> bench/results/intattn/trace.json, docs/figures/intattn_trace.png (mean effect per layer, MLP vs attention)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from attnedit.analysis.plots import save_figure
from attnedit.core.data import EditRequest, file_sha256
from attnedit.core.models import load_model
from attnedit.editing.methods.intattn import TRACE_MEASURE, traced_alpha
from attnedit.editing.registry import load_preset

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("intattn_trace")


def figure(mlp: np.ndarray, attn: np.ndarray, chosen: dict, path: Path, n: int) -> None:
    """Mean indirect effect per layer (logit), MLP vs attention, the chosen layers shaded."""
    layers = np.arange(len(mlp))
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot()
    for lay in chosen["mlp_layers"]:
        ax.axvspan(lay - 0.5, lay + 0.5, color="tab:green", alpha=0.12, lw=0)
    for lay in chosen["attn_layers"]:
        ax.axvspan(lay - 0.5, lay + 0.5, color="tab:purple", alpha=0.15, lw=0)
    ax.plot(layers, mlp, marker="o", ms=3, color="tab:green", label="MLP")
    ax.plot(layers, attn, marker="s", ms=3, color="tab:purple", label="attention")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("indirect effect (logit)")
    ax.set_title(
        f"SmolLM2-135M causal tracing at the subject's last token ({n} known facts);\n"
        f"shaded: MLP layers {chosen['mlp_layers']}, attention layers {chosen['attn_layers']}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/rome_known_1000.json")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--attn-window", type=int, default=3)
    ap.add_argument("--out", default="runs/intattn-trace")
    ap.add_argument("--result", default=str(ROOT / "bench/results/intattn/trace.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs/figures/intattn_trace.png"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    facts = json.loads(Path(args.data).read_text())[: args.n]
    bundle = load_model()
    n_layers = bundle.adapter.n_layers
    every = list(range(n_layers))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases_path = out / "cases.jsonl"
    done: dict[int, dict] = {}
    if cases_path.is_file():
        for line in cases_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["known_id"]] = rec
    with cases_path.open("a") as sink:
        for fact in tqdm(facts, desc="causal trace", unit="fact"):
            if fact["known_id"] in done:
                continue
            # the stored fact is traced (target_true); target_new is not used by the trace
            request = EditRequest(fact["prompt"], fact["subject"], fact["attribute"], fact["attribute"])
            traced = traced_alpha(bundle, [request], every, every).trace
            rec = {"known_id": fact["known_id"], "mlp": traced["mlp_effects"], "attn": traced["attn_effects"]}
            sink.write(json.dumps(rec) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            done[fact["known_id"]] = rec

    recs = [done[f["known_id"]] for f in facts]
    mlp = np.mean([r["mlp"] for r in recs], axis=0)
    attn = np.mean([r["attn"] for r in recs], axis=0)
    mlp_layers = sorted(load_preset("memit", bundle.name)["params"]["layers"])
    w = args.attn_window
    starts = range(0, mlp_layers[-1] - w + 2)
    best = max(starts, key=lambda s: attn[s : s + w].sum())
    attn_layers = list(range(best, best + w))
    attn_total = max(float(attn[attn_layers].sum()), 0.0)
    mlp_total = max(float(mlp[mlp_layers].sum()), 0.0)
    alpha = attn_total / (attn_total + mlp_total) if attn_total + mlp_total > 0 else 0.0
    chosen = {"mlp_layers": mlp_layers, "attn_layers": attn_layers, "alpha": round(alpha, 3)}
    result = {
        "data": args.data,
        "data_sha256": file_sha256(Path(args.data)),
        "facts": len(recs),
        "measure": TRACE_MEASURE,
        "at": "subject_last",
        "window": 1,
        "samples": 10,
        "seed": 0,
        "model": bundle.name,
        "mean_mlp_effect": mlp.round(5).tolist(),
        "mean_attn_effect": attn.round(5).tolist(),
        "rule": f"attention: the {w} consecutive layers <= the last MLP layer with the largest summed effect",
        "chosen": chosen,
        "attn_share_all_layers": float(max(attn.sum(), 0) / (max(attn.sum(), 0) + max(mlp.sum(), 0))),
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    figure(mlp, attn, chosen, Path(args.figure), len(recs))
    logger.info("chosen: %s", chosen)


if __name__ == "__main__":
    main()
