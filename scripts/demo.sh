#!/usr/bin/env bash
# The main job: set up, then train an MLP on scikit-learn's digits in several fit calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m warmfit demo "$@"
