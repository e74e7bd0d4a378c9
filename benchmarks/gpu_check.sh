#!/usr/bin/env bash
# One prepared GPU check for gradsel's Triton kernels (target: < 5 min on an H200, machine start aside).
#   0. make gradsel importable: `pip install --no-deps --no-build-isolation -e .`, else (no pip, no
#      setuptools) lay out the import path by hand (the repo root and kernels/ on PYTHONPATH); checked by
#      importing gradsel_core and gradsel_kernels from outside the repo before anything runs,
#   1. the kernel tests compiled on CUDA (tests/test_kernels.py and tests/test_kernels_head.py with
#      GRADSEL_KERNEL_DEVICE=cuda), on 4 workers when pytest-xdist is installed,
#   2. bench_kernels.py --check (every kernel vs torch at benchmark sizes),
#   3. bench_kernels.py --quick (kernels + end-to-end), writing benchmarks/results/gpu-*.json.
# Step limits add up to 300 s. Logs and results are copied to $OUT when it is set.
# Run from anywhere: bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
unset TRITON_INTERPRET
export TOKENIZERS_PARALLELISM=false
LOG_DIR="benchmarks/results"
mkdir -p "$LOG_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOG="$LOG_DIR/gpu-check-$STAMP.log"
rc=0
T0=$SECONDS

run() {  # run <seconds> <cmd...>: time-boxed, output to the console and the log
  local limit="$1"; shift
  local t=$SECONDS
  echo "== $* (limit ${limit}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local r=${PIPESTATUS[0]}
  echo "== exit $r after $((SECONDS - t))s" | tee -a "$LOG"
  [ "$r" -eq 0 ] || rc=1
}

importable() {  # both packages import from outside the repo (so the repo root on sys.path is no help)
  (cd /tmp && python -c "import gradsel_core, gradsel_kernels" >/dev/null 2>&1)
}

# 0. gradsel importable (gradsel_kernels exists only through setup.py's package_dir, or kernels/ on the path)
if ! importable; then
  echo "== installing gradsel (pip install --no-deps --no-build-isolation -e .)" | tee -a "$LOG"
  timeout 120 python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 5 | tee -a "$LOG"
fi
if ! importable; then
  echo "== pip install did not make gradsel importable: using PYTHONPATH=$REPO:$REPO/kernels" | tee -a "$LOG"
  export PYTHONPATH="$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! importable; then
  (cd /tmp && python -c "import gradsel_core, gradsel_kernels") 2>&1 | tee -a "$LOG"
  echo "gpu_check: gradsel_core / gradsel_kernels do not import; nothing else can run" | tee -a "$LOG"
  rc=1
fi

python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG" || true

if [ "$rc" -eq 0 ]; then
  XDIST=()
  if python -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4); fi
  GRADSEL_KERNEL_DEVICE=cuda run 110 python -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests/test_kernels.py tests/test_kernels_head.py
  run 50 python benchmarks/bench_kernels.py --check
  run 140 python benchmarks/bench_kernels.py --quick
fi

echo "gpu_check: exit $rc after $((SECONDS - T0))s (log: $LOG)" | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$LOG" "$OUT"/ 2>/dev/null || true
  cp "$LOG_DIR"/gpu-*.json "$OUT"/ 2>/dev/null || true
fi
exit $rc
