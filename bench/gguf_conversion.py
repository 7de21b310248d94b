"""The embedded model's first load: dequantising the GGUF into the cache, with and without the file
parsed once (``core.hf_compat.gguf_parsed_once``).

    python bench/gguf_conversion.py --reps 2 --threads 2   # idle -> bench/results/gguf_conversion.json

Each repetition converts into an empty temporary cache twice, plain transformers loading then the
parsed-once loading, and times ``models.materialise_gguf`` (the conversion, the safetensors and tokenizer
written). Both write the same files (``tests/integration/test_smollm2_models.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attnedit import __version__
from attnedit.core import models


def convert(way: str) -> float:
    """Seconds to convert into an empty cache, ``way`` "plain" or "once"."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ATTNEDIT_CACHE"] = cache
        parse = models.gguf_parsed_once
        if way == "plain":
            models.gguf_parsed_once = contextlib.nullcontext
        try:
            start = time.perf_counter()
            models.materialise_gguf(models.EMBEDDED_MODELS[models.DEFAULT_MODEL])
            return time.perf_counter() - start
        finally:
            models.gguf_parsed_once = parse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/gguf_conversion.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seconds: dict[str, list[float]] = {"plain": [], "once": []}
    for _ in range(args.reps):
        for way in seconds:
            seconds[way].append(round(convert(way), 2))
            print(way, seconds[way][-1], flush=True)
    medians = {way: round(statistics.median(v), 2) for way, v in seconds.items()}
    out = {
        "attnedit_version": __version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "seconds": seconds,
        "median": medians,
        "speedup": round(medians["plain"] / medians["once"], 2),
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
