#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (tiny models of every family + the real SmolLM2), then the
# tiny-model tests of hooks, caches and attention kernels on the lowest supported transformers.
# The tests marked `data` read full public data sets, found through the data registry ($ATTNEDIT_DATA
# folders or the cache; `attnedit data fetch NAME` downloads them). On a machine without them, the
# self-contained suite runs and the script names the sets to fetch (and exits non-zero only if a test
# fails); ATTNEDIT_ALL_TESTS=1 (as CI sets) runs them anyway, each missing set failing its tests in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests bench
lint-imports
mypy  # config: [tool.mypy] in pyproject.toml (strict for attnedit.core and attnedit.editing)
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir build/site  # the docs site, warnings as errors, offline
MARK=()
if ! ABSENT=$(python tests/data_sets.py) && [ "${ATTNEDIT_ALL_TESTS:-0}" != 1 ]; then
  MARK=(-m "not data")
  echo "data sets not on this machine: $ABSENT" >&2
  echo "running the self-contained tests only; for the whole suite: attnedit data fetch $ABSENT" \
    "(or set ATTNEDIT_DATA to a folder holding them), then run this again" >&2
fi
python -m pytest -q -p no:cacheprovider "${MARK[@]}" "$@"
deactivate

# The lowest transformers pyproject.toml allows, in a second environment kept between runs (.venv-lowest):
# every tiny-model test (about 1.5 min on 2 cores), not the real SmolLM2. ATTNEDIT_SKIP_LOWEST=1 skips it.
if [ "${ATTNEDIT_SKIP_LOWEST:-0}" != 1 ]; then
  LOWEST_TRANSFORMERS=4.56.0
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if [ ! -x .venv-lowest/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv-lowest
  fi
  .venv-lowest/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION:-2.13.0}')" \
    2>/dev/null || .venv-lowest/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv-lowest/bin/python -c "import sklearn, fastapi, transformers, sys; sys.exit(transformers.__version__ != '$LOWEST_TRANSFORMERS')" \
    2>/dev/null || .venv-lowest/bin/pip install -q -e ".[dev,memat,serve]" "transformers==$LOWEST_TRANSFORMERS"
  # editable: the installed package must be this checkout (re-pointed if .venv-lowest came from another one)
  .venv-lowest/bin/python -c "import attnedit, pathlib, sys; sys.exit(pathlib.Path(attnedit.__file__).resolve()
    != pathlib.Path('src/attnedit/__init__.py').resolve())" 2>/dev/null || .venv-lowest/bin/pip install -q --no-deps -e .
  # offline: the hub-id test must fail fast instead of retrying the network
  # not the Ray tests either: this environment checks transformers compatibility only, and has no ray extra
  # (the first run above covers --backend ray)
  LOWEST_MARK="not smollm2 and not ray"
  if (( ${#MARK[@]} )); then LOWEST_MARK="$LOWEST_MARK and not data"; fi
  HF_HUB_OFFLINE=1 .venv-lowest/bin/python -m pytest -q -p no:cacheprovider -m "$LOWEST_MARK" tests
fi
if (( ${#MARK[@]} )); then
  echo "passed: the self-contained suite; not run: the tests of data sets $ABSENT (attnedit data fetch $ABSENT)" >&2
fi
