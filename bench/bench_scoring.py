"""Throughput of the evaluation suite (no generation) against a one-forward-per-pair scorer.

    python bench/bench_scoring.py --cases 50 --threads 2 --out bench/results/scoring.json

Measures, on the same cases and the same model, in one process:
- attnedit: ``Evaluator.evaluate`` per case (all comparison metrics + KnowEdit probes, PPL cached
  while weights are unchanged, as in ``attnedit eval --no-fluency``);
- naive: the same (prompt, target) pairs scored by ``score_targets_reference`` (one full forward
  with full-vocabulary logits per pair), as a straightforward implementation would;
- the model's raw forward speed (tokens/s of a plain padded batch forward with logits).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from attnedit import __version__
from attnedit.core.data import load_cases, load_texts
from attnedit.core.models import load_model
from attnedit.core.scoring import score_targets_reference
from attnedit.core.tokens import encode_prompt, encode_target
from attnedit.evaluation.evaluator import EvalConfig, Evaluator
from attnedit.evaluation.metrics import comparisons


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sadr_merged_counterfact.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-corpus", default="../shared/data/sadr_ppl_corpus50.json")
    ap.add_argument("--out", default="bench/results/scoring.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    cases = load_cases(args.data).cases[: args.cases]
    tok = bundle.tokenizer

    pairs_per_case = []
    for case in cases:
        comps = comparisons(case)
        pairs_per_case.append([(c.prompt, c.right) for c in comps] + [(c.prompt, c.wrong) for c in comps])
    n_pairs = sum(map(len, pairs_per_case))
    target_tokens = sum(len(encode_target(tok, p, t)) for ps in pairs_per_case for p, t in ps)
    naive_tokens = sum(
        len(encode_prompt(tok, p)) + len(encode_target(tok, p, t)) for ps in pairs_per_case for p, t in ps
    )

    evaluator = Evaluator(bundle, EvalConfig(fluency=False, ppl_texts=load_texts(args.ppl_corpus)))
    evaluator.evaluate(cases[0])  # warm-up (and the one-time PPL of the unedited model)
    start = time.perf_counter()
    for case in cases:
        evaluator.evaluate(case)
    fast_s = time.perf_counter() - start

    score_targets_reference(bundle.model, tok, pairs_per_case[0][:4])  # warm-up
    start = time.perf_counter()
    for pairs in pairs_per_case:
        score_targets_reference(bundle.model, tok, pairs)
    naive_s = time.perf_counter() - start

    # raw forward speed: padded batch of 16 x 32 tokens, full logits
    ids = torch.randint(100, 1000, (16, 32))
    with torch.inference_mode():
        bundle.model(ids)
        start = time.perf_counter()
        reps = 5
        for _ in range(reps):
            bundle.model(ids)
        raw_tps = reps * ids.numel() / (time.perf_counter() - start)

    result = {
        "model": args.model,
        "data": args.data,
        "cases": len(cases),
        "pairs": n_pairs,
        "target_tokens": target_tokens,
        "naive_tokens_processed": naive_tokens,
        "attnedit_seconds": fast_s,
        "naive_seconds": naive_s,
        "attnedit_cases_per_s": len(cases) / fast_s,
        "naive_cases_per_s": len(cases) / naive_s,
        "speedup": naive_s / fast_s,
        "attnedit_naive_equiv_tokens_per_s": naive_tokens / fast_s,
        "naive_tokens_per_s": naive_tokens / naive_s,
        "raw_forward_tokens_per_s": raw_tps,
        "threads": args.threads,
        "torch": torch.__version__,
        "attnedit": __version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
