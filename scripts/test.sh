#!/usr/bin/env bash
# Set up, lint and type-check, then run the test suite (the default battery: under 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KERAS_BACKEND=torch OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy  # the package's calls type-checked (configured in pyproject.toml)
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=600 "$@"
