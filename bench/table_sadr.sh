#!/usr/bin/env bash
# Table 3 analogue on SmolLM2 (SADR issue): None, ROME, ROME+SADR, MEMIT, MEMIT+SADR, PMET, PMET+SADR on
# the test split of merged CounterFact: cases FIRST.. FIRST+N-1 (default 100..399; cases 0-99 are the
# validation slice the SADR settings were chosen on). Each editor at its preset; +SADR takes the preset's
# `sadr` block (docs/benchmarks.md says how it was chosen). Statistics from 5,000 WikiText-2 lines.
# FL: greedy 100-token generations from each case's rewrite and paraphrase prompts.
#   bash bench/table_sadr.sh [N] [FIRST]     (resumable; THREADS=1 to share the machine)
# -> bench/results/table_sadr/{report,paired}.* (paired against ROME) and {memit,pmet}/paired.* (each +SADR
#    row against its own editor)
set -euo pipefail
N=${1:-300}
FIRST=${2:-100}
DATA=../shared/data/sadr_merged_counterfact.json
W=../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt
runs=()
for m in none rome rome+sadr memit memit+sadr pmet pmet+sadr; do
  P=()
  if [[ $m != none ]]; then P=(-p "stats_corpus=$W" -p stats_samples=5000); fi
  # the plain rows extend the editing table's runs (cases 0-199, same settings): single-mode runs keep
  # records per case, so only the missing cases are computed and the report takes cases FIRST.. only
  if [[ $m == *+sadr ]]; then out="runs/table-sadr-${m/+/-}"; else out="runs/table-fl-$m"; fi
  attnedit eval "$DATA" --method "$m" --first "$FIRST" --limit "$N" --fluency-prompts rewrite --ppl-corpus none \
    "${P[@]}" --out "$out" --threads "${THREADS:-2}"
  runs+=("$out")
done
attnedit report "${runs[@]}" --magnitudes --against rome --out bench/results/table_sadr
# each editor's +SADR row against that editor, paired on the same cases
for e in memit pmet; do
  attnedit report "runs/table-fl-$e" "runs/table-sadr-$e-sadr" --magnitudes --against "$e" --out "bench/results/table_sadr/$e"
done
