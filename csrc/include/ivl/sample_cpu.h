// The CPU building blocks of merge_sample and merged_log_softmax (host only, framework-free; the
// torch binding in csrc/cpu/sample.cpp runs them in parallel). The math is in sample.h.
//
// A row is cut into fixed parts of kPart tokens (the parallel tasks) and each part into chunks
// of kChunk tokens that stay in L1:
//   span_pass  merges a chunk into a buffer (or into the caller's row when it must be kept),
//              then, while it is in L1: validity flags, max / argmax, the chunk's sum of
//              exp(z - chunk max) for log-probs, and, for rows without filters, the Gumbel race;
//   race_span  the race over kept tokens of a stored row (rows with filters, after thresholds).
// The race draws random numbers only for blocks of 64 tokens whose best possible key can still
// reach the leader's, and computes exact keys (two logs) only for tokens that pass the screen of
// sample.h; on real LM rows almost every block is skipped without a single Philox call.
//
// SIMD: loops are written to auto-vectorise; Philox has an AVX2 version. Every hot function is
// compiled twice, generic and with __attribute__((target("avx2"))) + flatten, and chosen at run
// time (cpu_has_avx2; IVL_CPU_SIMD=0 forces the generic build). Both give identical results.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cfloat>
#include <climits>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "ivl/cpu_dispatch.h"
#include "ivl/merge.h"
#include "ivl/philox.h"
#include "ivl/sample.h"

namespace ivl {
namespace cpu {

constexpr int64_t kPart = 16384;  // tokens per parallel task; fixed, so results never depend on
                                  // the number of threads
constexpr int64_t kChunk = 2048;  // tokens per L1-resident chunk (a multiple of kBlock)
constexpr int64_t kBlock = 64;    // tokens per race block: 16 Philox calls

// Whether the AVX2 builds may run: the CPU has AVX2 and IVL_CPU_SIMD is not "0".
inline bool cpu_has_avx2() {
#if IVL_X86_DISPATCH
  static const bool ok = cpu_simd_allowed() && __builtin_cpu_supports("avx2") != 0;
  return ok;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Short vectors (GCC / Clang vector extensions): 8 lanes (one AVX2 register) in the AVX2 build,
// 4 lanes (SSE2 / NEON) in the generic one. IEEE operations lane by lane, and sums always kept in
// 8 partial accumulators, so both builds give the same bits.
// ---------------------------------------------------------------------------------------------
// Every function taking or returning vectors is always inlined, so the note that 32-byte vector
// arguments have another ABI without AVX does not apply (GCC emits it at the end of the
// translation unit, hence no push / pop).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define IVL_VEC_INLINE inline __attribute__((always_inline))

namespace vec {
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));
typedef uint32_t u4 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));

template <bool kAvx2>
struct Native;  // the float / int vector types of a build
template <>
struct Native<true> {
  using F = f8;
  using I = i8;
  using U = u8;
};
template <>
struct Native<false> {
  using F = f4;
  using I = i4;
  using U = u4;
};

template <typename F>
constexpr int lanes = sizeof(F) / sizeof(float);

template <typename F>
IVL_VEC_INLINE F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename F>
IVL_VEC_INLINE void store(float* p, F v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename F>
IVL_VEC_INLINE F splat(float x) {
  return F{} + x;
}
template <typename F>
IVL_VEC_INLINE F max(F a, F b) {
  return a > b ? a : b;  // NaN in a: keeps b
}
template <typename F>
IVL_VEC_INLINE float hmax(F a) {
  float m = a[0];
  for (int j = 1; j < lanes<F>; ++j) m = a[j] > m ? a[j] : m;
  return m;
}
template <typename I>
IVL_VEC_INLINE bool any(I m) {
  int32_t r = 0;
  for (int j = 0; j < lanes<I>; ++j) r |= m[j];
  return r != 0;
}

// exp_nonpos of sample.h lane by lane (the same operations, so the same bits).
template <typename F>
IVL_VEC_INLINE F exp_nonpos(F x) {
  using I = decltype(x > x);
  x = x > -80.0f ? x : splat<F>(-80.0f);
  const F magic = splat<F>(12582912.0f);
  const F t = x * kLog2e;
  const F r = t + magic;
  const F f = t - (r - magic);
  const I k = (I)r - (I)magic;  // same-size vector casts reinterpret the bits
  F p = splat<F>(1.326711732e-3f);
  p = p * f + 9.671597742e-3f;
  p = p * f + 5.550726503e-2f;
  p = p * f + 2.402224094e-1f;
  p = p * f + 6.931470037e-1f;
  p = p * f + 1.0f;
  return p * (F)((k + 127) << 23);
}

// floor(log2(w)) of normal positive w, as floats (uniform_log2_floor of sample.h).
template <typename F>
IVL_VEC_INLINE F log2_floor(F w) {
  using I = decltype(w > w);
  return __builtin_convertvector((I)w >> 23, F) - 127.0f;
}
}  // namespace vec

