#!/usr/bin/env bash
# Run every benchmark and rewrite its section of BENCHMARKS.md.
#   benchmarks/run_all.sh           full runs (about 10 minutes on 2 CPU cores)
#   benchmarks/run_all.sh --quick   smoke runs (under a minute each; BENCHMARKS.md is
#                                   left alone except by bench_step_overhead.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
for bench in bench_step_overhead bench_data_path bench_checkpoint bench_resume bench_memory; do
    echo "== $bench $*"
    "$PY" "benchmarks/$bench.py" "$@"
done
