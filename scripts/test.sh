#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (tiny models of every family + the real SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests bench
lint-imports
python -m pytest -q -p no:cacheprovider "$@"