// ---------------------------------------------------------------------------------------------
// Random numbers for a block of 64 vocab ids [v0, v0 + 64), v0 % 4 == 0: w[i] = uniform(v0 + i)
// ---------------------------------------------------------------------------------------------
inline void uniforms64_generic(int64_t seed, int64_t step, int64_t v0, float* w) {
  for (int g = 0; g < 16; ++g) {
    const Philox4x32 x = philox_group(seed, step, (v0 >> 2) + g);
    for (int j = 0; j < 4; ++j) w[4 * g + j] = bits_to_uniform(x.v[j]);
  }
}

#if IVL_X86_DISPATCH
// hi and lo 32-bit halves of c * m for 8 lanes (m broadcast).
__attribute__((target("avx2"), always_inline)) inline void mulhilo8(__m256i c, __m256i m,
                                                                    __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);                        // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);  // no third multiply
}

// fp32(x) * 2^-32 + 2^-33 for 8 uint32 lanes, rounded exactly as bits_to_uniform: x = hi * 2^16
// + lo is converted in two exact halves and summed with one rounding, like fp32(x).
__attribute__((target("avx2"), always_inline)) inline __m256 to_uniform8(__m256i x) {
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 16));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(0xffff)));
  const __m256 f = _mm256_add_ps(_mm256_mul_ps(hi, _mm256_set1_ps(65536.0f)), lo);
  return _mm256_add_ps(_mm256_mul_ps(f, _mm256_set1_ps(0x1p-32f)), _mm256_set1_ps(0x1p-33f));
}

// Writes the 4 words of 8 groups (lane g of word j = vocab id 4g + j) in vocab order.
__attribute__((target("avx2"), always_inline)) inline void store_transposed(__m256i c0, __m256i c1,
                                                                            __m256i c2, __m256i c3,
                                                                            float* w) {
  const __m256 f0 = to_uniform8(c0), f1 = to_uniform8(c1), f2 = to_uniform8(c2),
               f3 = to_uniform8(c3);
  const __m256 a = _mm256_unpacklo_ps(f0, f1), b = _mm256_unpackhi_ps(f0, f1);
  const __m256 c = _mm256_unpacklo_ps(f2, f3), d = _mm256_unpackhi_ps(f2, f3);
  const __m256 e = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));
  const __m256 f = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));
  const __m256 g = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));
  const __m256 h = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));
  _mm256_storeu_ps(w + 0, _mm256_permute2f128_ps(e, f, 0x20));   // groups 0, 1
  _mm256_storeu_ps(w + 8, _mm256_permute2f128_ps(g, h, 0x20));   // groups 2, 3
  _mm256_storeu_ps(w + 16, _mm256_permute2f128_ps(e, f, 0x31));  // groups 4, 5
  _mm256_storeu_ps(w + 24, _mm256_permute2f128_ps(g, h, 0x31));  // groups 6, 7
}

// Philox-4x32-10 for 16 consecutive groups: two independent 8-lane chains (one group per 32-bit
// lane) interleaved, so the multiplier latency of one hides behind the other.
__attribute__((target("avx2"))) inline void uniforms64_avx2(int64_t seed, int64_t step,
                                                            int64_t v0, float* w) {
  const uint64_t s = static_cast<uint64_t>(seed), t = static_cast<uint64_t>(step);
  const __m256i g0 = _mm256_add_epi32(
      _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(static_cast<uint64_t>(v0) >> 2))),
      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i a0 = g0, b0 = _mm256_add_epi32(g0, _mm256_set1_epi32(8));
  __m256i a1 = _mm256_setzero_si256(), b1 = a1;
  __m256i a2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(t))), b2 = a2;
  __m256i a3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(t >> 32))), b3 = a3;
  uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox_detail::kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox_detail::kM1));
  for (int r = 0; r < 10; ++r) {
    if (r > 0) k0 += philox_detail::kW0, k1 += philox_detail::kW1;
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i vk1 = _mm256_set1_epi32(static_cast<int>(k1));
    __m256i ha0, la0, ha1, la1, hb0, lb0, hb1, lb1;
    mulhilo8(a0, m0, ha0, la0);
    mulhilo8(b0, m0, hb0, lb0);
    mulhilo8(a2, m1, ha1, la1);
    mulhilo8(b2, m1, hb1, lb1);
    a0 = _mm256_xor_si256(_mm256_xor_si256(ha1, a1), vk0);
    b0 = _mm256_xor_si256(_mm256_xor_si256(hb1, b1), vk0);
    a2 = _mm256_xor_si256(_mm256_xor_si256(ha0, a3), vk1);
    b2 = _mm256_xor_si256(_mm256_xor_si256(hb0, b3), vk1);
    a1 = la1, b1 = lb1, a3 = la0, b3 = lb0;
  }
  store_transposed(a0, a1, a2, a3, w);
  store_transposed(b0, b1, b2, b3, w + 32);
}
#endif

