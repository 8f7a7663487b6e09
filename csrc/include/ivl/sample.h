// Per-row math of merge_sample and merged_log_softmax: validity, max / argmax, log-sum-exp, the
// Gumbel race over the shared Philox stream, and the top-k / top-p / min-p thresholds.
//
// ivl/ops/reference.py is the spec. In short, for a valid row z (fp32, merged) and s = z / T:
//   token = argmax over kept v of  fl(s[v] + g[v]),  g[v] = -log(-log1p(-min(w[v], 1 - 2^-24)))
// with w[v] = uniform(seed, step, v) and ties to the lowest index; greedy (T = 0) is argmax z.
// Every filter keeps an upper set of s (ties kept), so the kept set is {v : s[v] >= tau} for one
// threshold tau = max(tau_top_k, tau_top_p, tau_min_p), and the most likely token always stays.
//
// Framework-free: raw pointers, no torch. The scalar pieces are IVL_HOST_DEVICE; the threshold
// searches use the C++ standard library and are host-only (see sample_cpu.h for the CPU driver).
#pragma once

#include <cmath>
#include <cstdint>

#include "ivl/common.h"
#include "ivl/philox.h"

namespace ivl {

constexpr int64_t kInvalidToken = -1;           // token of a row with no distribution
constexpr float kOneBelowOne = 0x1.fffffep-1f;  // 1 - 2^-24: keeps every Gumbel draw finite
constexpr float kLog2e = 1.44269504088896341f;

// Standard Gumbel noise from one uniform of the stream, as the reference computes it in fp32.
// Each fp32 result is correctly rounded (double evaluation, one rounding); torch's fp32 log1p /
// log are within 1 ulp of that, so a key can differ in its last bit from the reference's in rare
// near-midpoint cases, which changes a token only if two keys tie to within that bit.
// Range over w in [2^-33, 1]: g in [-2.8115, 22.8719].
IVL_HOST_DEVICE inline float gumbel_from_uniform(float w) {
  w = w < kOneBelowOne ? w : kOneBelowOne;
  const float e = -static_cast<float>(log1p(-static_cast<double>(w)));
  return -static_cast<float>(log(static_cast<double>(e)));
}

// The race key of vocab index v: fl(s + g[v]).
IVL_HOST_DEVICE inline float gumbel_key(float s, int64_t seed, int64_t step, int64_t v) {
  return add_rn(s, gumbel_from_uniform(uniform(seed, step, v)));
}

// Race screen. A token with scaled logit s can reach key >= bound only if its uniform w satisfies
// log2(w) <= (s - bound) * log2(e) (up to rounding): -log1p(-w) >= w, so g >= bound - s forces
// w <= exp(s - bound). screen_limit returns that bound on log2(w) with a generous margin (one
// binade, plus the rounding of keys of large magnitude); the floor of log2(w) is the exponent of
// the fp32 w, so the test costs an integer shift and a compare, and no transcendental. Only the
// few tokens that pass get their exact key. Exact: a token that fails could never win or tie.
IVL_HOST_DEVICE inline float screen_margin(float bound) { return 1.0f + fabsf(bound) * 0x1p-19f; }

IVL_HOST_DEVICE inline float screen_limit(float s, float bound, float margin) {
  return (s - bound) * kLog2e + margin;
}

// floor(log2(w)) for a normal positive fp32 w (uniforms are >= 2^-33).
IVL_HOST_DEVICE inline float uniform_log2_floor(float w) {
  return static_cast<float>(static_cast<int32_t>(float_to_bits(w) >> 23) - 127);
}

// Lowest log2(w) the stream can produce: a block whose screen limits are all below it is
// skipped without drawing its random numbers.
constexpr float kMinUniformLog2 = -33.0f;

// Sampling settings of one row, as validated by ivl/ops/_params.py.
struct SampleRow {
  float temperature;  // 0 = greedy
  int64_t top_k;      // 0 (or >= V) = off
  float top_p;        // >= 1 = off
  float min_p;        // <= 0 = off
  int64_t seed, step;

  IVL_HOST_DEVICE bool greedy() const { return temperature == 0.0f; }
  IVL_HOST_DEVICE bool use_top_k(int64_t vocab) const { return top_k > 0 && top_k < vocab; }
  IVL_HOST_DEVICE bool use_top_p() const { return !(top_p >= 1.0f); }
  IVL_HOST_DEVICE bool use_min_p() const { return min_p > 0.0f; }
  IVL_HOST_DEVICE bool filtered(int64_t vocab) const {
    return use_top_k(vocab) || use_top_p() || use_min_p();
  }
  IVL_HOST_DEVICE float scale(float z) const { return z / temperature; }  // s = fl(z / T)
};

// The leader of a Gumbel race: best key so far, its index, and its merged logit z.
struct RaceBest {
  float key = -INFINITY;
  int64_t index = -1;
  float z = 0.0f;

  // Offer a candidate; callers offer in increasing index order, so ties keep the lower index.
  IVL_HOST_DEVICE void offer(float k, int64_t v, float zv) {
    if (k > key) key = k, index = v, z = zv;
  }
  // Merge the leader of a later span (higher indices).
  IVL_HOST_DEVICE void merge(const RaceBest& later) {
    if (later.key > key) *this = later;
  }
};

// What one pass over a span of a row learns; merged in index order. Spans are fixed by the
// vocabulary size alone, never by the thread count, so every merged result (incl. the float
// sums) is the same however many threads ran.
struct RowStats {
  float zmax = -INFINITY;  // largest merged logit, NaN ignored
  int64_t argmax = -1;     // its lowest index
  bool has_nan = false, has_posinf = false, has_finite = false;
  float lse_ref = -INFINITY;  // log-sum-exp state: sum of exp(z - lse_ref)
  double lse_sum = 0.0;
  RaceBest race;  // unfiltered sampling rows: the race over the span

