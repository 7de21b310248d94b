#!/usr/bin/env bash
# Does -p target_matmul=bfloat16 change ROME's metrics? The same 40 merged CounterFact cases (0-39, the
# editing table's first) edited with float32 and with bfloat16 target products, statistics from 5,000
# WikiText-2 lines as the editing table, no fluency; paired differences against float32.
#   bash bench/target_precision_quality.sh        (resumable; THREADS=2 on an idle machine)
# -> runs/precision-rome-{fp32,bf16}/, bench/results/target_precision_quality/
set -euo pipefail
W=../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt
D=../shared/data/sadr_merged_counterfact.json
P=(--limit 40 --no-fluency --ppl-corpus none -p "stats_corpus=$W" -p stats_samples=5000 --threads "${THREADS:-1}")
attnedit eval $D --method rome --label rome "${P[@]}" --out runs/precision-rome-fp32
attnedit eval $D --method rome --label rome-bf16 "${P[@]}" -p target_matmul=bfloat16 --out runs/precision-rome-bf16
attnedit report runs/precision-rome-fp32 runs/precision-rome-bf16 --against rome \
  --out bench/results/target_precision_quality
