#!/usr/bin/env bash
# The test command (README, .ci/run): set up ./.venv, lint, run the whole suite. Fails on any failure,
# and on "no tests collected" (pytest exit 5) too. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
# DeepSpeed JIT-builds its CPU comm op once per machine; keep the build cache with the venv.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@" tests
