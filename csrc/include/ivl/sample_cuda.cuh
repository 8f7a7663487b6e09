// CUDA kernels of merge_sample and merged_log_softmax: framework-free device code (raw pointers,
// int64 offsets, no torch). csrc/cuda/sample.cu launches them on the current stream; the
// standalone check csrc/tests/cuda_compile_check.cu compiles them with nvcc alone. The math is
// the CPU path's, from the shared headers: merge_one (merge.h), the Philox stream (philox.h),
// Gumbel keys, RowStats, min-p (sample.h).
//
// A row is cut into spans of kSpan ids (fixed by V, so results never depend on the launch):
//   span_kernel        grid (spans, rows): merge + stats per span (max / argmax, validity,
//                      log-sum-exp), and, for sampled rows without filters, the whole Gumbel race
//                      (exact keys, two float64 logs each, only for tokens that pass the CPU's
//                      screen against the best key the warp has seen);
//                      rows with filters store their merged logits in a scratch row.
//   finish_kernel      one block per row: the spans' stats merged in order; greedy / unfiltered
//                      rows get their token; filtered rows get their threshold tau on s = z / T by
//                      block-wide radix selects (top-k: k-th largest by counts; top-p: the
//                      smallest s whose strictly-larger mass is < top_p, by float64 masses).
//   race_kernel        grid (spans, rows): the race over kept tokens (s >= tau) of filtered rows.
//   race_finish_kernel the filtered rows' span winners merged in order.
//   normalise_kernel   merged_log_softmax: (z - max) - log(sum), after span_kernel.
// Reductions are fixed trees with explicit index tie-breaks (lowest index wins), so tokens are
// deterministic; the only float64 atomics are the top-p bin masses, whose summation order can
// move a threshold only when top_p falls within rounding of a cumulative mass (as on the CPU).
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "ivl/common.h"
#include "ivl/merge.h"
#include "ivl/philox.h"
#include "ivl/sample.h"

namespace ivl {
namespace cuda {

constexpr int kThreads = 256;          // threads per block of every kernel here
constexpr int64_t kSpan = 8192;        // ids per span (a multiple of 4: whole Philox groups)
constexpr unsigned kMaxGridY = 65535;  // rows beyond this are covered by a grid-stride loop
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

inline int64_t num_spans(int64_t cols) { return cols > 0 ? (cols + kSpan - 1) / kSpan : 1; }

// The rows of merge_sample / merged_log_softmax, storage types TB / TV (float, bf16, fp16).
template <typename TB, typename TV>
struct Rows {
  const TB* base;  // [B, Vb], row stride base_stride (elements), unit stride along V
  int64_t base_stride;
  const TV* value;  // [B, Vv] or nullptr
  int64_t value_stride;
  const float* alpha;  // [B], any stride
  int64_t alpha_stride;
  MergeParams merge;
  int64_t rows, cols;
};

// Per-row sampling parameters: [B] device arrays with any stride (an expanded scalar has 0).
struct Params {
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const float* min_p;
  const int64_t* seed;
  const int64_t* step;
  int64_t stride[6];

