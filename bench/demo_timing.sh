#!/usr/bin/env bash
# Wall time of the quick start (`bash scripts/demo.sh`, its 16 cases) per configuration, on an idle
# machine: the rows one after the other in float32 (the demo before issue 20's lanes), two lanes in
# float32, two lanes with bfloat16 target products (the default here), warm cache; then that default
# with an empty $ATTNEDIT_CACHE (cold). Each includes scripts/setup.sh's check of the environment,
# timed alone as well, so "after the installs" = wall - setup.
#   bash bench/demo_timing.sh       (about 25 minutes) -> bench/results/demo_timing.json
#   ONLY="lanes2_bfloat16_cold lanes2_bfloat16_warm" bash bench/demo_timing.sh   (those configurations,
#   in that order; the others' entries in the JSON are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/demo_timing.json
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ONLY=${ONLY:-sequential_float32 lanes2_float32 lanes2_bfloat16_warm lanes2_bfloat16_cold}
timed() {  # timed NAME ENV...: one demo run from fresh run directories; appends "NAME seconds" to $tmp/t
  local name=$1; shift
  rm -rf runs/demo
  local t0=$EPOCHREALTIME
  env "$@" bash scripts/demo.sh > "$tmp/$name.log" 2>&1
  echo "$name $t0 $EPOCHREALTIME" >> "$tmp/t"
  tail -n 6 "$tmp/$name.log" | grep '^| ' > "$tmp/$name.table"
}
t0=$EPOCHREALTIME; bash scripts/setup.sh > /dev/null; echo "setup $t0 $EPOCHREALTIME" >> "$tmp/t"
cold=$(mktemp -d)
for name in $ONLY; do
  case $name in
    sequential_float32) timed "$name" LANES=1 TARGET_MATMUL=model ;;
    lanes2_float32) timed "$name" LANES=2 TARGET_MATMUL=model ;;
    lanes2_bfloat16_warm) timed "$name" LANES=2 TARGET_MATMUL=bfloat16 ;;
    lanes2_bfloat16_cold) rm -rf "$cold"; mkdir -p "$cold"; timed "$name" LANES=2 TARGET_MATMUL=bfloat16 ATTNEDIT_CACHE="$cold" ;;
    *) echo "unknown configuration '$name'" >&2; exit 2 ;;
  esac
done
rm -rf "$cold"
python - "$tmp" "$out" <<'PY'
import json, platform, sys
from pathlib import Path
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
seconds = {n: float(b) - float(a) for n, a, b in (line.split() for line in (tmp / "t").read_text().splitlines())}
setup = seconds.pop("setup")
import datetime
runs = {name: {"wall_s": round(s, 1), "after_installs_s": round(s - setup, 1), "setup_check_s": round(setup, 1),
               "date": datetime.date.today().isoformat(),
               "table": (tmp / f"{name}.table").read_text().splitlines()} for name, s in seconds.items()}
old = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
out.write_text(json.dumps({"machine": platform.machine(), "runs": {**old["runs"], **runs}}, indent=1) + "\n")
print(json.dumps({k: v["after_installs_s"] for k, v in runs.items()}))
PY
