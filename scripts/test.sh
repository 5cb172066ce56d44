#!/usr/bin/env bash
# Set up, lint and type-check, then run the test suite (the default battery: about 7 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KERAS_BACKEND=torch OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy  # the package's calls type-checked (configured in pyproject.toml)
# Both cores: two pytest-xdist workers, a test file per worker at a time (a file's tests
# share module-level setup; the torchrun tests of test_distributed.py stay in one worker).
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=600 \
    -n "${WARMFIT_TEST_WORKERS:-2}" --dist loadfile "$@"
