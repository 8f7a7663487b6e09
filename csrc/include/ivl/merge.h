// The merge rule of Inverse Value Learning: merged = base + alpha * weight * value[map], per
// (row, base id), computed in fp32 with every product rounded before the add, so all backends
// agree bit for bit with the PyTorch reference (ivl/ops/reference.py is the spec).
#pragma once

#include <cmath>
#include <cstdint>

#include "ivl/common.h"

namespace ivl {

// Per-call constants of a merge (everything that is not per row).
struct MergeParams {
  const int64_t* map_index;  // [Vb] value id of each base id, < 0 = unmapped; nullptr = identity
  const float* map_weight;   // [Vb] weight of each mapped pair; nullptr iff map_index is
  float fill;                // added (times alpha) to unmapped base ids
  int64_t vocab_limit;       // base ids >= this are padding: -inf, never sampled
  int64_t value_cols;        // Vv, bounds the map: an out-of-range id yields NaN, never a read
};

// Merged logit of base id b in one row. TB / TV are the storage types of base and value
// (float, bf16, fp16 or anything with an exact conversion to float). value_row == nullptr means
// "no value network": the base logits pass through (vocab_limit still applies).
template <typename TB, typename TV>
IVL_HOST_DEVICE inline float merge_one(const TB* base_row,   // [Vb]
                                       const TV* value_row,  // [Vv] or nullptr
                                       float alpha, int64_t b, const MergeParams& p) {
  if (b >= p.vocab_limit) return -INFINITY;
  const float z = static_cast<float>(base_row[b]);
  if (value_row == nullptr) return z;
  float s = alpha;
  int64_t vi = b;
  if (p.map_index != nullptr) {
    const int64_t i = p.map_index[b];
    if (i < 0) {
      const float t = mul_rn(alpha, p.fill);
      return t == 0.0f ? z : add_rn(z, t);
    }
    if (i >= p.value_cols) return NAN;  // a corrupt map must not read out of bounds
    s = mul_rn(alpha, p.map_weight[b]);
    vi = i;
  }
  // s == 0 skips the value entirely: alpha = 0 (or weight 0) ignores inf / NaN value logits
  // instead of producing 0 * inf = NaN.
  if (s == 0.0f) return z;
  return add_rn(z, mul_rn(s, static_cast<float>(value_row[vi])));
}

// merge_one over base ids [begin, end) of one row into out[0, end - begin), bit-identical to
// calling it per id. The loops are restructured so compilers vectorise them: alpha is fixed per
// row, and the mapped case selects between precomputed results instead of branching. There the
// random gather from the value row dominates (a 150k-vocab fp32 row overflows L2), so on the host
// the value of the id kPrefetchAhead positions on is prefetched, keeping many misses in flight.
// The value index is clamped before the load, so unmapped and out-of-range ids never read
// outside the value row.
template <typename TB, typename TV>
IVL_HOST_DEVICE inline void merge_span_into(const TB* base_row,   // [Vb]
                                            const TV* value_row,  // [Vv] or nullptr
                                            float alpha, const MergeParams& p, int64_t begin,
                                            int64_t end,
                                            float* out) {  // [end - begin]
  const int64_t stop = end < p.vocab_limit ? end : p.vocab_limit;
  if (value_row != nullptr && p.map_index != nullptr) {
    const float t = mul_rn(alpha, p.fill);  // the unmapped term, same for every id
    for (int64_t b = begin; b < stop; ++b) {
#if !defined(__CUDA_ARCH__) && (defined(__GNUC__) || defined(__clang__))
      constexpr int64_t kPrefetchAhead = 64;
      if (b + kPrefetchAhead < stop) {
        const int64_t k = p.map_index[b + kPrefetchAhead];
        __builtin_prefetch(value_row + (k >= 0 && k < p.value_cols ? k : 0));
      }
#endif
      const int64_t i = p.map_index[b];
      const bool mapped = i >= 0;
      const bool in_range = i < p.value_cols;
      const float z = static_cast<float>(base_row[b]);
      const float v = static_cast<float>(value_row[mapped && in_range ? i : 0]);
      const float s = mul_rn(alpha, p.map_weight[b]);
      const float with_value = s == 0.0f ? z : add_rn(z, mul_rn(s, v));
      const float unmapped = t == 0.0f ? z : add_rn(z, t);
      out[b - begin] = mapped ? (in_range ? with_value : NAN) : unmapped;
    }
  } else if (value_row == nullptr || alpha == 0.0f) {
    for (int64_t b = begin; b < stop; ++b) out[b - begin] = static_cast<float>(base_row[b]);
  } else {
    for (int64_t b = begin; b < stop; ++b) {
      out[b - begin] = add_rn(static_cast<float>(base_row[b]),
                              mul_rn(alpha, static_cast<float>(value_row[b])));
    }
  }
  for (int64_t b = stop > begin ? stop : begin; b < end; ++b) out[b - begin] = -INFINITY;
}

// merge_span_into with the output indexed like the input: out_row[b] for b in [begin, end).
template <typename TB, typename TV>
IVL_HOST_DEVICE inline void merge_span(const TB* base_row,   // [Vb]
                                       const TV* value_row,  // [Vv] or nullptr
                                       float alpha, const MergeParams& p, int64_t begin,
                                       int64_t end,
                                       float* out_row) {  // [Vb]
  merge_span_into(base_row, value_row, alpha, p, begin, end, out_row + begin);
}

}  // namespace ivl
