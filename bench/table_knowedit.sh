#!/usr/bin/env bash
# IntAttn-Edit on SmolLM2, the KnowEdit table (issue 17): FT, MEMIT, PMET, IntAttn-Edit (alpha from the
# preset and alpha=trace), IntAttn-Edit+SADR, in ONE batch of B edits (100, 300 or 500) of held-out cases,
# each method at its SmolLM2 preset, statistics from 5,000 WikiText-2 lines. The KnowEdit metrics as
# EasyEdit scores them (KE_EDIT, KE_GEN, KE_PORT, KE_LOC, KE_FLU) with 95% intervals over cases, and paired
# differences against MEMIT.
#   bash bench/table_knowedit.sh DATASET [B] [FIRST]      (resumable)
#   DATASET: zsre (knowedit_zsre_test_all.json; cases 0-99 are the dev part, default FIRST 100)
#            wiki_cf (knowedit_wiki_counterfact_test_cf.json, default FIRST 0; dev: the train_cf file)
#   METHODS="memit intattn" to run a subset (AGAINST=label pairs against another row than memit); labels:
#   intattn-trace is intattn with -p alpha=trace. FT_PARAMS="norm_constraint=X": FT's bound
#   (bench/ft_bound_sweep.sh chooses it on dev cases). ALL_PARAMS="target_matmul=bfloat16": parameters of
#   every method but FT; TAG=bf16 names such a table apart (directories ...-bB-TAG).
#   The runs share one target cache (--targets-cache runs/targets-DATASET, or TARGETS_CACHE): IntAttn-Edit
#   takes MEMIT's targets for the same batch instead of optimising them again.
# -> runs/ke-DATASET-LABEL-bB[-TAG]/, bench/results/intattn/knowedit/DATASET-bB[-TAG]/{report,paired}.*
set -euo pipefail
DATASET=${1:?usage: bash bench/table_knowedit.sh zsre|wiki_cf [B] [FIRST]}
B=${2:-100}
case $DATASET in
  zsre) DATA=../shared/data/knowedit_zsre_test_all.json; FIRST=${3:-100} ;;
  wiki_cf) DATA=../shared/data/knowedit_wiki_counterfact_test_cf.json; FIRST=${3:-0} ;;
  *) echo "DATASET must be zsre or wiki_cf, not '$DATASET'" >&2; exit 2 ;;
esac
W=../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt
runs=()
for label in ${METHODS:-ft memit pmet intattn intattn-trace intattn+sadr}; do
  method=${label%-trace}
  P=()
  # FT has neither statistics nor a target optimisation (so no target cache either)
  if [[ $method != ft ]]; then
    P=(-p "stats_corpus=$W" -p stats_samples=5000 --targets-cache "${TARGETS_CACHE:-runs/targets-$DATASET}")
  fi
  if [[ $label == *-trace ]]; then P+=(-p alpha=trace); fi
  read -r -a EXTRA <<< "${FT_PARAMS:-}"
  if [[ $method == ft ]]; then for x in "${EXTRA[@]}"; do P+=(-p "$x"); done; fi
  read -r -a ALL <<< "${ALL_PARAMS:-}"
  if [[ $method != ft ]]; then for x in "${ALL[@]}"; do P+=(-p "$x"); done; fi
  out="runs/ke-$DATASET-${label/+/-}-b$B${TAG:+-$TAG}"
  # fluency on the rewrite prompts only: KE_FLU (EasyEdit's sampling) and FL (greedy) both come from them;
  # KE_FLU drawn per decoding batch, as every row of these tables was (docs/reliability.md)
  attnedit eval "$DATA" --skip-invalid --method "$method" --label "$label" --mode batch --batch-size "$B" \
    --first "$FIRST" --limit "$B" --fluency-prompts rewrite --ppl-corpus none "${P[@]}" --out "$out" \
    --knowedit-sampling batch --threads "${THREADS:-2}"
  runs+=("$out")
done
# REPORT=0: no report (bench/table_knowedit_large.sh reports the rows of a batch together)
[ "${REPORT:-1}" = 0 ] || attnedit report "${runs[@]}" --against "${AGAINST:-memit}" --out "bench/results/intattn/knowedit/$DATASET-b$B${TAG:+-$TAG}"
