#!/usr/bin/env bash
# Quick start, main job: set up, then edit SmolLM2-135M with ROME and with ROME+SADR on the shipped
# sample set (the unedited model as the baseline row) and print the comparison table.
# Extra flags go to every `attnedit eval` (e.g. --no-fluency, --limit 16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
runs=()
for m in none rome rome+sadr; do
  out="runs/demo-${m/+/-}"
  attnedit eval sample --method "$m" --out "$out" --threads "${THREADS:-2}" "$@"
  runs+=("$out")
done
attnedit report "${runs[@]}" --magnitudes --out runs/demo-report
