"""Cross-check ``attnedit eval`` against a plain, independent implementation of the metric definitions.

The plain side reads the merged CounterFact JSON itself, tokenises ``prompt + " " + target`` with the
Hugging Face tokenizer, runs ONE forward pass per (prompt, target) with full logits, and pools the
scores over prompts exactly as ``guides/methods.md`` defines them. It shares no code with attnedit
except loading the cached model directory.

    python bench/verify_metrics.py --run-dir runs/none-200 --limit 200 --out bench/results/verify_200.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

METRICS = ("ES", "PS", "NS", "RS", "DNS")
MAGNITUDE = {"ES": "EM", "PS": "PM", "NS": "NM", "RS": "RM", "DNS": "DNM"}


def plain_nll(model, tok, prompt: str, target: str) -> float:
    p = tok(prompt)["input_ids"]
    full = tok(prompt + " " + target)["input_ids"]
    assert full[: len(p)] == p, (prompt, target)
    t = full[len(p) :]
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return -sum(float(lp[len(p) - 1 + i, t[i]]) for i in range(len(t))) / len(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sadr_merged_counterfact.json")
    ap.add_argument("--model-dir", default=None, help="default: the attnedit cache of smollm2-135m")
    ap.add_argument("--run-dir", required=True, help="an 'attnedit eval' run over the same cases")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/verify_metrics.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_dir is None:
        from attnedit.core.models import DEFAULT_MODEL, EMBEDDED_MODELS, materialise_gguf

        args.model_dir = str(materialise_gguf(EMBEDDED_MODELS[DEFAULT_MODEL]))
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()

    records = json.loads(Path(args.data).read_text())[: args.limit]
    hits = {m: [] for m in METRICS}
    probs = {m: [] for m in METRICS}
    start = time.time()
    for rec in records:
        rw = rec["requested_rewrite"]
        new, true = rw["target_new"], rw["target_true"]
        edit_sentence = f"{rw['prompt']} {new}."
        jobs = [("ES", p, new, true) for p in rec["rewrite"]["prompts"]]
        jobs += [("PS", p, new, true) for p in rec.get("p-paraphrase", {}).get("prompts", [])]
        for key, metric in (("l-neighbor", "NS"), ("l-relation", "RS")):
            block = rec.get(key, {"prompts": [], "targets": []})
            jobs += [(metric, p, t, new) for p, t in zip(block["prompts"], block["targets"], strict=True)]
            if metric == "NS":
                jobs += [
                    ("DNS", f"{edit_sentence} {p}", t, new)
                    for p, t in zip(block["prompts"], block["targets"], strict=True)
                ]
        for metric, prompt, right, wrong in jobs:
            r, w = plain_nll(model, tok, prompt, right), plain_nll(model, tok, prompt, wrong)
            hits[metric].append(r < w)
            probs[metric].append(math.exp(-r))
    plain_seconds = time.time() - start

    summary = json.loads((Path(args.run_dir) / "summary.json").read_text())
    rows = {}
    for m in METRICS:
        plain_score = 100 * sum(hits[m]) / len(hits[m])
        plain_mag = 100 * sum(probs[m]) / len(probs[m])
        ours, ours_mag = summary[m], summary[MAGNITUDE[m]]
        rows[m] = {
            "plain": plain_score,
            "attnedit": ours["mean"],
            "n_plain": len(hits[m]),
            "n_attnedit": ours["n"],
        }
        rows[MAGNITUDE[m]] = {"plain": plain_mag, "attnedit": ours_mag["mean"]}
    worst = max(abs(v["plain"] - v["attnedit"]) for v in rows.values())
    result = {
        "cases": len(records),
        "rows": rows,
        "max_abs_diff_points": worst,
        "plain_seconds": plain_seconds,
        "threads": args.threads,
        "run_dir": args.run_dir,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| metric | plain | attnedit | n |")
    print("|---|---:|---:|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v['plain']:.2f} | {v['attnedit']:.2f} | {v.get('n_plain', '')} |")
    print(f"max |difference| = {worst:.3f} points, {len(records)} cases (plain scorer {plain_seconds:.0f} s)")


if __name__ == "__main__":
    main()
