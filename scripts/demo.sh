#!/usr/bin/env bash
# Quick start, main job: set up, then evaluate SmolLM2-135M on the shipped sample set and print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
attnedit eval sample --method none --out runs/demo-none --threads "${THREADS:-2}" "$@"
