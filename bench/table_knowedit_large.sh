#!/usr/bin/env bash
# The KnowEdit tables at batches of 300 and 500 (issue 17), resumable across sessions: every method of a
# table with bfloat16 target products (TAG=bf16; FT has no target optimisation), 1 thread, rows in order
# of need: MEMIT and IntAttn-Edit at both sizes first, then FT and PMET, then IntAttn-Edit+SADR.
# alpha=trace is not run: it traces the batch's first 10 requests, those of the batch of 100 (alpha 0).
#   bash bench/table_knowedit_large.sh zsre|wiki_cf      (each step resumes what an earlier run left)
set -uo pipefail
DATASET=${1:?usage: bash bench/table_knowedit_large.sh zsre|wiki_cf}
export THREADS=${THREADS:-1} FT_PARAMS="norm_constraint=1 lr=1e-2" ALL_PARAMS="target_matmul=bfloat16" TAG=bf16
status=0
for methods in "memit intattn" "memit intattn ft pmet" "memit intattn ft pmet intattn+sadr"; do
  for b in 300 500; do
    echo "=== $(date -u +%FT%TZ) $DATASET batch $b: $methods"
    METHODS="$methods" bash "$(dirname "$0")/table_knowedit.sh" "$DATASET" "$b" || { status=1; echo "FAILED: $DATASET $b $methods"; }
  done
done
exit $status
