#!/usr/bin/env bash
# Quick start, main job: set up, then edit SmolLM2-135M with ROME and with ROME+SADR on the shipped
# sample set, the unedited model as the baseline row, and print the comparison table.
# By default the first 16 of the 48 sample cases (a few minutes on a 2-core CPU), without corpus
# perplexity (not in the table); extra flags go to every `attnedit eval` and win over the defaults
# (e.g. --limit 48 for all cases, --no-fluency, --ppl-corpus sample).
# With 2 or more cores the ROME+SADR row runs beside the other two, each half of the cores (its output
# goes to runs/demo/rome-sadr.log); LANES=1 runs the rows one after the other on every core.
# On a CPU that computes bfloat16 natively (AMX or AVX512-BF16) the edits' target optimisation runs its
# products in bfloat16 (-p target_matmul=bfloat16, recorded in each manifest; docs/benchmarks.md has the
# comparison); TARGET_MATMUL=model keeps them in float32.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
CORES=$(nproc)
LANES=${LANES:-$(( CORES >= 2 ? 2 : 1 ))}
THREADS=${THREADS:-$(( CORES / LANES > 0 ? CORES / LANES : 1 ))}
if [[ -z ${TARGET_MATMUL:-} ]]; then
  TARGET_MATMUL=model
  if grep -qm1 -E 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null; then TARGET_MATMUL=bfloat16; fi
fi
echo "edits: the target optimisation's products in ${TARGET_MATMUL/model/float32} (TARGET_MATMUL=model|bfloat16)"
mkdir -p runs/demo
row() {  # row METHOD: one `attnedit eval` of the sample set into runs/demo/<method>
  local params=()
  if [[ $1 != none ]]; then params=(-p "target_matmul=$TARGET_MATMUL"); fi
  attnedit eval sample --method "$1" --limit 16 --ppl-corpus none --out "runs/demo/${1/+/-}" \
    --threads "$THREADS" "${params[@]}" "${@:2}"
}
side=""
if (( LANES > 1 )); then
  echo "ROME+SADR runs beside the other rows ($THREADS thread(s) each); its output: runs/demo/rome-sadr.log"
  row rome+sadr "$@" > runs/demo/rome-sadr.log 2>&1 &
  side=$!
  # an interrupted demo stops this row too (it resumes on the next run, like the others)
  trap 'kill "$side" 2>/dev/null || true' EXIT
fi
row none "$@"
row rome "$@"
if [[ -n $side ]]; then
  if ! wait "$side"; then
    echo "the ROME+SADR row failed; the end of runs/demo/rome-sadr.log:" >&2
    tail -n 30 runs/demo/rome-sadr.log >&2
    exit 1
  fi
  # its table, as the other rows printed theirs
  tr '\r' '\n' < runs/demo/rome-sadr.log | grep -E '^\||^results:' || true
else
  row rome+sadr "$@"
fi
attnedit report runs/demo/none runs/demo/rome runs/demo/rome-sadr --out runs/demo/report