template <bool kAvx2>
IVL_VEC_INLINE void uniforms64(int64_t seed, int64_t step, int64_t v0, float* w) {
#if IVL_X86_DISPATCH
  if constexpr (kAvx2) return uniforms64_avx2(seed, step, v0, w);
#endif
  uniforms64_generic(seed, step, v0, w);
}

// ---------------------------------------------------------------------------------------------
// The merge of a span (merge.h's rule, bit for bit), vectorised for the CPU
// ---------------------------------------------------------------------------------------------
// L base logits widened to fp32.
template <typename F, typename TB>
IVL_VEC_INLINE F load_widened(const TB* p) {
  if constexpr (std::is_same_v<TB, float>) {
    return vec::load<F>(p);
  } else {
    alignas(32) float f[vec::lanes<F>];
    for (int j = 0; j < vec::lanes<F>; ++j) f[j] = static_cast<float>(p[j]);
    return vec::load<F>(f);
  }
}

// The map as the CPU merge reads it: one int32 code per base id, the value id when it is in
// range, kUnmappedCode when the map leaves the id unmapped (< 0), kOutOfRangeCode when the
// value id is >= value_cols (the merged logit is NaN). Computed once per call: a third of the
// int64 map's bytes per row and no 64-bit lane juggling before each gather.
constexpr int32_t kUnmappedCode = -1;
constexpr int32_t kOutOfRangeCode = -2;

// Whether map_codes can encode this map (value ids fit in int32).
inline bool codes_fit(const MergeParams& p) { return p.value_cols <= INT32_MAX; }

inline void map_codes(const MergeParams& p, int64_t begin, int64_t end, int32_t* codes) {
  for (int64_t b = begin; b < end; ++b) {
    const int64_t i = p.map_index[b];
    codes[b] = i < 0 ? kUnmappedCode
                     : (i < p.value_cols ? static_cast<int32_t>(i) : kOutOfRangeCode);
  }
}

#if IVL_X86_DISPATCH
// 8 value logits of an fp32 row by code (one hardware gather; lanes with a negative code read
// index 0 and are replaced by the caller).
__attribute__((target("avx2"))) inline vec::f8 gather8(const float* value_row, vec::i8 codes) {
  const __m256i c = reinterpret_cast<__m256i>(codes);
  const __m256i safe = _mm256_and_si256(c, _mm256_cmpgt_epi32(c, _mm256_set1_epi32(-1)));
  return reinterpret_cast<vec::f8>(_mm256_i32gather_ps(value_row, safe, 4));
}
#endif

// With a vocabulary map, merge_span_into (merge.h) turns the rule's selects into branches, which
// mispredict on partial maps. Here the rule is evaluated with vector selects on L ids at a time
// from the int32 codes, and the gather is branch-free (an AVX2 hardware gather for fp32 value
// rows, else a scalar loop on masked codes). No software prefetch: measured, it slowed the
// gathers from a value row larger than L2 by 2x. Without a map (or without codes),
// merge_span_into already vectorises.
template <bool kAvx2, typename TB, typename TV>
IVL_VEC_INLINE void merge_span_cpu(const TB* base_row, const TV* value_row, float alpha,
                                   const MergeParams& p, const int32_t* codes, int64_t begin,
                                   int64_t end, float* out) {
  if (value_row == nullptr || p.map_index == nullptr || codes == nullptr) {
    return merge_span_into(base_row, value_row, alpha, p, begin, end, out);
  }
  using F = typename vec::Native<kAvx2>::F;
  using I = typename vec::Native<kAvx2>::I;
  constexpr int L = vec::lanes<F>;
  const int64_t stop = end < p.vocab_limit ? end : p.vocab_limit;
  const float t = mul_rn(alpha, p.fill);
  int64_t b = begin;
  for (; b + L <= stop; b += L) {
    I c;
    std::memcpy(&c, codes + b, sizeof c);
    const I mapped = c >= 0;
    F gathered;
#if IVL_X86_DISPATCH
    if constexpr (kAvx2 && std::is_same_v<TV, float>) {
      gathered = gather8(value_row, c);
    } else
#endif
    {
      const I safe = c & mapped;
      for (int j = 0; j < L; ++j) gathered[j] = static_cast<float>(value_row[safe[j]]);
    }
    const F z = load_widened<F>(base_row + b);
    const F s = alpha * vec::load<F>(p.map_weight + b);
    const F with_value = s == 0.0f ? z : z + s * gathered;
    const F unmapped = t == 0.0f ? z : z + t;
    vec::store(out + (b - begin), mapped != 0 ? with_value
                                              : (c == kUnmappedCode ? unmapped
                                                                    : vec::splat<F>(NAN)));
  }
  merge_span_into(base_row, value_row, alpha, p, b, end, out + (b - begin));
}

