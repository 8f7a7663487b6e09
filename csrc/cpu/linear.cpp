// CPU narrow_linear: y = x W^T (+ bias) for the few rows of a decode step, with the kernel of
// csrc/include/ivl/linear_cpu.h: fp32, bf16 or fp16 (one dtype for x, weight, bias and y;
// fp32 products). Schema in ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "ivl/linear_cpu.h"

namespace ivl {
namespace {

// Multiply-adds per parallel task, at least: below this a task costs more to hand out than to
// run (tiny test models), so small products stay on the calling thread.
constexpr int64_t kLinearGrain = 1 << 16;

bool is_linear_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

at::Tensor narrow_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "ivl::narrow_linear";
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, op, ": x must be [M, K] and weight [N, K], got ",
              x.sizes(), " and ", weight.sizes(), " (flatten x's leading dims first)");
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(is_linear_dtype(dtype) && weight.scalar_type() == dtype, op,
              ": x and weight must have one dtype among float32, bfloat16 and float16, got ", dtype,
              " and ", weight.scalar_type(), " (use torch.nn.functional.linear for other dtypes)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, op, ": x has ", K, " features but weight expects ",
              weight.size(1));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == dtype, op,
                ": bias must be ", dtype, " [", N, "], got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  if (!cpu::cpu_has_avx2_fma()) {
    // Same contract with BLAS (weight as the left operand): fp32 products, rounded once. 16-bit
    // weights are widened per call here, so callers route 16-bit models only where the kernel
    // runs (ivl/engine/concurrent.py).
    const at::Tensor w32 = weight.to(at::kFloat), x32 = x.to(at::kFloat);
    at::Tensor y = at::mm(w32, x32.t()).t();
    if (has_bias) y = y + bias->to(at::kFloat);
    return y.contiguous().to(dtype);
  }
  // fp32 activations with unit stride along K (any row stride: a view of a wider buffer is
  // used in place); 16-bit ones are widened here, once (M x K values, small next to W).
  const at::Tensor xs =
      (dtype == at::kFloat && x.stride(1) == 1) ? x : x.to(at::kFloat).contiguous();
  const at::Tensor ws = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor bs = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));  // [M, N] fp32
  if (y.numel() == 0) return y.to(dtype);
  if (K == 0) return (has_bias ? y.copy_(bs.expand({M, N})) : y.zero_()).to(dtype);

  const float* xp = xs.data_ptr<float>();
  const float* bp = has_bias ? bs.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldx = xs.stride(0), ldw = ws.stride(0);
  // Tasks are runs of whole tiles of outputs, so each thread streams one slab of the weight.
  const int64_t tiles = (N + cpu::kTileCols - 1) / cpu::kTileCols;
  const int64_t grain = std::max<int64_t>(1, kLinearGrain / (M * K * cpu::kTileCols));
  auto run = [&](const auto* wp) {
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      cpu::narrow_linear_avx2(xp, ldx, wp, ldw, bp, yp, N, M, K, begin * cpu::kTileCols,
                              std::min(end * cpu::kTileCols, N));
    });
  };
  const void* wp = ws.data_ptr();
  if (dtype == at::kFloat) {
    run(static_cast<const float*>(wp));
    return y;
  }
  if (dtype == at::kBFloat16) {
    run(static_cast<const bf16*>(wp));
  } else {
    run(static_cast<const fp16*>(wp));
  }
  return y.to(dtype);  // rounded once, to nearest even
}

}  // namespace
}  // namespace ivl

TORCH_LIBRARY_IMPL(ivl, CPU, m) { m.impl("narrow_linear", &ivl::narrow_linear_cpu); }
