#!/usr/bin/env bash
# Run every benchmark and rewrite its section of BENCHMARKS.md: first on the CPU, then,
# only if torch.cuda.is_available(), each one again with --device cuda (own sections,
# named <name>-cuda, next to the CPU ones).
#   benchmarks/run_all.sh              full runs: about 10 minutes on 2 shared CPU cores
#                                      (step overhead ~3, resume ~3.5, checkpoint ~2,
#                                      memory ~1.5, data path ~0.5). On an
#                                      H100 machine (estimated; not yet run there): about
#                                      6 minutes of CPU runs, then about 8 of GPU runs
#                                      (step overhead ~1, data path ~2, checkpoint ~2-3
#                                      with the disk's speed, resume ~2, memory ~1), so
#                                      about 14 minutes in all
#   benchmarks/run_all.sh --quick      smoke runs (under a minute each); BENCHMARKS.md
#                                      is left alone
#   benchmarks/run_all.sh --cuda-only  the GPU runs alone (about 8 minutes; keeps the CPU
#                                      sections as they are); combines with --quick
# Other options are passed to every benchmark (--quick is the one they all take).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
BENCHES=(bench_step_overhead bench_training_step bench_data_path bench_checkpoint bench_resume bench_memory bench_boosting)

cpu=1
args=()
for a in "$@"; do
    if [ "$a" = "--cuda-only" ]; then cpu=0; else args+=("$a"); fi
done

if [ "$cpu" = 1 ]; then
    for bench in "${BENCHES[@]}"; do
        echo "== $bench ${args[*]:-}"
        "$PY" "benchmarks/$bench.py" ${args[@]+"${args[@]}"}
    done
fi

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    for bench in "${BENCHES[@]}"; do
        echo "== $bench --device cuda ${args[*]:-}"
        "$PY" "benchmarks/$bench.py" --device cuda ${args[@]+"${args[@]}"}
    done
elif [ "$cpu" = 0 ]; then
    echo "run_all.sh --cuda-only: torch sees no CUDA device here" >&2
    exit 1
else
    echo "== no CUDA device: GPU variants skipped"
fi
