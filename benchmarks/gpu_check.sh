#!/usr/bin/env bash
# One prepared GPU check for gradsel's Triton kernels (target: < 8 min on an H200).
#   1. the kernel tests compiled on CUDA (tests/test_kernels.py with GRADSEL_KERNEL_DEVICE=cuda),
#   2. bench_kernels.py --check (every kernel vs torch at benchmark sizes),
#   3. bench_kernels.py --quick (kernels + end-to-end), writing benchmarks/results/gpu-*.json.
# Logs and results are copied to $OUT when it is set. Run from anywhere: bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
LOG_DIR="benchmarks/results"
mkdir -p "$LOG_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOG="$LOG_DIR/gpu-check-$STAMP.log"
rc=0

run() {  # run <seconds> <cmd...>: time-boxed, output to the console and the log
  local limit="$1"; shift
  echo "== $* (limit ${limit}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local r=${PIPESTATUS[0]}
  echo "== exit $r" | tee -a "$LOG"
  [ "$r" -eq 0 ] || rc=1
}

python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG" || true

GRADSEL_KERNEL_DEVICE=cuda run 150 python -m pytest -q -p no:cacheprovider tests/test_kernels.py
run 60 python benchmarks/bench_kernels.py --check
run 210 python benchmarks/bench_kernels.py --quick

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$LOG" "$OUT"/ 2>/dev/null || true
  cp "$LOG_DIR"/gpu-*.json "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check: exit $rc (log: $LOG)"
exit $rc
