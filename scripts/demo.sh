#!/usr/bin/env bash
# Quick start, main job: set up, then edit SmolLM2-135M with ROME and with ROME+SADR on the shipped
# sample set, the unedited model as the baseline row, and print the comparison table.
# By default the first 16 of the 48 sample cases (a few minutes on a 2-core CPU), without corpus
# perplexity (not in the table); extra flags go to every `attnedit eval` and win over the defaults
# (e.g. --limit 48 for all cases, --no-fluency, --ppl-corpus sample).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
runs=()
for m in none rome rome+sadr; do
  out="runs/demo/${m/+/-}"
  attnedit eval sample --method "$m" --limit 16 --ppl-corpus none --out "$out" --threads "${THREADS:-2}" "$@"
  runs+=("$out")
done
attnedit report "${runs[@]}" --out runs/demo/report