// ---------------------------------------------------------------------------------------------
// Chunk reductions
// ---------------------------------------------------------------------------------------------
struct ChunkScan {
  float max;  // NaN ignored
  bool nan, posinf, finite;
};

template <bool kAvx2>
IVL_VEC_INLINE ChunkScan scan_chunk(const float* z, int64_t n) {
  using F = typename vec::Native<kAvx2>::F;
  using I = typename vec::Native<kAvx2>::I;
  constexpr int L = vec::lanes<F>;
  F m = vec::splat<F>(-INFINITY);
  I nan = {}, pinf = {}, fin = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const F x = vec::load<F>(z + i);
    m = vec::max(x, m);
    nan |= x != x;
    pinf |= x == INFINITY;
    fin |= (x - x) == 0.0f;  // finite: inf - inf and NaN - NaN are NaN
  }
  ChunkScan out{vec::hmax(m), vec::any(nan), vec::any(pinf), vec::any(fin)};
  for (; i < n; ++i) {
    const float x = z[i];
    out.max = x > out.max ? x : out.max;
    out.nan |= x != x;
    out.posinf |= x == INFINITY;
    out.finite |= (x - x) == 0.0f;
  }
  return out;
}

// Index of the first z[i] == value (-1 if none).
template <bool kAvx2>
IVL_VEC_INLINE int64_t first_index_of(const float* z, int64_t n, float value) {
  using F = typename vec::Native<kAvx2>::F;
  constexpr int L = vec::lanes<F>;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    if (vec::any(vec::load<F>(z + i) == value)) break;
  }
  for (; i < n; ++i) {
    if (z[i] == value) return i;
  }
  return -1;
}