  __device__ SampleRow row(int64_t r) const {
    return SampleRow{temperature[r * stride[0]], top_k[r * stride[1]], top_p[r * stride[2]],
                     min_p[r * stride[3]],       seed[r * stride[4]],  step[r * stride[5]]};
  }
};

// Monotone map float -> uint32 (larger float, larger key; -0 < +0 is harmless here).
IVL_HOST_DEVICE inline uint32_t ordered_bits(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
IVL_HOST_DEVICE inline float from_ordered_bits(uint32_t o) {
  return bits_to_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// Combine the stats of two sets of ids in any order: ties go to the lower index, the log-sum-exp
// is added (callers combine in a fixed order, so the float sums are deterministic).
__device__ inline void combine(RowStats& a, const RowStats& b) {
  if (b.zmax > a.zmax ||
      (b.zmax == a.zmax && b.argmax >= 0 && (a.argmax < 0 || b.argmax < a.argmax)))
    a.zmax = b.zmax, a.argmax = b.argmax;
  a.has_nan |= b.has_nan;
  a.has_posinf |= b.has_posinf;
  a.has_finite |= b.has_finite;
  a.add_lse(b.lse_ref, b.lse_sum);
  const RaceBest& r = b.race;
  if (r.index >= 0 &&
      (r.key > a.race.key || (r.key == a.race.key && (a.race.index < 0 || r.index < a.race.index))))
    a.race = r;
}

// __shared__ storage for T (RowStats has default member initialisers, which __shared__
// variables may not run): IVL_SHARED_ARRAY(RowStats, red, kThreads) declares RowStats* red.
#define IVL_SHARED_ARRAY(T, name, n)                               \
  __shared__ alignas(T) unsigned char name##_raw[sizeof(T) * (n)]; \
  T* name = reinterpret_cast<T*>(name##_raw)

// Block-wide fixed-tree reduction of one RowStats per thread; the result is in s[0].
__device__ inline void reduce_stats(RowStats* s) {
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < half) combine(s[threadIdx.x], s[threadIdx.x + half]);
  }
  __syncthreads();
}

// Phase 1 of one (span, row): merge, stats, and the race for unfiltered sampled rows. `scratch`
// ([B, Vb] fp32) receives the merged row when `store_all` or the row has filters.
template <typename TB, typename TV>
__global__ void __launch_bounds__(kThreads)
    span_kernel(Rows<TB, TV> x, Params pp, bool sampling, bool want_lse, bool store_all,
                float* __restrict__ scratch, RowStats* __restrict__ parts) {  // [B, spans]
  IVL_SHARED_ARRAY(RowStats, red, kThreads);
  const int64_t V = x.cols, spans = gridDim.x;
  const int64_t begin = int64_t(blockIdx.x) * kSpan;
  const int64_t end = begin + kSpan < V ? begin + kSpan : V;
  for (int64_t r = blockIdx.y; r < x.rows; r += gridDim.y) {
    const TB* base_row = x.base + r * x.base_stride;
    const TV* value_row = x.value != nullptr ? x.value + r * x.value_stride : nullptr;
    const float alpha = x.alpha[r * x.alpha_stride];
    bool race = false, store = store_all;
    SampleRow p{};
    if (sampling) {
      p = pp.row(r);
      race = !p.greedy() && !p.filtered(V);
      store = store || (!p.greedy() && p.filtered(V));
    }
    float* out = store ? scratch + r * V : nullptr;
    RowStats st;
    float lref = -INFINITY;  // this thread's log-sum-exp: sum of exp(z - lref)
    double lsum = 0.0;
    // Warp-uniform trip count (lanes past `end` idle), so the warp can share its race leader.
    const int64_t lane = threadIdx.x & 31u;
    for (int64_t w0 = begin + 4 * (int64_t(threadIdx.x) - lane); w0 < end;
         w0 += 4 * int64_t(blockDim.x)) {
      const int64_t v0 = w0 + 4 * lane;
      Philox4x32 bits{};
      float bound = -INFINITY;  // a key some token of this warp already reached
      if (race) {
        bits = philox_group(p.seed, p.step, v0 >> 2);  // one call, 4 ids
        bound = st.race.key;
        for (int off = 16; off > 0; off /= 2) {
          const float o = __shfl_xor_sync(kFullWarp, bound, off);
          bound = o > bound ? o : bound;
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t v = v0 + j;
        if (v >= end) break;
        const float z = merge_one(base_row, value_row, alpha, v, x.merge);
        if (out != nullptr) out[v] = z;
        st.has_nan |= z != z;
        st.has_posinf |= z == INFINITY;
        st.has_finite |= (z - z) == 0.0f;
        if (z > st.zmax) st.zmax = z, st.argmax = v;  // ids rise within a thread: lowest wins
        if (want_lse && z > -INFINITY) {
          if (z > lref) {  // rare (a new maximum): the float64 rescale costs nothing overall
            lsum = (lref > -INFINITY ? lsum * exp(static_cast<double>(lref) - z) : 0.0);
            lref = z;
          }
          // Terms in fp32 (exp_nonpos, as the CPU kernel), summed in float64: a float64 exp
          // per id made this loop bound by the GPU's float64 units.
          lsum += static_cast<double>(exp_nonpos(z - lref));
        }
        if (race) {
          // The exact key costs two float64 logs; the screen of sample.h (the CPU's) skips
          // the tokens that cannot reach `bound`, so they could never win or tie.
          const float sc = p.scale(z), w = bits_to_uniform(bits.v[j]);
          float b = st.race.key > bound ? st.race.key : bound;
          b = b < FLT_MAX ? b : FLT_MAX;  // finite limits if a key overflowed (as on the CPU)
          if (!(b > -INFINITY) || sc >= b ||
              uniform_log2_floor(w) <= screen_limit(sc, b, screen_margin(b))) {
            st.race.offer(add_rn(sc, gumbel_from_uniform(w)), v, z);
          }
        }
      }
    }
    st.add_lse(lref, lsum);
    red[threadIdx.x] = st;
    reduce_stats(red);
    if (threadIdx.x == 0) parts[r * spans + blockIdx.x] = red[0];
    __syncthreads();
  }
}

// Block-wide: the n partials part[0, n) of one row merged in index order into *out (shared).
// The block loads them in parallel into `buf` (shared, blockDim.x entries) and thread 0 merges
// from there: one global-load latency per blockDim.x partials instead of one per partial.
template <typename T>
__device__ inline void block_merge_in_order(const T* part, int64_t n, T* buf, T* out) {
  for (int64_t k0 = 0; k0 < n; k0 += blockDim.x) {
    const int64_t m = n - k0 < blockDim.x ? n - k0 : blockDim.x;
    if (threadIdx.x < m) buf[threadIdx.x] = part[k0 + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t k = 0;
      if (k0 == 0) *out = buf[0], k = 1;
      for (; k < m; ++k) out->merge(buf[k]);
    }
    __syncthreads();
  }
}

// Block-wide: the k-th largest of z[0, n) with multiplicity (1 <= k <= n), by an exact radix
// select on ordered_bits, 8 bits per pass.
__device__ inline float block_kth_largest(const float* z, int64_t n, int64_t k,
                                          unsigned* hist /* shared [256] */,
                                          uint32_t* sel /* shared [2] */) {
  uint32_t prefix = 0, mask = 0;
  int64_t rem = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t u = ordered_bits(z[i]);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int d = 255;
      for (; d > 0 && rem > static_cast<int64_t>(hist[d]); --d) rem -= hist[d];
      sel[0] = static_cast<uint32_t>(d);
      sel[1] = static_cast<uint32_t>(rem);
    }
    __syncthreads();
    prefix |= sel[0] << shift;
    mask |= 255u << shift;
    rem = sel[1];
    __syncthreads();
  }
  return from_ordered_bits(prefix);
}

// Block-wide top-p threshold over the tokens with s = z / T >= tau: the smallest such s whose
// strictly-larger mass (float64 softmax weights exp(s - s_max), summed over the set) is below
// top_p times the set's total; the reference's sorted cumulative walk keeps exactly the tokens
// at or above it (up to the rounding of the float64 sums).
__device__ inline float block_top_p(const float* z, int64_t n, float temp, float s_max, float tau,
                                    float top_p, double* dred /* shared [kThreads] */,
                                    double* mass /* shared [256] */, unsigned* count /* [256] */,
                                    uint32_t* sel /* shared [2] */, double* above_s /* [1] */) {
  double t = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float s = z[i] / temp;
    if (s >= tau) t += exp(static_cast<double>(s) - s_max);
  }
  dred[threadIdx.x] = t;
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < half) dred[threadIdx.x] += dred[threadIdx.x + half];
  }
  __syncthreads();
  const double target = static_cast<double>(top_p) * dred[0];
  uint32_t prefix = 0, mask = 0;
  double above = 0.0;  // mass of the set above the current prefix's range
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) mass[d] = 0.0, count[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float s = z[i] / temp;
      if (!(s >= tau)) continue;
      const uint32_t u = ordered_bits(s);
      if ((u & mask) != prefix) continue;
      const uint32_t d = (u >> shift) & 255u;
      atomicAdd(&mass[d], exp(static_cast<double>(s) - s_max));
      atomicAdd(&count[d], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // The lowest non-empty bin whose largest member has mass above < target.
      double cum = above, best_above = above;
      int best = -1;
      for (int d = 255; d >= 0; --d) {
        if (count[d] == 0) continue;
        if (!(cum < target)) break;
        best = d, best_above = cum;
        cum += mass[d];
      }
      if (best < 0) {  // rounding: keep the largest member of the range
        for (best = 255; best > 0 && count[best] == 0; --best) {
        }
        best_above = above;
      }
      sel[0] = static_cast<uint32_t>(best);
      above_s[0] = best_above;
    }
    __syncthreads();
    prefix |= sel[0] << shift;
    mask |= 255u << shift;
    above = above_s[0];
    __syncthreads();
  }
  return from_ordered_bits(prefix);
}

