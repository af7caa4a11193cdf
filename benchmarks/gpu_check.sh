#!/usr/bin/env bash
# The GPU check on a bare CUDA machine, in one command (~6 minutes): install the Python packages the
# machine lacks from wheels carried in .whl/ (never torch: the machine's CUDA build is used), put this
# worktree first on PYTHONPATH, then run the gpu tests, benchmarks/bench_gpu.py and, where it exists,
# benchmarks/bench_generate.py --device cuda. Logs go to $OUT/ (a temporary folder without $OUT).
#
#   [BENCH_GPU_ARGS="--skip study"] bash benchmarks/gpu_check.sh   # exit 0: every step passed; 1: a step failed or missed a
#                                           # target; 77: no CUDA device here (nothing was measured)
# Fetch the wheels once, on any machine with pip: bash benchmarks/gpu_wheels.sh (Python 3.12 manylinux wheels).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t gpu-check.XXXX)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/mergesearch-site}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { echo "gpu_check: installing the wheels in .whl/ failed (see $OUT/pip.log)"; exit 1; }
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.log"
import sys, torch, transformers, optuna, pydantic, mergesearch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| optuna", optuna.__version__, "| pydantic", pydantic.__version__)
print("mergesearch from", mergesearch.__file__)
print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "no CUDA device")
PY
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device on this machine: nothing measured"
  exit 77
fi
status=0
# bench_gpu runs the gpu tests itself (and counts a skip as a MISS); the JSON keeps every number.
timeout 420 "$PY" benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" ${BENCH_GPU_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log" || status=1
if [ -f benchmarks/bench_generate.py ]; then
  timeout 180 "$PY" benchmarks/bench_generate.py --device cuda 2>&1 | tee "$OUT/bench_generate.log" || status=1
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$OUT/nvidia-smi.csv" 2>&1 || true
echo "gpu_check: exit $status (logs in $OUT)"
exit $status