// Sum of exp(z - ref) over a chunk (ref >= every z). Per 32 ids, the fp32 exps of ids = j mod 8
// are added in fp32 (4 terms: no real rounding loss), then accumulated in float64 lane j, so
// small terms do not round away against an accumulator near 1. The grouping is the same for any
// vector width, so both builds give the same bits; four independent exp chains per step keep the
// FP pipes busy.
#if IVL_X86_DISPATCH
// lo += fp64(v[0..3]), hi += fp64(v[4..7]) in registers (the vector-extension form goes through
// the stack two lanes at a time).
__attribute__((target("avx2"))) inline void widen_add(vec::f8 v, vec::d4& lo, vec::d4& hi) {
  const __m256 x = reinterpret_cast<__m256>(v);
  lo = reinterpret_cast<vec::d4>(_mm256_add_pd(reinterpret_cast<__m256d>(lo),
                                               _mm256_cvtps_pd(_mm256_castps256_ps128(x))));
  hi = reinterpret_cast<vec::d4>(_mm256_add_pd(reinterpret_cast<__m256d>(hi),
                                               _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
}
#endif

template <bool kAvx2>
IVL_VEC_INLINE double sum_exp(const float* z, int64_t n, float ref) {
  using F = typename vec::Native<kAvx2>::F;
  constexpr int L = vec::lanes<F>;
  vec::d4 lo = {}, hi = {};  // ids = 0..3 and 4..7 mod 8
  alignas(32) float e[8];
  int64_t i = 0;
#if IVL_X86_DISPATCH
  if constexpr (kAvx2) {
    for (; i + 32 <= n; i += 32) {
      const F e0 = vec::exp_nonpos(vec::load<F>(z + i) - ref);
      const F e1 = vec::exp_nonpos(vec::load<F>(z + i + 8) - ref);
      const F e2 = vec::exp_nonpos(vec::load<F>(z + i + 16) - ref);
      const F e3 = vec::exp_nonpos(vec::load<F>(z + i + 24) - ref);
      widen_add((e0 + e1) + (e2 + e3), lo, hi);
    }
  }
#endif
  for (; i + 32 <= n; i += 32) {
    for (int h = 0; h < 8; h += L) {
      const F e0 = vec::exp_nonpos(vec::load<F>(z + i + h) - ref);
      const F e1 = vec::exp_nonpos(vec::load<F>(z + i + 8 + h) - ref);
      const F e2 = vec::exp_nonpos(vec::load<F>(z + i + 16 + h) - ref);
      const F e3 = vec::exp_nonpos(vec::load<F>(z + i + 24 + h) - ref);
      vec::store(e + h, (e0 + e1) + (e2 + e3));
    }
    lo += __builtin_convertvector(vec::load<vec::f4>(e), vec::d4);
    hi += __builtin_convertvector(vec::load<vec::f4>(e + 4), vec::d4);
  }
  double total = 0.0;
  for (int j = 0; j < 4; ++j) total += lo[j] + hi[j];
  for (; i < n; ++i) total += exp_nonpos(z[i] - ref);
  return total;
}

// ---------------------------------------------------------------------------------------------
// The Gumbel race over one span of merged logits z[0, n) = vocab ids [v0, v0 + n), v0 % 64 == 0
// ---------------------------------------------------------------------------------------------
// The kept test s >= tau in z-space, exactly: the smallest fp32 z with fl(z / T) >= tau (T > 0;
// fl(z / T) is monotone in z), so blocks and lanes compare z without dividing.
inline float kept_z_threshold(float tau, float temp) {
  if (!(tau > -INFINITY) || !(temp > 0.0f)) return -INFINITY;
  float t = tau * temp;
  for (int i = 0; i < 64 && !(t / temp >= tau); ++i) t = std::nextafter(t, INFINITY);
  for (int i = 0; i < 64; ++i) {
    const float lower = std::nextafter(t, -INFINITY);
    if (!(lower / temp >= tau)) break;
    t = lower;
  }
  return t;
}

// Tokens with s = z / T >= tau take part (tau = -inf: all). `bound` is a key some taking-part
// token is known to reach (or -inf); it only sharpens the screen, never changes the result.
// The vector screen is evaluated in z-space, limit = z * (log2(e) / T) + (margin - lead log2(e)),
// two operations per lane; the rounding of that form against (z / T - lead) log2(e) + margin is
// below (|lead| + 64) 2^-21 for every token within reach (s > lead - 24), which the extra margin
// covers, and tokens further down fail by a wide margin either way. The few tokens that pass get
// the exact s = fl(z / T) and key.
template <bool kAvx2>
IVL_VEC_INLINE void race_span_impl(const float* z, int64_t v0, int64_t n, const SampleRow& p,
                                   float tau, float bound, RaceBest& best) {
  using F = typename vec::Native<kAvx2>::F;
  using I = typename vec::Native<kAvx2>::I;
  constexpr int L = vec::lanes<F>;
  const float temp = p.temperature;
  const bool unit = temp == 1.0f;  // z / 1 == z exactly: no divisions at all
  const float k1 = unit ? kLog2e : kLog2e / temp;
  const float ztau = unit ? tau : kept_z_threshold(tau, temp);
  alignas(32) float w[kBlock];
  alignas(32) int32_t pass[kBlock];
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    const float* zb = z + i;
    F m = vec::load<F>(zb);
    for (int j = L; j < kBlock; j += L) m = vec::max(vec::load<F>(zb + j), m);
    const float zmax = vec::hmax(m);
    const float smax = unit ? zmax : zmax / temp;  // s is monotone in z: the block's largest s
    const float lead = std::min(best.key > bound ? best.key : bound, FLT_MAX);
    const float margin = screen_margin(lead);
    // Skip the block (no random numbers) when no token is kept or none can reach the leader.
    if (!(zmax >= ztau) || screen_limit(smax, lead, margin) < kMinUniformLog2) continue;
    uniforms64<kAvx2>(p.seed, p.step, v0 + i, w);
    const float c = (margin + (std::fabs(lead) + 64.0f) * 0x1p-21f) - lead * kLog2e;
    I any = {};
    for (int j = 0; j < kBlock; j += L) {
      const F zj = vec::load<F>(zb + j);
      const I pj = (zj >= ztau) & (vec::log2_floor(vec::load<F>(w + j)) <= zj * k1 + c);
      std::memcpy(pass + j, &pj, sizeof pj);
      any |= pj;
    }
    if (!vec::any(any)) continue;
    for (int j = 0; j < kBlock; ++j) {  // rare: exact keys, in index order
      if (pass[j]) {
        const float sj = unit ? zb[j] : zb[j] / temp;
        best.offer(add_rn(sj, gumbel_from_uniform(w[j])), v0 + i + j, zb[j]);
      }
    }
  }
  for (; i < n; ++i) {  // the row's last < kBlock ids: scalar, exact s
    const float sj = unit ? z[i] : z[i] / temp;
    if (!(sj >= tau)) continue;
    const float lead = best.key > bound ? best.key : bound;
    const float wj = uniform(p.seed, p.step, v0 + i);
    if (uniform_log2_floor(wj) <= screen_limit(sj, lead, screen_margin(lead)) || sj >= lead) {
      best.offer(add_rn(sj, gumbel_from_uniform(wj)), v0 + i, z[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One pass over ids [begin, end) of a row: merge + stats (+ race for rows without filters)
// ---------------------------------------------------------------------------------------------
template <typename TB, typename TV>
struct SpanArgs {
  const TB* base_row;   // [Vb]
  const TV* value_row;  // [Vv] or nullptr
  float alpha;
  const MergeParams* merge;
  const int32_t* codes;   // map_codes of the map ([Vb]), or nullptr
  const SampleRow* race;  // race every token (no filters), or nullptr
  bool lse;               // accumulate the log-sum-exp
  float* store;           // keep the merged logits here ([end - begin]), or nullptr
  // A key some racing token of the row is known to reach (the leader of the parts already
  // raced on this thread), or -inf. It only sharpens the race's screen, never the result, so
  // tokens are the same whether a part starts with it or not.
  float race_bound = -INFINITY;
};

template <bool kAvx2, typename TB, typename TV>
IVL_VEC_INLINE RowStats span_pass_impl(const SpanArgs<TB, TV>& a, int64_t begin, int64_t end) {
  RowStats st;
  const MergeParams mp = *a.merge;  // a local copy: stores to z cannot alias it
  alignas(64) float buf[kChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t n = std::min(kChunk, end - c0);
    float* z = a.store != nullptr ? a.store + (c0 - begin) : buf;
    merge_span_cpu<kAvx2>(a.base_row, a.value_row, a.alpha, mp, a.codes, c0, c0 + n, z);
    const ChunkScan cs = scan_chunk<kAvx2>(z, n);
    st.has_nan |= cs.nan;
    st.has_posinf |= cs.posinf;
    st.has_finite |= cs.finite;
    if (cs.nan || cs.posinf || !(cs.max > -INFINITY)) continue;  // invalid row / nothing here
    const bool new_max = cs.max > st.zmax;
    if (new_max) st.zmax = cs.max, st.argmax = c0 + first_index_of<kAvx2>(z, n, cs.max);
    if (a.lse) st.add_lse(cs.max, sum_exp<kAvx2>(z, n, cs.max));
    if (a.race != nullptr) {
      // The running argmax's key is reached by a racing token: a bound for the screen.
      float bound = st.race.key > a.race_bound ? st.race.key : a.race_bound;
      if (new_max) {
        const float k = gumbel_key(a.race->scale(st.zmax), a.race->seed, a.race->step, st.argmax);
        bound = k > bound ? k : bound;
      }
      race_span_impl<kAvx2>(z, c0, n, *a.race, -INFINITY, bound, st.race);
    }
  }
  return st;
}

// Generic and AVX2 builds of the two entry points, chosen at run time.
template <typename TB, typename TV>
RowStats span_pass_generic(const SpanArgs<TB, TV>& a, int64_t begin, int64_t end) {
  return span_pass_impl<false>(a, begin, end);
}
inline void race_span_generic(const float* z, int64_t v0, int64_t n, const SampleRow& p, float tau,
                              float bound, RaceBest& best) {
  race_span_impl<false>(z, v0, n, p, tau, bound, best);
}
#if IVL_X86_DISPATCH
template <typename TB, typename TV>
__attribute__((target("avx2"), flatten)) RowStats span_pass_avx2(const SpanArgs<TB, TV>& a,
                                                                  int64_t begin, int64_t end) {
  return span_pass_impl<true>(a, begin, end);
}
__attribute__((target("avx2"), flatten)) inline void race_span_avx2(const float* z, int64_t v0,
                                                                   int64_t n, const SampleRow& p,
                                                                   float tau, float bound,
                                                                   RaceBest& best) {
  race_span_impl<true>(z, v0, n, p, tau, bound, best);
}
#endif

#if IVL_X86_DISPATCH
// The AVX2 build of merge_span_cpu, for the C++ tests.
template <typename TB, typename TV>
__attribute__((target("avx2"), flatten)) void merge_span_cpu_avx2_for_tests(
    const TB* base_row, const TV* value_row, float alpha, const MergeParams& p,
    const int32_t* codes, int64_t begin, int64_t end, float* out) {
  merge_span_cpu<true>(base_row, value_row, alpha, p, codes, begin, end, out);
}
#endif

template <typename TB, typename TV>
RowStats span_pass(bool avx2, const SpanArgs<TB, TV>& a, int64_t begin, int64_t end) {
#if IVL_X86_DISPATCH
  if (avx2) return span_pass_avx2(a, begin, end);
#endif
  (void)avx2;
  return span_pass_generic(a, begin, end);
}

inline void race_span(bool avx2, const float* z, int64_t v0, int64_t n, const SampleRow& p,
                      float tau, float bound, RaceBest& best) {
#if IVL_X86_DISPATCH
  if (avx2) return race_span_avx2(z, v0, n, p, tau, bound, best);
#endif
  (void)avx2;
  race_span_generic(z, v0, n, p, tau, bound, best);
}

// ---------------------------------------------------------------------------------------------
// Filter thresholds of one stored row (host, serial per row)
// ---------------------------------------------------------------------------------------------
struct Workspace {  // reused between rows by one thread
  std::vector<float> a, b;
  std::vector<double> mass, weight;
  std::vector<int32_t> bins;
};

// weight[i] = exp(desc[i] - s_max) in float64 (as the reference's float64 softmax); returns the sum.
inline double softmax_weights(const std::vector<float>& desc, float s_max,
                              std::vector<double>& weight) {
  weight.resize(desc.size());
  double total = 0.0;
  for (size_t i = 0; i < desc.size(); ++i) {
    weight[i] = std::exp(static_cast<double>(desc[i]) - s_max);
    total += weight[i];
  }
  return total;
}

// The k-th largest of z[0, n) (with multiplicity), 1 <= k < n. For small k, a strided sample
// gives a value with, very likely, a few k values above it; only those are selected exactly.
inline float kth_largest(const float* z, int64_t n, int64_t k, Workspace& ws) {
  std::vector<float>& cand = ws.a;
  if (n >= 4096 && k <= n / 64) {
    constexpr int64_t kStride = 16;
    std::vector<float>& sample = ws.b;
    sample.clear();
    for (int64_t i = 0; i < n; i += kStride) sample.push_back(z[i]);
    const int64_t ns = static_cast<int64_t>(sample.size());
    const int64_t rank = std::min<int64_t>(ns, (k + kStride - 1) / kStride * 2 + 8);
    std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(),
                     std::greater<float>());
    const float lo = sample[rank - 1];
    cand.resize(n);
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {  // branch-free compaction of the values >= lo
      cand[m] = z[i];
      m += z[i] >= lo;
    }
    if (m >= k && m <= n / 4) {
      std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.begin() + m,
                       std::greater<float>());
      return cand[k - 1];
    }
  }
  cand.assign(z, z + n);
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), std::greater<float>());
  return cand[k - 1];
}

// s = z / T of the tokens with s >= tau, in index order.
inline void scaled_at_least(const float* z, int64_t n, float temp, float tau,
                            std::vector<float>& out) {
  out.resize(n);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float s = z[i] / temp;
    out[m] = s;
    m += s >= tau;
  }
  out.resize(m);
}

constexpr int64_t kTopPExactList = 2048;  // candidate sets up to this size are sorted outright
constexpr int kTopPBinsPerUnit = 64;      // histogram bins per unit of s below s_max
constexpr int kTopPBins = 4096;           // covers s_max - s < 64 (exp(-64) ~ 1.6e-28); the last
                                          // bin also takes everything further down

// Histogram of the tokens with s >= tau by bin(s) = floor((s_max - s) * kTopPBinsPerUnit)
// (clamped to the last bin; tokens below tau get bin kTopPBins), with each bin's fp32 mass
// exp(s - s_max) summed in float64.
template <bool kAvx2>
IVL_VEC_INLINE void top_p_histogram(const float* z, int64_t n, float temp, float s_max, float tau,
                                    Workspace& ws) {
  using F = typename vec::Native<kAvx2>::F;
  using I = typename vec::Native<kAvx2>::I;
  constexpr int L = vec::lanes<F>;
  constexpr float kLast = static_cast<float>(kTopPBins - 1);
  ws.mass.assign(kTopPBins + 1, 0.0);
  double* mass = ws.mass.data();
  ws.bins.resize(n);
  int32_t* bins = ws.bins.data();
  constexpr int64_t kStep = 256;
  alignas(32) float e[kStep];
  for (int64_t c0 = 0; c0 < n; c0 += kStep) {
    const int64_t m = std::min(kStep, n - c0);
    int64_t j = 0;
    for (; j + L <= m; j += L) {
      const F sv = vec::load<F>(z + c0 + j) / temp;
      const F d = s_max - sv;  // >= 0; +inf for -inf logits
      const F fb = d * static_cast<float>(kTopPBinsPerUnit);
      I b = __builtin_convertvector(fb < kLast ? fb : vec::splat<F>(kLast), I);
      b = sv >= tau ? b : I{} + kTopPBins;
      std::memcpy(bins + c0 + j, &b, sizeof b);
      vec::store(e + j, vec::exp_nonpos(-d));
    }
    for (; j < m; ++j) {
      const float sv = z[c0 + j] / temp;
      const float d = s_max - sv;
      const float fb = d * static_cast<float>(kTopPBinsPerUnit);
      const int32_t b = fb < kLast ? static_cast<int32_t>(fb) : kTopPBins - 1;
      bins[c0 + j] = sv >= tau ? b : kTopPBins;
      e[j] = exp_nonpos(-d);
    }
    for (j = 0; j < m; ++j) mass[bins[c0 + j]] += e[j];
  }
}

// s of the tokens whose histogram bin lies in [first, last], in index order.
template <bool kAvx2>
IVL_VEC_INLINE void scaled_in_bins(const float* z, int64_t n, float temp, const int32_t* bins,
                                   int32_t first, int32_t last, std::vector<float>& out) {
  using I = typename vec::Native<kAvx2>::I;
  constexpr int L = vec::lanes<I>;
  out.clear();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    I b;
    std::memcpy(&b, bins + i, sizeof b);
    if (!vec::any((b >= first) & (b <= last))) continue;
    for (int j = 0; j < L; ++j) {
      if (bins[i + j] >= first && bins[i + j] <= last) out.push_back(z[i + j] / temp);
    }
  }
  for (; i < n; ++i) {
    if (bins[i] >= first && bins[i] <= last) out.push_back(z[i] / temp);
  }
}