// Phase 2, one block per row: decide greedy / unfiltered / invalid rows; for filtered rows write
// tau (NaN for every other row) and keep the merged stats for the log-prob.
__global__ void __launch_bounds__(kThreads)
    finish_kernel(Params pp, int64_t rows, int64_t V, int64_t spans, bool want_lp,
                  const RowStats* __restrict__ parts, const float* __restrict__ scratch,
                  RowStats* __restrict__ stats, float* __restrict__ tau_out,
                  int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  IVL_SHARED_ARRAY(RowStats, st_p, 1);
  IVL_SHARED_ARRAY(RowStats, buf, kThreads);
  RowStats& st_s = *st_p;
  __shared__ unsigned hist[256];
  __shared__ double mass[256];
  __shared__ double dred[kThreads];
  __shared__ uint32_t sel[2];
  __shared__ double above_s[1];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    block_merge_in_order(parts + r * spans, spans, buf, &st_s);
    const RowStats st = st_s;
    const SampleRow p = pp.row(r);
    const bool filtered = st.valid() && !p.greedy() && p.filtered(V);
    if (!filtered) {
      if (threadIdx.x == 0) {
        tau_out[r] = NAN;
        if (!st.valid()) {
          tokens[r] = kInvalidToken;
          logprobs[r] = NAN;
        } else {
          const bool greedy = p.greedy();
          const int64_t tok = greedy ? st.argmax : st.race.index;
          tokens[r] = tok;
          logprobs[r] = want_lp ? st.logprob(greedy ? st.zmax : st.race.z) : NAN;
        }
      }
      __syncthreads();
      continue;
    }
    const float* z = scratch + r * V;
    const float s_max = p.scale(st.zmax);
    float tau = -INFINITY;
    if (p.use_top_k(V)) tau = p.scale(block_kth_largest(z, V, p.top_k, hist, sel));
    if (p.use_top_p()) {
      const float t =
          block_top_p(z, V, p.temperature, s_max, tau, p.top_p, dred, mass, hist, sel, above_s);
      tau = t > tau ? t : tau;
    }
    if (p.use_min_p()) {
      const float t = min_p_threshold(s_max, p.min_p);
      tau = t > tau ? t : tau;
    }
    if (threadIdx.x == 0) {
      tau_out[r] = tau < s_max ? tau : s_max;  // the most likely token always survives
      stats[r] = st;
    }
    __syncthreads();
  }
}

