#!/usr/bin/env bash
# MEMAT on SmolLM2, English only (EE): MEMIT vs MEMAT vs MEMAT+SADR in batches of 100 on merged CounterFact
# cases FIRST..FIRST+N-1 (default 100..299; cases 0-99 are the tuning batch of bench/memat_k_sweep.py).
# Every editor at the SmolLM2 MEMIT preset (MEMAT's own fields at their defaults unless MEMAT_PARAMS says
# otherwise), statistics from 5,000 WikiText-2 lines, no fluency (the issue's table has none).
#   bash bench/table_memat.sh [N] [FIRST]     (resumable: a batch edit is saved before its cases are scored)
# -> bench/results/memat/ee/{report,paired}.* (paired against MEMIT)
set -euo pipefail
N=${1:-200}
FIRST=${2:-100}
DATA=../shared/data/sadr_merged_counterfact.json
W=../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt
read -r -a EXTRA <<< "${MEMAT_PARAMS:-}"
runs=()
for m in ${METHODS:-memit memat memat+sadr}; do
  P=(-p "stats_corpus=$W" -p stats_samples=5000)
  # MEMAT's saved edits hold the seconds of each step (bench/memat_speed.py reads them)
  if [[ $m == memat* ]]; then P+=(--save-edits); for x in "${EXTRA[@]}"; do P+=(-p "$x"); done; fi
  out="runs/memat-ee-${m/+/-}"
  attnedit eval "$DATA" --method "$m" --mode batch --batch-size 100 --first "$FIRST" --limit "$N" \
    --no-fluency --ppl-corpus none "${P[@]}" --out "$out" --threads "${THREADS:-2}"
  runs+=("$out")
done
attnedit report "${runs[@]}" --magnitudes --against memit --out bench/results/memat/ee
python bench/memat_speed.py runs/memat-ee-memat --memit runs/memat-ee-memit
