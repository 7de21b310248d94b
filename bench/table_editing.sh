#!/usr/bin/env bash
# The SmolLM2 editing table of docs/benchmarks.md: None, ROME, MEMIT, PMET, FT on the first N merged
# CounterFact cases (default 200), each method at its preset; statistics from 5,000 WikiText-2 lines.
# FL: greedy 100-token generations from each case's rewrite and paraphrase prompts (the merged file
# has no generation prompts).
#   bash bench/table_editing.sh [N]      (resumable: run it again after an interruption; THREADS=1 to
#   share the machine with another job)
set -euo pipefail
N=${1:-200}
DATA=../shared/data/sadr_merged_counterfact.json
W=../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt
for m in none rome memit pmet ft; do
  P=()
  if [[ $m == rome || $m == memit || $m == pmet ]]; then P=(-p "stats_corpus=$W" -p stats_samples=5000); fi
  attnedit eval "$DATA" --method "$m" --limit "$N" --fluency-prompts rewrite --ppl-corpus none "${P[@]}" \
    --out "runs/table-fl-$m" --threads "${THREADS:-2}"
done
attnedit report runs/table-fl-{none,rome,memit,pmet,ft} --magnitudes --out bench/results/table_editing