// Phase 3 of one (span, row) of a filtered row: the race over kept tokens (s >= tau).
__global__ void __launch_bounds__(kThreads)
    race_kernel(Params pp, int64_t rows, int64_t V, const float* __restrict__ scratch,
                const float* __restrict__ tau_in, RaceBest* __restrict__ race_parts) {
  IVL_SHARED_ARRAY(RowStats, red, kThreads);
  const int64_t spans = gridDim.x;
  const int64_t begin = int64_t(blockIdx.x) * kSpan;
  const int64_t end = begin + kSpan < V ? begin + kSpan : V;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float tau = tau_in[r];
    if (tau != tau) continue;  // not a filtered row (uniform across the block)
    const SampleRow p = pp.row(r);
    const float* z = scratch + r * V;
    RowStats st;
    for (int64_t v0 = begin + 4 * int64_t(threadIdx.x); v0 < end; v0 += 4 * int64_t(blockDim.x)) {
      bool any = false;
      float s[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j] = v0 + j < end ? p.scale(z[v0 + j]) : -INFINITY;
        any |= s[j] >= tau;
      }
      if (!any) continue;  // no random numbers for groups with no kept token
      const Philox4x32 bits = philox_group(p.seed, p.step, v0 >> 2);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (v0 + j < end && s[j] >= tau) {
          st.race.offer(add_rn(s[j], gumbel_from_uniform(bits_to_uniform(bits.v[j]))), v0 + j,
                        z[v0 + j]);
        }
      }
    }
    red[threadIdx.x] = st;
    reduce_stats(red);
    if (threadIdx.x == 0) race_parts[r * spans + blockIdx.x] = red[0].race;
    __syncthreads();
  }
}

