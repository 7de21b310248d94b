#!/usr/bin/env bash
# FT's bound on SmolLM2 for the KnowEdit table, chosen on DEV cases only (zsRE cases 0-99, one batch of
# 100 edits): FT-L at its SmolLM2 preset hardly edits (ES 35.5 on the editing table); the bound
# (L-infinity of the weight change, norm_constraint) is raised until it edits, and the table uses the
# smallest bound whose KE_EDIT is within 5 points of the best, so locality is not thrown away for nothing.
#   bash bench/ft_bound_sweep.sh [BOUNDS]      (resumable)
# -> runs/ke-dev-ft-BOUND/, bench/results/intattn/knowedit/ft_bound_dev/report.*
set -euo pipefail
DATA=../shared/data/knowedit_zsre_test_all.json
runs=()
for nc in ${1:-5e-4 2e-3 5e-3 2e-2}; do
  out="runs/ke-dev-ft-$nc"
  attnedit eval "$DATA" --skip-invalid --method ft -p "norm_constraint=$nc" --label "ft-$nc" --mode batch \
    --batch-size 100 --first 0 --limit 100 --no-fluency --ppl-corpus none --out "$out" --threads "${THREADS:-2}"
  runs+=("$out")
done
attnedit report "${runs[@]}" --out bench/results/intattn/knowedit/ft_bound_dev
