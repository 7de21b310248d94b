#!/usr/bin/env bash
# MEMAT cross-lingual on SmolLM2 (BMIKE-53 CounterFact): edit in English, heads in L2 (fr, es, de, ca), and
# the reverse (edit in L2, heads in English) for the languages in REVERSE; MEMIT in the same edit language
# as the baseline. Records FIRST..FIRST+N-1 of each file (default 100..299; 0-99 are the dev slice the
# question prompts were chosen on), batches of 100, the suite in both languages (KEY and KEY@LANG).
#   bash bench/memat_crosslingual.sh [N] [FIRST]     (resumable)
# -> bench/results/memat/xling/<edit>-<heads>/{report,paired}.*
set -euo pipefail
N=${1:-200}
FIRST=${2:-100}
W=../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt
P=(-p "stats_corpus=$W" -p stats_samples=5000)
read -r -a EXTRA <<< "${MEMAT_PARAMS:-}"
Q=()
for x in "${EXTRA[@]}"; do Q+=(-p "$x"); done
pair() {  # edit language, head language, data file
  local edit=$1 heads=$2 data=$3
  # editing in another language needs the subject in that language's prompt: records without it are
  # left out (and listed in the manifest) by --skip-invalid
  local skip=()
  if [[ $edit != en ]]; then skip=(--skip-invalid); fi
  local base="runs/memat-xling-memit-$edit-$(basename "$data" .json)"
  local out="runs/memat-xling-memat-$edit-$heads"
  attnedit eval "$data" "${skip[@]}" --language "$edit" --method memit --mode batch --batch-size 100 --first "$FIRST" \
    --limit "$N" --no-fluency --ppl-corpus none "${P[@]}" --out "$base" --threads "${THREADS:-2}"
  attnedit eval "$data" "${skip[@]}" --language "$edit" --method memat --mode batch --batch-size 100 --first "$FIRST" \
    --limit "$N" --no-fluency --ppl-corpus none "${P[@]}" -p "head_language=$heads" "${Q[@]}" --out "$out" \
    --threads "${THREADS:-2}"
  attnedit report "$base" "$out" --magnitudes --against memit --out "bench/results/memat/xling/$edit-$heads"
}
for l in ${LANGS-fr es de ca}; do
  pair en "$l" "../shared/data/bmike53_counterfact_en_$l.json"
done
for l in ${REVERSE-fr}; do
  pair "$l" en "../shared/data/bmike53_counterfact_en_$l.json"
done
