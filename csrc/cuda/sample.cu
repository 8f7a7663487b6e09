// CUDA merge_sample and merged_log_softmax: validation and dtype dispatch around the
// framework-free kernels of csrc/include/ivl/sample_cuda.cuh, launched on the current stream.
// Schemas are in csrc/cpu/ops.cpp. The vocabulary map is not range-checked here (that would
// cost a device->host sync per step): an out-of-range entry merges to NaN and its row comes out
// invalid (token -1), never an out-of-bounds read.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../cpu/ops.h"
#include "ivl/sample_cuda.cuh"

namespace ivl {
namespace {

template <typename TB, typename TV>
cuda::Rows<TB, TV> cuda_rows(const MergeInputs& in) {
  const bool has_value = in.value.defined();
  return cuda::Rows<TB, TV>{static_cast<const TB*>(in.base.data_ptr()),
                            in.base.stride(0),
                            has_value ? static_cast<const TV*>(in.value.data_ptr()) : nullptr,
                            has_value ? in.value.stride(0) : 0,
                            in.alpha.data_ptr<float>(),
                            in.alpha.stride(0),
                            in.params,
                            in.rows,
                            in.cols};
}

// One uint8 buffer carved into aligned pieces (one caching-allocator call per step).
struct Carver {
  char* p;
  template <typename T>
  T* take(int64_t n) {
    T* out = reinterpret_cast<T*>(p);
    p += (n * static_cast<int64_t>(sizeof(T)) + 255) / 256 * 256;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> merge_sample_cuda(
    const at::Tensor& base, const std::optional<at::Tensor>& value, const at::Tensor& alpha,
    const std::optional<at::Tensor>& map_index, const std::optional<at::Tensor>& map_weight,
    double fill, int64_t vocab_limit, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
    const at::Tensor& step, bool want_logprobs) {
  constexpr const char* op = "ivl::merge_sample";
  MergeInputs in =
      check_merge_inputs(base, value, alpha, map_index, map_weight, fill, vocab_limit, op);
  const int64_t B = in.rows, V = in.cols;
  const auto dev = base.device();
  check_sample_params(temperature, top_k, top_p, min_p, seed, step, B, dev);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor tokens = at::empty({B}, base.options().dtype(at::kLong));     // [B]
  at::Tensor logprobs = at::empty({B}, base.options().dtype(at::kFloat));  // [B]
  if (B == 0) return {tokens, logprobs};
  if (V == 0) {  // no distribution at all
    tokens.fill_(kInvalidToken);
    logprobs.fill_(NAN);
    return {tokens, logprobs};
  }
  // Which rows have filters lives on the device: the scratch row is allocated for every row.
  const int64_t spans = cuda::num_spans(V);
  const int64_t bytes = (B * V * 4 + 255) / 256 * 256 + 2 * ((B * spans * 64 + 255) / 256 * 256) +
                        (B * 64 + 255) / 256 * 256 + (B * 4 + 255) / 256 * 256 + 1024;
  static_assert(sizeof(RowStats) <= 64 && sizeof(RaceBest) <= 64, "scratch layout");
  at::Tensor buf = at::empty({bytes}, base.options().dtype(at::kByte));
  Carver c{static_cast<char*>(buf.data_ptr())};
  cuda::SampleScratch s;
  s.rows = c.take<float>(B * V);
  s.parts = c.take<RowStats>(B * spans);
  s.race_parts = c.take<RaceBest>(B * spans);
  s.stats = c.take<RowStats>(B);
  s.tau = c.take<float>(B);
  const cuda::Params pp{temperature.data_ptr<float>(),
                        top_k.data_ptr<int64_t>(),
                        top_p.data_ptr<float>(),
                        min_p.data_ptr<float>(),
                        seed.data_ptr<int64_t>(),
                        step.data_ptr<int64_t>(),
                        {temperature.stride(0), top_k.stride(0), top_p.stride(0), min_p.stride(0),
                         seed.stride(0), step.stride(0)}};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(in, op, [&](auto tb, auto tv) {
    using TB = decltype(tb);
    using TV = decltype(tv);
    C10_CUDA_CHECK(cuda::launch_merge_sample(cuda_rows<TB, TV>(in), pp, want_logprobs, s,
                                             tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                                             stream));
  });
  return {tokens, logprobs};
}

at::Tensor merged_log_softmax_cuda(const at::Tensor& base, const std::optional<at::Tensor>& value,
                                   const at::Tensor& alpha,
                                   const std::optional<at::Tensor>& map_index,
                                   const std::optional<at::Tensor>& map_weight, double fill,
                                   int64_t vocab_limit) {
  constexpr const char* op = "ivl::merged_log_softmax";
  MergeInputs in =
      check_merge_inputs(base, value, alpha, map_index, map_weight, fill, vocab_limit, op);
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out = at::empty({in.rows, in.cols}, base.options().dtype(at::kFloat));  // [B, Vb]
  if (out.numel() == 0) return out;
  at::Tensor parts = at::empty({in.rows * cuda::num_spans(in.cols) * 64},
                               base.options().dtype(at::kByte));  // [B, spans] RowStats
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(in, op, [&](auto tb, auto tv) {
    using TB = decltype(tb);
    using TV = decltype(tv);
    C10_CUDA_CHECK(cuda::launch_merged_log_softmax(cuda_rows<TB, TV>(in),
                                                   reinterpret_cast<RowStats*>(parts.data_ptr()),
                                                   out.data_ptr<float>(), stream));
  });
  return out;
}

}  // namespace
}  // namespace ivl

TORCH_LIBRARY_IMPL(ivl, CUDA, m) {
  m.impl("merge_sample", &ivl::merge_sample_cuda);
  m.impl("merged_log_softmax", &ivl::merged_log_softmax_cuda);
}
