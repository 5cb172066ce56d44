#!/usr/bin/env bash
# Create .venv and install warmfit with everything the demo and the tests need.
# torch is pinned to 2.13.0: its CPU wheel is what this project is developed and tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
