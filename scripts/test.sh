#!/usr/bin/env bash
# The test command (README, .ci/run): set up ./.venv, lint, run the whole suite. Fails on any failure,
# and on "no tests collected" (pytest exit 5) too. Extra arguments go to pytest:
#   bash scripts/test.sh                          # the whole suite (CI)
#   bash scripts/test.sh -m "not slow"            # a change's inner loop: no module that starts training processes
#   bash scripts/test.sh tests/test_model.py      # one file (or tests/test_model.py::test_x, -k EXPR)
# One line per test as it ends, with its count ([12/311]), so a log read line by line shows progress; the slowest
# tests at the end. With no path it runs tests/ (pyproject.toml's testpaths).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
# DeepSpeed JIT-builds its CPU comm op once per machine; keep the build cache with the venv.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -v -o console_output_style=count --durations=15 "$@"
