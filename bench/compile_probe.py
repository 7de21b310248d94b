"""A probe, not a feature: ROME edits with the blocks above the edit layer under ``torch.compile``
(inductor, dynamic shapes), against the same edits in eager mode, in one process.

    python bench/compile_probe.py --cases 4 --threads 2     # idle machine -> bench/results/compile_probe.json

Blocks 6-29 of SmolLM2 (ROME edits layer 5's MLP; nothing above it is hooked without SADR) get a compiled
``forward``; dynamo's cache limits are raised so that every block compiles (each block index is its own
guard). Reports per-edit seconds eager and compiled, the first compiled edit (compilation included), and
the relative difference of the weight deltas.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch._dynamo

from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.editing.registry import make_editor

MERGED = "../shared/data/sadr_merged_counterfact.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/compile_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model()
    cases = load_cases(MERGED).cases
    editor = make_editor("rome", bundle)
    editor.apply(bundle, [cases[0]]).revert()

    def edits(selected):
        seconds, deltas = [], []
        for case in selected:
            start = time.perf_counter()
            applied = editor.apply(bundle, [case])
            seconds.append(round(time.perf_counter() - start, 2))
            deltas.append(next(iter(applied.edit.deltas.values())).clone())
            applied.revert()
        return seconds, deltas

    eager, reference = edits(cases[1 : args.cases + 1])
    torch._dynamo.config.cache_size_limit = 128
    torch._dynamo.config.accumulated_cache_size_limit = 1024
    first_layer = editor.params.layers[0] + 1
    for i in range(first_layer, bundle.adapter.n_layers):
        block = bundle.adapter.module(bundle.model, "layer", i)
        block.forward = torch.compile(block.forward, dynamic=True)
    first, _ = edits(cases[1:2])
    compiled, deltas = edits(cases[1 : args.cases + 1])
    out = {
        "command": f"python bench/compile_probe.py --cases {args.cases} --threads {args.threads}",
        "compiled_blocks": f"{first_layer}-{bundle.adapter.n_layers - 1}",
        "eager_seconds": eager,
        "first_compiled_edit_seconds": first[0],
        "compiled_seconds": compiled,
        "relative_delta_difference": [
            float((a - b).norm() / a.norm()) for a, b in zip(reference, deltas, strict=True)
        ],
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
