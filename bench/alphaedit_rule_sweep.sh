#!/usr/bin/env bash
# AlphaEdit's projection rule for SmolLM2, chosen on DEV cases only: a sequential stream of 300
# CounterFact edits (counterfact-mend-val records 0-299, batches of 100) per candidate rule, MEMIT on the
# same stream and the unedited model for reference. Every case scored on the final model; perplexity on 50
# WikiText-2 validation lines. Resumable (run it again); run directories under
# ~/.cache/attnedit/streams/rule_sweep.
#   bash bench/alphaedit_rule_sweep.sh            # then: python bench/alphaedit_rule_sweep.py (the table)
#   RULES="fraction:0.5 fraction:0.8" bash bench/alphaedit_rule_sweep.sh   # some candidates only
set -euo pipefail
OUT=${OUT:-$HOME/.cache/attnedit/streams/rule_sweep}
N=${N:-300}
RULES=${RULES:-"absolute:0.02 fraction:0.5 fraction:0.8"}
COMMON=(counterfact-mend-val --mode sequential --batch-size 100 --limit "$N" --no-fluency
        --ppl-corpus wikitext2-valid --ppl-limit 50 --threads "${THREADS:-2}")
attnedit eval "${COMMON[@]}" --method none --out "$OUT/none"
attnedit eval "${COMMON[@]}" --method memit -p target_matmul=bfloat16 --out "$OUT/memit"
for rule in $RULES; do
  name=${rule%%:*}; value=${rule#*:}
  attnedit eval "${COMMON[@]}" --method alphaedit -p target_matmul=bfloat16 -p nullspace_rule="$name" \
    -p nullspace_threshold="$value" --out "$OUT/alphaedit-$name-$value"
done
