#!/usr/bin/env bash
# The prepared GPU check (one run on a lent CUDA machine, < 8 minutes):
#   1. build ivl._C with its CUDA kernels against the machine's torch,
#   2. run the GPU suite (`pytest -m gpu`: the CUDA merge_sample / merged_log_softmax /
#      merge_logits kernels and the Triton kernels against the reference),
#   3. run the merge/sample kernel benchmarks with the GPU providers (--gpu),
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
timeout 200 $PY setup.py build_ext --inplace >>"$log" 2>&1 || { echo "build failed" | tee -a "$log"; status=1; }
$PY -c "import ivl.ops._native as n; print('native:', n.AVAILABLE, n.REASON, 'cuda kernels:', n.HAS_CUDA)" 2>&1 | tee -a "$log"

step "GPU test suite"
timeout 100 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_cuda_ops.py tests/test_native.py \
  tests/test_triton.py tests/test_merge_sample.py tests/test_merged_log_softmax.py 2>&1 | tee -a "$log" || status=1

step "kernel benchmarks"
# Budget (s): build 200 + tests 100 + benches 40 + 130 = 470 < 480, the 8-minute limit.
timeout 40 $PY -m benchmarks.bench_merge_logits --gpu 2>&1 | tee -a "$log" || status=1
timeout 130 $PY -m benchmarks.bench_merge_sample --gpu 2>&1 | tee -a "$log" || status=1
cp benchmarks/results/*.csv "$OUT"/ 2>/dev/null
step "done (status $status)"
exit $status
