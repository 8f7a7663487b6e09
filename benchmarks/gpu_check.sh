#!/usr/bin/env bash
# The prepared GPU check (one run on a lent CUDA machine, about 5 minutes, 8 at most):
#   1. build ivl._C with its CUDA kernels against the machine's torch, for its GPU's arch,
#   2. run the GPU suite (`pytest -m gpu`: the CUDA merge_sample / merged_log_softmax /
#      merge_logits kernels and the Triton kernels against the reference and the CPU kernels,
#      1e6-draw distribution checks, torch.compile of the Triton ops; the engine on the GPU when
#      benchmarks/gpu_prepare.sh packed the project's transformers into .gpu/),
#   3. break the CUDA merge_sample down by kernel (torch.profiler; Nsight Compute if present),
#   4. run the kernel benchmarks with the GPU providers (--gpu),
# and leave the log, the test report and the CSV files under $OUT (default: out/gpu).
# Device tool usage (after `bash benchmarks/gpu_prepare.sh` here):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540)
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
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'capability', torch.cuda.get_device_capability())"; } 2>&1 | tee -a "$log"
# Packed by benchmarks/gpu_prepare.sh (carry ".gpu"): the project's transformers and the tiny
# models' tokenizer, for the engine's GPU tests; without them those tests skip.
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/ivl-site .gpu/whl/*.whl \
    && export PYTHONPATH=/tmp/ivl-site:$PYTHONPATH
fi
if [ -d .gpu/cache ]; then export IVL_CACHE=$PWD/.gpu/cache; fi
# Build for this GPU only (one arch: half the nvcc time of torch's default list).
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export TORCH_CUDA_ARCH_LIST

step "build ivl._C with CUDA kernels (arch $TORCH_CUDA_ARCH_LIST)"
timeout 200 $PY setup.py build_ext --inplace >>"$log" 2>&1 || { echo "build failed" | tee -a "$log"; status=1; }
tail -3 "$log"
$PY -c "import ivl.ops._native as n; print('native:', n.AVAILABLE, n.REASON, 'cuda kernels:', n.HAS_CUDA)" 2>&1 | tee -a "$log"

step "GPU test suite"
xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n 4"  # the CPU references run in parallel
timeout 120 $PY -m pytest -m gpu -q -p no:cacheprovider $xdist --junitxml="$OUT/gpu_tests.xml" \
  tests/test_cuda_ops.py tests/test_native.py tests/test_triton.py tests/test_engine_gpu.py 2>&1 \
  | tee -a "$log" || status=1

step "where the CUDA merge_sample spends its time (per kernel; Nsight Compute where it runs)"
timeout 60 $PY -m benchmarks.profile_merge_sample_cuda 2>&1 | tee -a "$log" || status=1
if command -v ncu >/dev/null; then
  timeout 90 ncu --clock-control none -k 'regex:span_kernel|finish_kernel|race_kernel' -c 4 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    $PY -m benchmarks.profile_merge_sample_cuda --once >"$OUT/ncu.txt" 2>&1
  echo "ncu exit $? (report in ncu.txt)" | tee -a "$log"
fi

step "kernel benchmarks"
timeout 30 $PY -m benchmarks.bench_merge_logits --gpu 2>&1 | tee -a "$log" || status=1
timeout 150 $PY -m benchmarks.bench_merge_sample --gpu 2>&1 | tee -a "$log" || status=1
for f in merge_sample merge_logits merge_sample_kernels; do
  cp "benchmarks/results/$f.csv" "$OUT"/ 2>/dev/null
done
step "done (status $status)"
exit $status
