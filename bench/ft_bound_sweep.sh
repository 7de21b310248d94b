#!/usr/bin/env bash
# FT's settings on SmolLM2 for the KnowEdit table, chosen on DEV cases only (zsRE cases 0-99, one batch of
# 100 edits): FT-L at its SmolLM2 preset hardly edits (ES 35.5 on the editing table). First the bound
# (L-infinity of the weight change, norm_constraint) is raised; past lr x steps (Adam moves a weight by at
# most about lr per step) the bound no longer binds, so then the learning rate is raised with the bound off.
# The table uses the setting whose KE_EDIT is within 5 points of the best with the best KE_LOC, so locality
# is not thrown away for nothing.
#   bash bench/ft_bound_sweep.sh [SETTINGS]      (resumable)
#   SETTINGS: each a number (the bound) or KEY=VALUE,KEY=VALUE (preset overrides)
# -> runs/ke-dev-ft-SETTING/, bench/results/intattn/knowedit/ft_bound_dev/report.*
set -euo pipefail
DATA=../shared/data/knowedit_zsre_test_all.json
runs=()
for setting in ${1:-5e-4 2e-3 5e-3 2e-2 norm_constraint=1,lr=2e-3 norm_constraint=1,lr=1e-2}; do
  if [[ $setting != *=* ]]; then setting="norm_constraint=$setting"; fi
  P=()
  IFS=, read -r -a pairs <<< "$setting"
  for x in "${pairs[@]}"; do P+=(-p "$x"); done
  name=${setting#norm_constraint=}  # a bound alone keeps its first name (ft-5e-4 ...)
  out="runs/ke-dev-ft-${name//[=,]/-}"
  attnedit eval "$DATA" --skip-invalid --method ft "${P[@]}" --label "ft-${name//[=,]/-}" --mode batch \
    --batch-size 100 --first 0 --limit 100 --no-fluency --ppl-corpus none --out "$out" --threads "${THREADS:-2}"
  runs+=("$out")
done
attnedit report "${runs[@]}" --out bench/results/intattn/knowedit/ft_bound_dev
