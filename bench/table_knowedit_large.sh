#!/usr/bin/env bash
# The KnowEdit tables at batches of 300 and 500 (issue 17): the rows still missing, as one queue of
# resumable steps that two 1-thread workers share (two 1-thread jobs do not slow each other on the
# 2-core machine: bench/target_cost.py), bfloat16 target products (TAG=bf16; FT has none), each step
# one `bench/table_knowedit.sh DATASET B` row. A step is done when its run finished (the file COMPLETE in
# its run directory); a step that failed is not tried again by the same worker; a step being run by the
# other worker (its lock file held) is passed over; IntAttn-Edit waits for MEMIT's step of the same
# batch, whose targets it takes (--targets-cache runs/targets-DATASET-METHOD-bB).
# FT at 500 runs alone on both cores (its batch edit needs about 20 of the 24 GB), so it comes last: a
# worker waiting for the whole machine would leave a core idle while the other runs a 1-thread step.
# alpha=trace is not run: it traces the batch's first 10 requests, those of the batch of 100 (alpha 0).
#   bash bench/table_knowedit_large.sh            (one worker; start two for both cores)
#   bash bench/table_knowedit_large.sh status     (where each step stands)
#   bash bench/knowedit_state.sh save|restore     (carry unfinished runs across checkouts: ~/.cache/attnedit/state)
# After each step, the finished rows of its batch are reported (bench/results/intattn/knowedit/
# DATASET-bB-bf16[-rest]/: paired against MEMIT when MEMIT's run of that batch is there, "-rest" else).
set -uo pipefail
cd "$(dirname "$0")/.."
export THREADS=${THREADS:-1} FT_PARAMS="norm_constraint=1 lr=1e-2" ALL_PARAMS="target_matmul=bfloat16" TAG=bf16
STEPS=(
  "wiki_cf memit 500" "zsre ft 300" "zsre pmet 300" "wiki_cf intattn 500" "wiki_cf ft 300" "wiki_cf pmet 300"
  "zsre intattn+sadr 300" "wiki_cf intattn+sadr 300" "zsre pmet 500" "wiki_cf pmet 500"
  "zsre intattn+sadr 500" "wiki_cf intattn+sadr 500" "zsre ft 500" "wiki_cf ft 500"
)
mkdir -p runs/locks
run_dir() { echo "runs/ke-$1-${2/+/-}-b$3-$TAG"; }
done_cases() { local f; f="$(run_dir "$@")/results.jsonl"; if [ -f "$f" ]; then wc -l < "$f"; else echo 0; fi; }
is_done() { [ -f "$(run_dir "$@")/COMPLETE" ]; }

report() {  # the finished rows of one dataset and batch
  local dataset=$1 b=$2 runs=() label dir against=()
  for label in ft memit pmet intattn intattn+sadr; do
    dir=$(run_dir "$dataset" "$label" "$b")
    if is_done "$dataset" "$label" "$b"; then runs+=("$dir"); fi
  done
  [ ${#runs[@]} -gt 0 ] || return 0
  local out="bench/results/intattn/knowedit/$dataset-b$b-$TAG"
  if is_done "$dataset" memit "$b"; then against=(--against memit); else out="$out-rest"; fi
  attnedit report "${runs[@]}" "${against[@]}" --out "$out"
}

if [ "${1:-}" = status ]; then  # where each step stands
  for step in "${STEPS[@]}"; do
    read -r dataset label b <<< "$step"
    state="$(done_cases "$dataset" "$label" "$b") of $b cases"
    is_done "$dataset" "$label" "$b" && state="complete"
    lock="runs/locks/$dataset-${label/+/-}-b$b.lock"
    if [ -f "$lock" ] && ! flock -n "$lock" true; then state="$state, running"; fi
    printf '%-8s %-13s %4s  %s\n' "$dataset" "$label" "$b" "$state"
  done
  exit 0
fi

status=0 failed=" "
while :; do
  ran=0 waiting=0
  for step in "${STEPS[@]}"; do
    read -r dataset label b <<< "$step"
    is_done "$dataset" "$label" "$b" && continue
    [[ $failed == *" $step "* ]] && continue
    if [[ $label == intattn ]] && ! is_done "$dataset" memit "$b"; then waiting=1; continue; fi
    lock="runs/locks/$dataset-${label/+/-}-b$b.lock"
    exec 9> "$lock"
    if ! flock -n 9; then exec 9>&-; continue; fi  # the other worker has it
    echo "=== $(date -u +%FT%TZ) $dataset batch $b: $label ($(done_cases "$dataset" "$label" "$b") of $b done)"
    family=$label; [[ $label == intattn ]] && family=memit  # IntAttn-Edit's targets are MEMIT's
    # FT's edit of a whole batch holds every prompt's activations (12 GB at 300, about 20 at 500, of the
    # machine's 24): a batch of 500 runs alone, on both cores; every other step holds the machine shared
    threads=$THREADS share=-s
    if [[ $label == ft && $b -ge 500 ]]; then threads=2 share=-x; fi
    exec 8> runs/locks/machine.lock
    flock "$share" 8
    if THREADS=$threads REPORT=0 METHODS="$label" TARGETS_CACHE="runs/targets-$dataset-${family/+/-}-b$b" \
        bash bench/table_knowedit.sh "$dataset" "$b"; then
      date -u +%FT%TZ > "$(run_dir "$dataset" "$label" "$b")/COMPLETE"
      report "$dataset" "$b" || status=1
    else
      status=1 failed="$failed$step "; echo "FAILED: $dataset $b $label"
    fi
    exec 8>&- 9>&-
    ran=1
    break  # back to the top: earlier steps may have become runnable
  done
  if [ $ran = 0 ]; then
    [ $waiting = 1 ] || break
    sleep 60  # only steps waiting for another worker's MEMIT are left
  fi
done
echo "=== $(date -u +%FT%TZ) queue finished (status $status)"
exit $status
