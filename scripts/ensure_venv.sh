#!/usr/bin/env bash
# Create ./.venv if it is missing and install megapico (+ test extras) into it; a no-op when up to date.
# torch is pinned to 2.13.0 in setup.py: the CPU wheel on CPU machines, the CUDA build where CUDA is.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.megapico-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