// Phase 4, one block per row: the filtered rows' span winners merged in index order.
__global__ void __launch_bounds__(kThreads)
    race_finish_kernel(int64_t rows, int64_t spans, bool want_lp, const float* __restrict__ tau_in,
                       const RowStats* __restrict__ stats, const RaceBest* __restrict__ race_parts,
                       int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  IVL_SHARED_ARRAY(RaceBest, best, 1);
  IVL_SHARED_ARRAY(RaceBest, buf, kThreads);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (tau_in[r] != tau_in[r]) continue;  // not a filtered row (uniform across the block)
    block_merge_in_order(race_parts + r * spans, spans, buf, best);
    if (threadIdx.x == 0) {
      tokens[r] = best->index;
      logprobs[r] = want_lp ? stats[r].logprob(best->z) : NAN;
    }
    __syncthreads();
  }
}

// merged_log_softmax after span_kernel (store_all, want_lse): out = (z - max) - log(sum) in fp32
// like torch.log_softmax; an invalid row is all NaN.
__global__ void __launch_bounds__(kThreads)
    normalise_kernel(int64_t rows, int64_t V, const RowStats* __restrict__ parts,
                     float* __restrict__ out) {
  IVL_SHARED_ARRAY(RowStats, st_p, 1);
  IVL_SHARED_ARRAY(RowStats, buf, kThreads);
  RowStats& st_s = *st_p;
  const int64_t spans = gridDim.x;
  const int64_t begin = int64_t(blockIdx.x) * kSpan;
  const int64_t end = begin + kSpan < V ? begin + kSpan : V;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    block_merge_in_order(parts + r * spans, spans, buf, &st_s);
    const bool valid = st_s.valid();
    const float m = st_s.zmax, l = static_cast<float>(log(st_s.lse_sum));
    float* row = out + r * V;
    for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
      row[v] = valid ? (row[v] - m) - l : NAN;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side launchers (no torch): the caller provides device buffers and the stream.
// ---------------------------------------------------------------------------------------------
inline dim3 span_grid(int64_t rows, int64_t cols) {
  return dim3(static_cast<unsigned>(num_spans(cols)),
              static_cast<unsigned>(rows < kMaxGridY ? rows : kMaxGridY));
}

// Device scratch of merge_sample, all sized by the caller with merge_sample_scratch_bytes.
struct SampleScratch {
  float* rows;           // [B, Vb]: merged rows of filtered rows
  RowStats* parts;       // [B, spans]
  RowStats* stats;       // [B]
  float* tau;            // [B]
  RaceBest* race_parts;  // [B, spans]
};

template <typename TB, typename TV>
cudaError_t launch_merge_sample(const Rows<TB, TV>& x, const Params& pp, bool want_lp,
                                const SampleScratch& s, int64_t* tokens, float* logprobs,
                                cudaStream_t stream) {
  const int64_t B = x.rows, V = x.cols, spans = num_spans(V);
  if (B == 0) return cudaSuccess;
  const dim3 grid = span_grid(B, V);
  span_kernel<TB, TV><<<grid, kThreads, 0, stream>>>(x, pp, true, want_lp, false, s.rows, s.parts);
  const unsigned row_blocks = static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY);
  finish_kernel<<<row_blocks, kThreads, 0, stream>>>(pp, B, V, spans, want_lp, s.parts, s.rows,
                                                     s.stats, s.tau, tokens, logprobs);
  race_kernel<<<grid, kThreads, 0, stream>>>(pp, B, V, s.rows, s.tau, s.race_parts);
  race_finish_kernel<<<row_blocks, kThreads, 0, stream>>>(B, spans, want_lp, s.tau, s.stats,
                                                          s.race_parts, tokens, logprobs);
  return cudaGetLastError();
}

// out: [B, Vb] fp32 contiguous; parts: [B, spans].
template <typename TB, typename TV>
cudaError_t launch_merged_log_softmax(const Rows<TB, TV>& x, RowStats* parts, float* out,
                                      cudaStream_t stream) {
  if (x.rows == 0 || x.cols == 0) return cudaSuccess;
  const dim3 grid = span_grid(x.rows, x.cols);
  span_kernel<TB, TV><<<grid, kThreads, 0, stream>>>(x, Params{}, false, true, true, out, parts);
  normalise_kernel<<<grid, kThreads, 0, stream>>>(x.rows, x.cols, parts, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ivl