// top-p threshold over the tokens with s >= tau (the top-k set). Small sets are sorted and walked
// exactly as the reference walks them. Large sets (flat rows) go through a histogram of
// s_max - s holding each bin's mass: the walk then only sorts the bin where the cumulative mass
// crosses top_p, starting from the mass of the bins above it (fp32 exp summed in float64: the
// kept set can differ from the reference's only when top_p falls within ~1e-7 relative of a
// cumulative mass, and the token only if that boundary token is also the one drawn).
template <bool kAvx2>
IVL_VEC_INLINE float top_p_threshold(const float* z, int64_t n, float temp, float s_max,
                                     float tau, float top_p, Workspace& ws) {
  std::vector<float>& list = ws.a;
  if (tau > -INFINITY || n <= kTopPExactList) {
    scaled_at_least(z, n, temp, tau, list);
    if (static_cast<int64_t>(list.size()) <= kTopPExactList) {
      std::sort(list.begin(), list.end(), std::greater<float>());
      const double total = softmax_weights(list, s_max, ws.weight);
      const float t = top_p_walk(list.data(), ws.weight.data(), static_cast<int64_t>(list.size()),
                                 total, top_p);
      return t == t ? t : s_max;
    }
  }
  top_p_histogram<kAvx2>(z, n, temp, s_max, tau, ws);
  const double* mass = ws.mass.data();
  double total = 0.0;
  for (int b = 0; b < kTopPBins; ++b) total += mass[b];
  const double target = static_cast<double>(top_p) * total;
  int cross = kTopPBins - 1;
  double above = 0.0;
  for (int b = 0; b < kTopPBins; ++b) {
    if (above + mass[b] >= target) {
      cross = b;
      break;
    }
    above += mass[b];
  }
  // Walk the crossing bin; if rounding put the boundary above it, walk everything above too.
  for (int first = cross;; first = 0) {
    scaled_in_bins<kAvx2>(z, n, temp, ws.bins.data(), first, cross, list);
    std::sort(list.begin(), list.end(), std::greater<float>());
    softmax_weights(list, s_max, ws.weight);
    double before = 0.0;
    for (int b = 0; b < first; ++b) before += mass[b];
    const float t = top_p_walk(list.data(), ws.weight.data(), static_cast<int64_t>(list.size()),
                               total, top_p, before / total);
    if (t == t) return t;
    if (first == 0) return s_max;
  }
}

