#!/usr/bin/env bash
# AlphaEdit's projection rule for SmolLM2, chosen on DEV cases only: a sequential stream of 300
# CounterFact edits (counterfact-mend-val records 0-299, batches of 100) per candidate rule, MEMIT on the
# same stream for reference. Every case scored on the final model; perplexity on 50 WikiText-2 validation
# lines. Resumable (run it again); run directories under ~/.cache/attnedit/streams/rule_sweep.
#   bash bench/alphaedit_rule_sweep.sh            # then: python bench/alphaedit_rule_sweep.py (the table)
set -euo pipefail
OUT=${OUT:-$HOME/.cache/attnedit/streams/rule_sweep}
N=${N:-300}
COMMON=(counterfact-mend-val --mode sequential --batch-size 100 --limit "$N" --no-fluency
        --ppl-corpus wikitext2-valid --ppl-limit 50 -p target_matmul=bfloat16 --threads "${THREADS:-2}")
attnedit eval "${COMMON[@]}" --method memit --out "$OUT/memit"
for rule in absolute:0.02 fraction:0.5 fraction:0.8 fraction:0.95; do
  name=${rule%%:*}; value=${rule#*:}
  attnedit eval "${COMMON[@]}" --method alphaedit -p nullspace_rule="$name" -p nullspace_threshold="$value" \
    --out "$OUT/alphaedit-$name-$value"
done
