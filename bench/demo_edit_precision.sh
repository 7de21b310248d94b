#!/usr/bin/env bash
# The quick start's edits with float32 and with bfloat16 target products: ROME and ROME+SADR on the demo's
# 16 sample cases (no fluency: it does not depend on the setting), seconds per edit from the records.
#   bash bench/demo_edit_precision.sh        (idle machine; -> runs/demo-prec/, prints the sums and medians)
set -euo pipefail
rm -rf runs/demo-prec
for m in rome rome+sadr; do
  for mm in model bfloat16; do
    out="runs/demo-prec/${m/+/-}-$mm"
    P=()
    if [[ $mm == bfloat16 ]]; then P=(-p target_matmul=bfloat16); fi
    attnedit eval sample --method "$m" --limit 16 --ppl-corpus none --no-fluency --out "$out" --threads 2 \
      "${P[@]}" > /dev/null 2>&1
    python - "$out" "$m $mm" <<'PY'
import json, statistics, sys
seconds = [json.loads(line)["seconds_edit"] for line in open(f"{sys.argv[1]}/results.jsonl")]
print(sys.argv[2], "sum", round(sum(seconds), 1), "median", round(statistics.median(seconds), 2))
PY
  done
done
