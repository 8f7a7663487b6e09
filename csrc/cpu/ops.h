// Shared by the CPU and CUDA bindings: input validation (errors say what was wrong and how to
// fix it), the dtype dispatch, and the raw-pointer views the kernels take. Kernel math lives in
// csrc/include/ivl and is the same for both devices.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "ivl/common.h"
#include "ivl/merge.h"

namespace ivl {

// Calls f(T{}) with T the storage type of a float tensor (fp32 / bf16 / fp16).
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, const char* name, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t);
  }
}

inline bool is_float_logits(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A [B, V] logits tensor with unit stride along V (rows may have any stride). Copies only when
// the last dim is strided, e.g. a transposed view.
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

// Validated inputs of merge_logits, as the kernels see them.
struct MergeInputs {
  at::Tensor base;    // [B, Vb], stride(1) == 1
  at::Tensor value;   // [B, Vv], stride(1) == 1; undefined when no value network
  at::Tensor alpha;   // [B] fp32, any stride
  at::Tensor index;   // [Vb] int64 contiguous; undefined when no map
  at::Tensor weight;  // [Vb] fp32 contiguous; undefined when no map
  MergeParams params;
  int64_t rows, cols;  // B, Vb
};

inline MergeInputs check_merge_inputs(const at::Tensor& base,
                                      const std::optional<at::Tensor>& value,
                                      const at::Tensor& alpha,
                                      const std::optional<at::Tensor>& map_index,
                                      const std::optional<at::Tensor>& map_weight, double fill,
                                      int64_t vocab_limit, const char* op = "ivl::merge_logits") {
  TORCH_CHECK(base.dim() == 2, op, ": base must be 2-D [batch, vocab], got shape ", base.sizes(),
              "; reshape logits to [-1, vocab] (e.g. logits[:, -1, :] for the last position)");
  TORCH_CHECK(is_float_logits(base.scalar_type()), op,
              ": base must be float32, bfloat16 or float16, got ", base.scalar_type());
  const int64_t B = base.size(0), Vb = base.size(1);
  const auto dev = base.device();
  MergeInputs in;
  in.base = unit_last_stride(base);
  in.rows = B;
  in.cols = Vb;

  TORCH_CHECK(alpha.scalar_type() == at::kFloat, op, ": alpha must be float32, got ",
              alpha.scalar_type(), "; pass alpha.float()");
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == B, op, ": alpha must have shape [", B,
              "] (one value per row of base), got ", alpha.sizes(),
              "; for a scalar use torch.full((B,), a, dtype=torch.float32)");
  TORCH_CHECK(alpha.device() == dev, op, ": alpha is on ", alpha.device(), " but base is on ", dev,
              "; move it with alpha.to(base.device)");
  in.alpha = alpha;

  TORCH_CHECK(0 <= vocab_limit && vocab_limit <= Vb, op, ": vocab_limit must be in [0, ", Vb,
              "] (base has ", Vb, " columns), got ", vocab_limit);

  const bool has_map = map_index.has_value() && map_index->defined();
  const bool has_weight = map_weight.has_value() && map_weight->defined();
  TORCH_CHECK(has_map == has_weight, op,
              ": map_index and map_weight must be given together (a VocabMap's index and weight)");
  int64_t Vv = Vb;
  if (value.has_value() && value->defined()) {
    const at::Tensor& v = *value;
    TORCH_CHECK(v.dim() == 2, op, ": value must be 2-D [batch, vocab], got shape ", v.sizes());
    TORCH_CHECK(is_float_logits(v.scalar_type()), op,
                ": value must be float32, bfloat16 or float16, got ", v.scalar_type());
    TORCH_CHECK(v.size(0) == B, op, ": value has ", v.size(0), " rows but base has ", B,
                "; both must hold the same batch of sequences");
    TORCH_CHECK(v.device() == dev, op, ": value is on ", v.device(), " but base is on ", dev);
    Vv = v.size(1);
    TORCH_CHECK(has_map || Vv == Vb, op, ": value has ", Vv, " columns but base has ", Vb,
                " and no vocab map was given: build one with `ivl vocab build` or pass vocab_map=");
    in.value = unit_last_stride(v);
  }
  if (has_map) {
    const at::Tensor& idx = *map_index;
    const at::Tensor& w = *map_weight;
    TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": map_index must be int64, got ",
                idx.scalar_type(), "; pass map_index.long()");
    TORCH_CHECK(w.scalar_type() == at::kFloat, op, ": map_weight must be float32, got ",
                w.scalar_type(), "; pass map_weight.float()");
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == Vb, op, ": map_index must have shape [", Vb,
                "] (one entry per base vocab id), got ", idx.sizes(),
                "; was the map built for this base model?");
    TORCH_CHECK(w.dim() == 1 && w.size(0) == Vb, op, ": map_weight must have shape [", Vb,
                "] (one entry per base vocab id), got ", w.sizes());
    TORCH_CHECK(idx.device() == dev && w.device() == dev, op, ": the vocab map is on ",
                idx.device(), " but base is on ", dev, "; move it with .to(base.device)");
    in.index = idx.contiguous();
    in.weight = w.contiguous();
  }
  in.params = MergeParams{has_map ? in.index.data_ptr<int64_t>() : nullptr,
                          has_map ? in.weight.data_ptr<float>() : nullptr, static_cast<float>(fill),
                          vocab_limit, Vv};
  return in;
}

