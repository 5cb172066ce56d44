#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU and PyTorch already installed (such as the
# lent H100/H200 machines, which have torch, safetensors, xxhash, rich, matplotlib,
# scikit-learn and pytest but no network): runs from the source tree, installs nothing.
#   bash scripts/gpu_check.sh           tests/test_gpu.py + every benchmark tiny on CUDA
#   bash scripts/gpu_check.sh --bench   then the full GPU benchmarks (BENCHMARKS.md's
#                                       -cuda sections; about 8 minutes on an H100)
# Where $OUT is set (the device tool), the log and BENCHMARKS.md are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export KERAS_BACKEND=torch CUBLAS_WORKSPACE_CONFIG=:4096:8  # the latter: deterministic=True
PY="${PYTHON:-python3}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_benchmarks_smoke.py || status=$?
if [ "${1:-}" = "--bench" ]; then
    PYTHON="$PY" bash benchmarks/run_all.sh --cuda-only || status=$?
fi
if [ -n "${OUT:-}" ]; then cp BENCHMARKS.md "$OUT/"; fi
exit "$status"
