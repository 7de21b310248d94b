#!/usr/bin/env bash
# Evaluate 20 merged CounterFact cases with each method (no fluency) into OUT/<method>, to compare two
# versions of the code per prompt (bench/compare_runs.py). A refactor must not move any number.
#   PYTHONPATH=/path/to/old/src bash bench/same_results.sh runs/before
#   bash bench/same_results.sh runs/after && python bench/compare_runs.py runs/before runs/after
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: same_results.sh OUT}
data=${DATA:-../shared/data/sadr_merged_counterfact.json}
for m in none rome memit pmet ft rome+sadr; do
  python -m attnedit eval "$data" --method "$m" --limit "${LIMIT:-20}" --no-fluency \
    --out "$out/${m/+/-}" --threads "${THREADS:-1}"
done
