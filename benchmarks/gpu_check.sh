#!/usr/bin/env bash
# The prepared GPU check (one run on a lent CUDA machine, < 8 minutes):
#   1. build ivl._C with its CUDA kernels against the machine's torch,
#   2. run the GPU suite (`pytest -m gpu`: CUDA and Triton kernels against the reference),
#   3. run the merge/sample kernel benchmarks with the GPU providers,
# and leave the log and the CSV rows under $OUT (default: out/gpu).
# Device tool usage:  run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
log="$OUT/gpu_check.log"
status=0
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$log"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \
  "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  2>&1 | tee -a "$log"

step "build ivl._C with CUDA kernels"
timeout 240 $PY setup.py build_ext --inplace >>"$log" 2>&1 || { echo "build failed" | tee -a "$log"; status=1; }
$PY -c "import ivl.ops._native as n; print('native:', n.AVAILABLE, n.REASON, 'cuda kernels:', n.HAS_CUDA)" 2>&1 | tee -a "$log"

step "GPU test suite"
timeout 200 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_native.py tests/test_triton.py \
  $(ls tests/test_merge_sample.py tests/test_merged_log_softmax.py 2>/dev/null) 2>&1 | tee -a "$log" || status=1

step "kernel benchmarks"
for bench in bench_merge_logits bench_merge_sample; do
  [ -f "benchmarks/$bench.py" ] || continue
  timeout 150 $PY -m "benchmarks.$bench" --gpu 2>&1 | tee -a "$log" || status=1
done
cp benchmarks/results/*.csv "$OUT"/ 2>/dev/null
step "done (status $status)"
exit $status
