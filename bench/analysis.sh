#!/usr/bin/env bash
# The figures of docs/analysis.md: SmolLM2 edited with ROME (preset, statistics from 5,000 WikiText-2
# lines) on the first N merged CounterFact cases (default 130: about 100 of them have a Relation or
# Distract-Neighborhood prompt that contains the subject): attention drift, attention patching,
# contaminating substitution (first SUB_N cases, default 100), causal tracing. Each command is
# resumable: run the script again after an interruption, or with a larger N to extend the runs.
#   bash bench/analysis.sh [N]
set -euo pipefail
N=${1:-130}
DATA=../shared/data/sadr_merged_counterfact.json
W=../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt
P=(-p "stats_corpus=$W" -p stats_samples=5000)
for cmd in drift patch substitute; do
  n=$N
  # substitution costs about 11 s per prompt on 2 cores: docs/analysis.md uses the first 100 cases
  if [[ $cmd == substitute ]]; then n=${SUB_N:-100}; fi
  attnedit analyze "$cmd" "$DATA" --method rome "${P[@]}" --limit "$n" --out "runs/analysis/$cmd" --threads "${THREADS:-2}"
done
attnedit analyze trace "$DATA" --limit "$N" --out runs/analysis/trace --threads "${THREADS:-2}"