  IVL_HOST_DEVICE bool valid() const { return has_finite && !has_nan && !has_posinf; }

  IVL_HOST_DEVICE void add_lse(float ref, double sum) {
    if (!(ref > -INFINITY)) return;  // nothing finite in the span
    if (ref > lse_ref) {
      lse_sum = (lse_ref > -INFINITY ? lse_sum * exp(static_cast<double>(lse_ref) - ref) : 0.0);
      lse_ref = ref;
    } else {
      sum *= exp(static_cast<double>(ref) - lse_ref);
    }
    lse_sum += sum;
  }

  IVL_HOST_DEVICE void merge(const RowStats& later) {
    if (later.zmax > zmax) zmax = later.zmax, argmax = later.argmax;
    has_nan |= later.has_nan;
    has_posinf |= later.has_posinf;
    has_finite |= later.has_finite;
    add_lse(later.lse_ref, later.lse_sum);
    race.merge(later.race);
  }

  // log_softmax(z)[v] given z[v]; lse_ref == zmax once every span is merged.
  IVL_HOST_DEVICE float logprob(float zv) const {
    return static_cast<float>(static_cast<double>(zv - zmax) - log(lse_sum));
  }
};

// exp(x) for x <= 0 in fp32 for sums (log-sum-exp, top-p masses), never for a comparison the
// reference makes bit-exactly: 2^k * p(f) with t = x log2(e) = k + f, |f| <= 1/2, p a degree-5
// minimax polynomial with p(0) = 1 (relative error 9e-8). Rounding t adds a relative error of
// about |x| 2^-24 to the term, which weighs e^x |x| <= 0.37 ulp in a sum. Below -80 (and for
// -inf) it returns exp(-80) ~ 1.8e-35, a normal number: no denormal slow paths. Branch-free so
// loops over it vectorise; sample_cpu.h has the lane-by-lane twin (same operations, same bits).
IVL_HOST_DEVICE inline float exp_nonpos(float x) {
  x = x > -80.0f ? x : -80.0f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = mul_rn(x, kLog2e);
  const float r = add_rn(t, magic);
  const float f = t - (r - magic);
  const int32_t k = static_cast<int32_t>(float_to_bits(r) - float_to_bits(magic));
  float p = 1.326711732e-3f;
  p = add_rn(mul_rn(p, f), 9.671597742e-3f);
  p = add_rn(mul_rn(p, f), 5.550726503e-2f);
  p = add_rn(mul_rn(p, f), 2.402224094e-1f);
  p = add_rn(mul_rn(p, f), 6.931470037e-1f);
  p = add_rn(mul_rn(p, f), 1.0f);
  return p * bits_to_float(static_cast<uint32_t>(k + 127) << 23);
}

// min-p threshold on s: the smallest fp32 t with exp(t - s_max) >= min_p, evaluated in float64
// like the reference (rel = exp(s.double() - s_max.double())). Starts at the real root and steps
// by ulps (exp is monotone, so a few steps at most).
IVL_HOST_DEVICE inline float min_p_threshold(float s_max, float min_p) {
  const double target = static_cast<double>(min_p);
  auto ok = [&](float t) { return exp(static_cast<double>(t) - s_max) >= target; };
  if (!(min_p > 0.0f)) return -INFINITY;
  if (!(min_p <= 1.0f)) return s_max;  // out of contract: keep the most likely token(s)
  float t = static_cast<float>(static_cast<double>(s_max) + log(target));
  if (!(t <= s_max)) t = s_max;
  for (int i = 0; i < 64 && !ok(t); ++i) t = nextafterf(t, INFINITY);
  for (int i = 0; i < 64; ++i) {
    const float lower = nextafterf(t, -INFINITY);
    if (!ok(lower)) break;
    t = lower;
  }
  return t;
}

// top-p on a sorted list, following the reference step by step in float64: desc holds s values
// sorted descending, weight[i] = exp(desc[i] - s_max) in float64, and the list is preceded (in the
// full sorted row) by tokens of probability mass `mass_before` that are all inside; total is the
// softmax denominator of the whole top-k set. prob = weight / total; a position is inside when
// the mass strictly above it (the running cumulative sum minus its own prob) is < top_p; the
// threshold is the value at position (count inside) - 1. Returns NaN when no position of the list
// is inside. The walk stops once the cumulative mass is past top_p by more than rounding: the
// mass above every later position is at least that.
IVL_HOST_DEVICE inline float top_p_walk(const float* desc, const double* weight, int64_t n,
                                        double total, float top_p, double mass_before = 0.0) {
  const double p = static_cast<double>(top_p);
  double cum = mass_before;
  int64_t inside = 0;
  for (int64_t i = 0; i < n && cum < p + 1e-12; ++i) {
    const double prob = weight[i] / total;
    cum += prob;
    inside += (cum - prob < p);
  }
  return inside > 0 ? desc[inside - 1] : NAN;
}

}  // namespace ivl
