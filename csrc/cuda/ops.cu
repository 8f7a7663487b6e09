// CUDA implementations of the ivl ops (schemas are defined once, in csrc/cpu/ops.cpp). Same
// math as the CPU path (csrc/include/ivl), launched on the current stream, int64 offsets.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../cpu/ops.h"
#include "ivl/merge.h"
#include "ivl/philox.h"

namespace ivl {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;  // rows beyond this are covered by a grid-stride loop

// One thread per (row, base id); x covers columns, y covers rows, both grid-stride.
template <typename TB, typename TV>
__global__ void merge_kernel(const TB* __restrict__ base,    // [B, Vb], row stride base_stride
                             int64_t base_stride,
                             const TV* __restrict__ value,   // [B, Vv] or nullptr
                             int64_t value_stride,
                             const float* __restrict__ alpha,  // [B], stride alpha_stride
                             int64_t alpha_stride, MergeParams p, int64_t B, int64_t Vb,
                             float* __restrict__ out) {  // [B, Vb] contiguous
  const int64_t col_step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < B; r += gridDim.y) {
    const TB* base_row = base + r * base_stride;
    const TV* value_row = value ? value + r * value_stride : nullptr;
    const float a = alpha[r * alpha_stride];
    float* out_row = out + r * Vb;
    for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < Vb; b += col_step) {
      out_row[b] = merge_one(base_row, value_row, a, b, p);
    }
  }
}

// One thread per (row, group of 4 vocab ids): one Philox call yields 4 uniforms.
__global__ void philox_kernel(const int64_t* __restrict__ seed, int64_t seed_stride,  // [B]
                              const int64_t* __restrict__ step, int64_t step_stride,  // [B]
                              int64_t B, int64_t vocab,
                              float* __restrict__ out) {  // [B, vocab] contiguous
  const int64_t groups = (vocab + 3) / 4;
  const int64_t g_step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < B; r += gridDim.y) {
    const int64_t s = seed[r * seed_stride], t = step[r * step_stride];
    for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += g_step) {
      const Philox4x32 x = philox_group(s, t, g);
      float* row = out + r * vocab;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (4 * g + j < vocab) row[4 * g + j] = bits_to_uniform(x.v[j]);
      }
    }
  }
}

dim3 grid_for(int64_t rows, int64_t cols) {
  // Enough column blocks to fill the GPU for one long row; capped so B * blocks stays sane.
  const int64_t col_blocks = std::min<int64_t>((cols + kThreads - 1) / kThreads, 4096);
  return dim3(static_cast<unsigned>(std::max<int64_t>(col_blocks, 1)),
              static_cast<unsigned>(std::min(rows, kMaxGridY)));
}

at::Tensor merge_logits_cuda(const at::Tensor& base, const std::optional<at::Tensor>& value,
                             const at::Tensor& alpha, const std::optional<at::Tensor>& map_index,
                             const std::optional<at::Tensor>& map_weight, double fill,
                             int64_t vocab_limit) {
  // Map entries >= Vv are not checked here (that would need a device->host sync per call); the
  // kernel writes NaN for them instead of reading out of bounds. The CPU op raises.
  MergeInputs in = check_merge_inputs(base, value, alpha, map_index, map_weight, fill, vocab_limit);
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t B = in.rows, Vb = in.cols;
  at::Tensor out = at::empty({B, Vb}, base.options().dtype(at::kFloat));  // [B, Vb]
  if (out.numel() == 0) return out;
  const bool has_value = in.value.defined();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float(in.base.scalar_type(), "ivl::merge_logits", "base", [&](auto tb) {
    using TB = decltype(tb);
    auto launch = [&](auto tv) {
      using TV = decltype(tv);
      merge_kernel<TB, TV><<<grid_for(B, Vb), kThreads, 0, stream>>>(
          static_cast<const TB*>(in.base.data_ptr()), in.base.stride(0),
          has_value ? static_cast<const TV*>(in.value.data_ptr()) : nullptr,
          has_value ? in.value.stride(0) : 0, in.alpha.data_ptr<float>(), in.alpha.stride(0),
          in.params, B, Vb, out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (has_value) {
      dispatch_float(in.value.scalar_type(), "ivl::merge_logits", "value", launch);
    } else {
      launch(float{});
    }
  });
  return out;
}

at::Tensor philox_uniform_cuda(const at::Tensor& seed, const at::Tensor& step, int64_t vocab) {
  check_philox_inputs(seed, step, vocab);
  const c10::cuda::CUDAGuard guard(seed.device());
  const int64_t B = seed.size(0);
  at::Tensor out = at::empty({B, vocab}, seed.options().dtype(at::kFloat));  // [B, vocab]
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  philox_kernel<<<grid_for(B, (vocab + 3) / 4), kThreads, 0, stream>>>(
      seed.data_ptr<int64_t>(), seed.stride(0), step.data_ptr<int64_t>(), step.stride(0), B, vocab,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace ivl

TORCH_LIBRARY_IMPL(ivl, CUDA, m) {
  m.impl("merge_logits", &ivl::merge_logits_cuda);
  m.impl("philox_uniform", &ivl::philox_uniform_cuda);
}
