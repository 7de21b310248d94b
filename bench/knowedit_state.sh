#!/usr/bin/env bash
# Carry the large KnowEdit tables' runs (bench/table_knowedit_large.sh) across checkouts that do not keep
# runs/ (a fresh clone or worktree, a cleaned tree): `save` copies each run's manifest, records and COMPLETE
# mark, and the target caches that an unfinished run still needs, into the run-state directory outside
# the repository, $ATTNEDIT_CACHE/state/knowedit (default ~/.cache/attnedit/state/knowedit; never
# committed: copy that directory along to carry the runs to another machine); `restore` copies them back
# where runs/ lacks them (a run directory already there is kept; a target cache gets the groups it
# lacks). A restored run resumes: its finished cases are kept, and a batch edit that was
# not saved with it is recomputed (from the restored targets, so only its closed-form solve runs again).
#   bash bench/knowedit_state.sh save|restore
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${ATTNEDIT_CACHE:-$HOME/.cache/attnedit}/state/knowedit
case ${1:-} in
  save)
    mkdir -p "$STATE"
    for dir in runs/ke-*-b300-bf16 runs/ke-*-b500-bf16; do
      [ -f "$dir/manifest.json" ] || continue
      dest="$STATE/$(basename "$dir")"; mkdir -p "$dest"
      for f in manifest.json results.jsonl COMPLETE; do [ -f "$dir/$f" ] && cp "$dir/$f" "$dest/"; done
    done
    for cache in runs/targets-*-b*; do
      [ -d "$cache" ] || continue
      name=$(basename "$cache")  # targets-DATASET-FAMILY-bB; FAMILY memit serves memit and intattn
      read -r dataset family b <<< "$(sed -E 's/^targets-(zsre|wiki_cf)-(.*)-b([0-9]+)$/\1 \2 \3/' <<< "$name")"
      users=("$family"); [ "$family" = memit ] && users+=(intattn)
      needed=0
      for label in "${users[@]}"; do [ -f "runs/ke-$dataset-$label-b$b-bf16/COMPLETE" ] || needed=1; done
      if [ $needed = 1 ]; then mkdir -p "$STATE/$name"; cp "$cache"/*.safetensors "$STATE/$name/" 2>/dev/null || true
      else rm -rf "${STATE:?}/$name"; fi
    done
    du -sh "$STATE" ;;
  restore)
    [ -d "$STATE" ] || exit 0
    mkdir -p runs
    for saved in "$STATE"/*/; do
      name=$(basename "$saved")
      if [[ $name == targets-* ]]; then  # target groups are named by their content: add the missing ones
        mkdir -p "runs/$name"; cp -n "$saved"/*.safetensors "runs/$name/" 2>/dev/null || true
        echo "restored runs/$name ($(ls "runs/$name" | wc -l) groups)"
      elif [ -e "runs/$name" ]; then echo "kept runs/$name (already there)"
      else cp -r "$saved" "runs/$name"; echo "restored runs/$name"; fi
    done ;;
  *) echo "usage: bash bench/knowedit_state.sh save|restore" >&2; exit 2 ;;
esac
