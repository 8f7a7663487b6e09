// Compile check of the framework-free CUDA kernels without torch: instantiates every launcher
// for every storage-type pair. Built by `cmake -DIVL_CUDA_CHECK=ON` (target cuda_compile_check)
// or `nvcc -c`; tests/test_cuda_compile.py runs it when nvcc is on PATH.
#include "ivl/common.h"
#include "ivl/sample_cuda.cuh"

namespace {

template <typename TB, typename TV>
void instantiate() {
  ivl::cuda::Rows<TB, TV> x{};
  ivl::cuda::Params pp{};
  ivl::cuda::SampleScratch s{};
  (void)ivl::cuda::launch_merge_sample(x, pp, true, s, nullptr, nullptr, cudaStream_t{});
  (void)ivl::cuda::launch_merged_log_softmax(x, nullptr, nullptr, cudaStream_t{});
}

template <typename TB>
void instantiate_all_values() {
  instantiate<TB, float>();
  instantiate<TB, ivl::bf16>();
  instantiate<TB, ivl::fp16>();
}

}  // namespace

void ivl_cuda_compile_check() {
  instantiate_all_values<float>();
  instantiate_all_values<ivl::bf16>();
  instantiate_all_values<ivl::fp16>();
}