// The threshold tau on s = z / T of a valid, filtered, sampled row: kept = {v : s[v] >= tau}.
template <bool kAvx2>
IVL_VEC_INLINE float filter_threshold_impl(const float* z, int64_t n, const SampleRow& p,
                                           const RowStats& st, Workspace& ws) {
  const float s_max = p.scale(st.zmax);
  float tau = -INFINITY;
  if (p.use_top_k(n)) tau = p.scale(kth_largest(z, n, p.top_k, ws));
  if (p.use_top_p()) {
    const float t = top_p_threshold<kAvx2>(z, n, p.temperature, s_max, tau, p.top_p, ws);
    tau = t > tau ? t : tau;
  }
  if (p.use_min_p()) {
    const float t = min_p_threshold(s_max, p.min_p);
    tau = t > tau ? t : tau;
  }
  return tau < s_max ? tau : s_max;  // the most likely token always survives
}

inline float filter_threshold_generic(const float* z, int64_t n, const SampleRow& p,
                                      const RowStats& st, Workspace& ws) {
  return filter_threshold_impl<false>(z, n, p, st, ws);
}
#if IVL_X86_DISPATCH
__attribute__((target("avx2"), flatten)) inline float filter_threshold_avx2(
    const float* z, int64_t n, const SampleRow& p, const RowStats& st, Workspace& ws) {
  return filter_threshold_impl<true>(z, n, p, st, ws);
}
#endif

inline float filter_threshold(bool avx2, const float* z, int64_t n, const SampleRow& p,
                              const RowStats& st, Workspace& ws) {
#if IVL_X86_DISPATCH
  if (avx2) return filter_threshold_avx2(z, n, p, st, ws);
#endif
  (void)avx2;
  return filter_threshold_generic(z, n, p, st, ws);
}

}  // namespace cpu
}  // namespace ivl
