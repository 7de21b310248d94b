#!/usr/bin/env bash
# Evaluate 20 merged CounterFact cases with each method (no fluency) into OUT/<method>, to compare two
# versions of the code per prompt (bench/compare_runs.py). A refactor must not move any number.
# Single mode: none, ROME, MEMIT, PMET, FT, ROME+SADR; batch mode (2 batches of 10): MEMIT, IntAttn-Edit,
# MEMAT, MEMIT+SADR; sequential mode: 6 ROME edits.
#   PYTHONPATH=/path/to/old/src bash bench/same_results.sh runs/before
#   bash bench/same_results.sh runs/after && python bench/compare_runs.py runs/before runs/after
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: same_results.sh OUT}
data=${DATA:-../shared/data/sadr_merged_counterfact.json}
run() { python -m attnedit eval "$data" --no-fluency --threads "${THREADS:-1}" "$@"; }
for m in none rome memit pmet ft rome+sadr; do
  run --method "$m" --limit "${LIMIT:-20}" --out "$out/${m/+/-}"
done
for m in memit intattn memat memit+sadr; do
  run --method "$m" --mode batch --batch-size 10 --limit "${LIMIT:-20}" --out "$out/batch-${m/+/-}"
done
run --method rome --mode sequential --limit 6 --out "$out/seq-rome"
