"""Sample the ``model`` statistics corpus of the embedded SmolLM2 once and ship it with the package.

ROME's SmolLM2 preset computes its covariance statistics from 1,000 texts sampled from the model
itself (``stats_corpus="model"``). Sampling them is most of a cold first edit (minutes on a 2-core
CPU), while the forward pass over them is seconds. This writes exactly what
``covariance.model_texts`` would sample (the same function, seeds and chunks) to
``src/attnedit/resources/sampled_texts/<fingerprint>-s<seed>-l<length>-n<count>.json.gz``, with the
model's full fingerprint and the texts' sha256; ``model_texts`` uses the file only when both match.

    python bench/ship_sampled_texts.py --threads 2      # after changing the embedded model or the spec

``tests/integration/test_smollm2_covariance_texts.py`` re-samples the first and last chunks and compares them
with the file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from pathlib import Path

import torch

from attnedit.core.models import load_model
from attnedit.editing import covariance
from attnedit.editing.base import stats_spec
from attnedit.editing.registry import make_editor
from attnedit.editing.templates import texts_digest

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    bundle = load_model()
    spec = stats_spec(make_editor("rome", bundle).params)
    if spec.corpus != "model":
        raise SystemExit(f"the ROME preset of {bundle.name} does not sample its statistics texts")
    start = time.perf_counter()
    texts = covariance._sample_texts(bundle, spec)
    seconds = time.perf_counter() - start
    entry = {
        "model": bundle.name,
        "fingerprint": bundle.fingerprint,
        "seed": spec.seed,
        "sample_length": spec.sample_length,
        "samples": spec.samples,
        "chunk": covariance.SAMPLING_CHUNK,
        "made_by": "python bench/ship_sampled_texts.py",
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "sha256": texts_digest(texts),
        "texts": texts,
    }
    shipped = covariance.shipped_texts_path(bundle, spec)
    out = ROOT / "src" / "attnedit" / "resources" / "sampled_texts" / shipped.name
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(entry, ensure_ascii=False, indent=0).encode("utf-8")
    out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    logging.info("%d texts sampled in %.1f s -> %s (%d bytes)", len(texts), seconds, out, out.stat().st_size)


if __name__ == "__main__":
    main()
