#!/usr/bin/env bash
# The stream table on SmolLM2 (held out from every tuning choice): streams of edits in batches of 100 with a
# checkpoint every 100 edits, every edit then scored on the final model.
#   CounterFact: counterfact-mend (edit split) records 0-999   zsRE: zsre-train-1k, its valid records of 0-999
# Methods: the unedited model, MEMIT, AlphaEdit, MEMIT+SADR, AlphaEdit+SADR; ROME one edit at a time for 200
# edits (a checkpoint every 20). Each run resumes where it stopped (run it again); run directories under
# ~/.cache/attnedit/streams/table (not in git).
#   bash bench/stream_table.sh [SET] [METHOD...]     # SET: cf | zsre (default cf); default: every method
#   python bench/stream_table.py                      # the tables and figures from the finished runs
set -euo pipefail
SET=${1:-cf}; shift || true
METHODS=${*:-"none alphaedit memit alphaedit+sadr memit+sadr rome"}
OUT=${OUT:-$HOME/.cache/attnedit/streams/table}/$SET
case $SET in
  cf)   DATA=(counterfact-mend --first 0 --limit 1000) ;;
  zsre) DATA=(zsre-train-1k --first 0 --limit 1000 --skip-invalid) ;;
  *) echo "SET must be cf or zsre" >&2; exit 2 ;;
esac
COMMON=(--mode sequential --ppl-corpus none --threads "${THREADS:-2}")
BF16=(-p target_matmul=bfloat16)
for method in $METHODS; do
  name=${method/+/-}
  if [ "$method" = none ]; then  # the unedited model's scores on the same cases (no checkpoints)
    attnedit eval "${DATA[@]}" --method none --batch-size 100 "${COMMON[@]}" --out "$OUT/$name"
  elif [ "$method" = rome ]; then
    attnedit eval "${DATA[0]}" --first "${DATA[2]}" --limit 200 "${DATA[@]:5}" --method rome \
      --batch-size 1 --checkpoint-every 20 "${COMMON[@]}" "${BF16[@]}" --out "$OUT/$name"
  else
    attnedit eval "${DATA[@]}" --method "$method" --batch-size 100 --checkpoint-every 100 "${COMMON[@]}" \
      "${BF16[@]}" --out "$OUT/$name"
  fi
done