// A map entry >= Vv would index past the value row. One pass over the map is cheap next to the
// merge itself and turns a corrupt or mismatched map into an error instead of garbage (CPU only:
// on CUDA it would cost a device->host sync, and the kernels write NaN instead of reading).
inline void check_map_range(const at::Tensor& index, int64_t value_cols,
                            const char* op = "ivl::merge_logits") {
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t n = index.numel();
  int64_t hi = -1;
  for (int64_t i = 0; i < n; ++i) hi = std::max(hi, idx[i]);
  TORCH_CHECK(hi < value_cols, op, ": map_index contains value id ", hi, " but value has only ",
              value_cols,
              " columns; the vocab map was built for a different value model (rebuild it with "
              "`ivl vocab build`)");
}

inline void check_philox_inputs(const at::Tensor& seed, const at::Tensor& step, int64_t vocab) {
  constexpr const char* op = "ivl::philox_uniform";
  TORCH_CHECK(seed.scalar_type() == at::kLong && step.scalar_type() == at::kLong, op,
              ": seed and step must be int64, got ", seed.scalar_type(), " and ",
              step.scalar_type());
  TORCH_CHECK(seed.dim() == 1 && step.dim() == 1 && seed.size(0) == step.size(0), op,
              ": seed and step must both have shape [B] (one per row), got ", seed.sizes(), " and ",
              step.sizes());
  TORCH_CHECK(seed.device() == step.device(), op, ": seed is on ", seed.device(),
              " but step is on ", step.device());
  TORCH_CHECK(vocab >= 0, op, ": vocab must be >= 0, got ", vocab);
}

// torch's 16-bit float types -> the framework-free storage types with the same bits.
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<c10::BFloat16> {
  using type = bf16;
};
template <>
struct Storage<c10::Half> {
  using type = fp16;
};
static_assert(sizeof(bf16) == sizeof(c10::BFloat16) && sizeof(fp16) == sizeof(c10::Half));

// Calls f(TB{}, TV{}) with the framework-free storage types of base and value.
template <typename F>
void dispatch_pair(const MergeInputs& in, const char* op, F&& f) {
  dispatch_float(in.base.scalar_type(), op, "base", [&](auto tb) {
    using TB = typename Storage<decltype(tb)>::type;
    if (!in.value.defined()) return f(TB{}, float{});
    dispatch_float(in.value.scalar_type(), op, "value", [&](auto tv) {
      using TV = typename Storage<decltype(tv)>::type;
      f(TB{}, TV{});
    });
  });
}

// A [B] per-row parameter of merge_sample (the sampling settings, seed, step).
inline void check_param(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows,
                        const at::Device& dev) {
  constexpr const char* op = "ivl::merge_sample";
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape [", rows,
              "] (one value per row), got ", t.sizes(),
              "; for a scalar use torch.full((B,), x) or ivl.ops.merge_sample");
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but base is on ", dev);
}

// All per-row parameters of merge_sample (CPU and CUDA entry points).
inline void check_sample_params(const at::Tensor& temperature, const at::Tensor& top_k,
                                const at::Tensor& top_p, const at::Tensor& min_p,
                                const at::Tensor& seed, const at::Tensor& step, int64_t rows,
                                const at::Device& dev) {
  check_param(temperature, "temperature", at::kFloat, rows, dev);
  check_param(top_k, "top_k", at::kLong, rows, dev);
  check_param(top_p, "top_p", at::kFloat, rows, dev);
  check_param(min_p, "min_p", at::kFloat, rows, dev);
  check_param(seed, "seed", at::kLong, rows, dev);
  check_param(step, "step", at::kLong, rows, dev);
}

}  // namespace ivl
