// CPU implementations of the ivl ops and the one place their schemas are written.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "ivl/merge.h"
#include "ivl/philox.h"
#include "ops.h"

namespace ivl {
namespace {

// Elements per parallel task: below this a task costs more to hand out than to run, so a single
// 32k-vocab row (the per-token decode case) stays on the calling thread.
constexpr int64_t kGrain = 1 << 15;

at::Tensor merge_logits_cpu(const at::Tensor& base, const std::optional<at::Tensor>& value,
                            const at::Tensor& alpha, const std::optional<at::Tensor>& map_index,
                            const std::optional<at::Tensor>& map_weight, double fill,
                            int64_t vocab_limit) {
  MergeInputs in = check_merge_inputs(base, value, alpha, map_index, map_weight, fill, vocab_limit);
  const bool has_value = in.value.defined();
  if (has_value && in.index.defined()) check_map_range(in.index, in.params.value_cols);

  const int64_t B = in.rows, Vb = in.cols;
  at::Tensor out = at::empty({B, Vb}, base.options().dtype(at::kFloat));  // [B, Vb]
  if (out.numel() == 0) return out;

  const float* alpha_p = in.alpha.data_ptr<float>();
  const int64_t alpha_stride = in.alpha.stride(0);
  const int64_t base_stride = in.base.stride(0);
  const int64_t value_stride = has_value ? in.value.stride(0) : 0;
  float* out_p = out.data_ptr<float>();
  const MergeParams params = in.params;

  dispatch_float(in.base.scalar_type(), "ivl::merge_logits", "base", [&](auto tb) {
    using TB = decltype(tb);
    const TB* base_p = static_cast<const TB*>(in.base.data_ptr());
    auto run = [&](auto tv) {
      using TV = decltype(tv);
      const TV* value_p = has_value ? static_cast<const TV*>(in.value.data_ptr()) : nullptr;
      // Flat range over B * Vb so one long row is split across threads as well as many rows.
      at::parallel_for(0, B * Vb, kGrain, [&](int64_t begin, int64_t end) {
        // A local copy: the kernel's stores can't alias it, so its fields stay in registers.
        const MergeParams p = params;
        for (int64_t r = begin / Vb; r * Vb < end; ++r) {
          const int64_t c0 = std::max<int64_t>(begin - r * Vb, 0);
          const int64_t c1 = std::min<int64_t>(end - r * Vb, Vb);
          const TV* value_row = value_p ? value_p + r * value_stride : nullptr;
          merge_span(base_p + r * base_stride, value_row, alpha_p[r * alpha_stride], p, c0, c1,
                     out_p + r * Vb);
        }
      });
    };
    if (has_value) {
      dispatch_float(in.value.scalar_type(), "ivl::merge_logits", "value", run);
    } else {
      run(float{});
    }
  });
  return out;
}

at::Tensor philox_uniform_cpu(const at::Tensor& seed, const at::Tensor& step, int64_t vocab) {
  check_philox_inputs(seed, step, vocab);
  const int64_t B = seed.size(0);
  at::Tensor out = at::empty({B, vocab}, seed.options().dtype(at::kFloat));  // [B, vocab]
  if (out.numel() == 0) return out;
  const int64_t* seed_p = seed.data_ptr<int64_t>();
  const int64_t* step_p = step.data_ptr<int64_t>();
  const int64_t seed_stride = seed.stride(0), step_stride = step.stride(0);
  float* out_p = out.data_ptr<float>();
  const int64_t groups = (vocab + 3) / 4;  // one Philox call fills 4 vocab ids

  at::parallel_for(0, B * groups, kGrain / 4, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r = k / groups, g = k % groups;
      const Philox4x32 x = philox_group(seed_p[r * seed_stride], step_p[r * step_stride], g);
      float* row = out_p + r * vocab;
      for (int64_t j = 0; j < 4 && 4 * g + j < vocab; ++j) row[4 * g + j] = bits_to_uniform(x.v[j]);
    }
  });
  return out;
}

}  // namespace
}  // namespace ivl

TORCH_LIBRARY(ivl, m) {
  // merged[r, b] = base[r, b] + alpha[r] * w[b] * value[r, index[b]] (fp32), -inf for
  // b >= vocab_limit; see csrc/include/ivl/merge.h for the exact rule.
  m.def(
      "merge_logits(Tensor base, Tensor? value, Tensor alpha, Tensor? map_index, "
      "Tensor? map_weight, float fill, int vocab_limit) -> Tensor");
  // The RNG stream every sampler draws from: out[r, v] = uniform(seed[r], step[r], v) in (0, 1].
  m.def("philox_uniform(Tensor seed, Tensor step, int vocab) -> Tensor");
  // log_softmax of the merged logits, fp32 [B, Vb]; NaN rows where the merged row is invalid.
  m.def(
      "merged_log_softmax(Tensor base, Tensor? value, Tensor alpha, Tensor? map_index, "
      "Tensor? map_weight, float fill, int vocab_limit) -> Tensor");
  // Merge, filter and sample one token per row (csrc/include/ivl/sample.h). Per-row [B] params:
  // temperature, top_p, min_p fp32; top_k, seed, step int64. tokens int64 [B] (-1: invalid row),
  // logprobs fp32 [B] (log_softmax of the merged row at the token; NaN when invalid or when
  // want_logprobs is false, which skips the log-sum-exp work).
  m.def(
      "merge_sample(Tensor base, Tensor? value, Tensor alpha, Tensor? map_index, "
      "Tensor? map_weight, float fill, int vocab_limit, Tensor temperature, Tensor top_k, "
      "Tensor top_p, Tensor min_p, Tensor seed, Tensor step, bool want_logprobs=True) "
      "-> (Tensor tokens, Tensor logprobs)");
  // y = x weight^T (+ bias), x [M, K], weight [N, K], one dtype (fp32 / bf16 / fp16; fp32
  // products): the linears of a CPU decode step (few rows; csrc/include/ivl/linear_cpu.h).
  // Each element's result is independent of M.
  m.def("narrow_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // The fake (meta) impls are registered from Python; torch imports this module to find them.
  m.set_python_module("ivl.ops._native");
}

TORCH_LIBRARY_IMPL(ivl, CPU, m) {
  m.impl("merge_logits", &ivl::merge_logits_cpu);
  m.impl("philox_uniform", &ivl::philox_uniform_cpu);
}
