// Tests of the framework-free kernel core (no torch): Philox known-answer vectors, the uniform
// mapping, 16-bit widening, the merge rule on hand-checked cases, and the sampling math of
// sample.h / sample_cpu.h (Gumbel bounds, the race screen, thresholds on hand-checked rows, the
// race and the span pass against brute force, generic vs AVX2 builds). Run by `make ctest`.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "ivl/merge.h"
#include "ivl/philox.h"
#include "ivl/sample.h"
#include "ivl/sample_cpu.h"

namespace {

int g_passed = 0;
int g_failed = 0;

void check(bool ok, const char* what, int line) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL (line %d): %s\n", line, what);
  }
}
#define CHECK(cond) check((cond), #cond, __LINE__)

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Bitwise equality: the contract is bit-exact, so -0 != +0 and NaN matches NaN.
bool same(float a, float b) {
  if (a != a && b != b) return true;
  return float_bits(a) == float_bits(b);
}

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Random123's kat_vectors for philox4x32_10: (counter, key) -> output.
void test_philox_kat() {
  struct Kat {
    ivl::Philox4x32 ctr;
    uint32_t k0, k1;
    ivl::Philox4x32 out;
  };
  const Kat kats[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}}},
      {{{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}},
       0xffffffff,
       0xffffffff,
       {{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}}},
      {{{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}},
       0xa4093822,
       0x299f31d0,
       {{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}}},
  };
  for (const Kat& k : kats) {
    const ivl::Philox4x32 got = ivl::philox4x32_10(k.ctr, k.k0, k.k1);
    for (int j = 0; j < 4; ++j) CHECK(got.v[j] == k.out.v[j]);
  }
}

void test_uniform() {
  CHECK(ivl::bits_to_uniform(0u) == 0x1p-33f);         // never 0: log(w) stays finite
  CHECK(ivl::bits_to_uniform(0xffffffffu) == 1.0f);    // 2^32 - 1 rounds up to 2^32
  CHECK(ivl::bits_to_uniform(1u) == 0x1.8p-32f);       // 2^-32 + 2^-33, exact
  CHECK(ivl::bits_to_uniform(0x80000000u) == 0.5f);    // + 2^-33 is below half an ulp of 0.5
  CHECK(ivl::bits_to_uniform(0xfffffe00u) < 1.0f);     // largest x below 1 after rounding

  // seed 0, step 0, v = 0..3 is counter 0, key 0: the first known-answer vector.
  const uint32_t kat0[4] = {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8};
  for (int v = 0; v < 4; ++v) CHECK(ivl::uniform(0, 0, v) == ivl::bits_to_uniform(kat0[v]));

  // Word layout: key = (seed lo, seed hi), counter = (v >> 2, 0, step lo, step hi), lane v & 3.
  // A negative seed is its two's complement bit pattern.
  const int64_t seed = -2;  // 0xffffffff_fffffffe
  const int64_t step = (int64_t(1) << 32) + 5;
  const int64_t v = 4 * 7 + 2;
  const ivl::Philox4x32 w = ivl::philox4x32_10({{7, 0, 5, 1}}, 0xfffffffeu, 0xffffffffu);
  CHECK(ivl::uniform(seed, step, v) == ivl::bits_to_uniform(w.v[2]));
  // Vocab indices beyond 2^32 keep counting in word 0 (v >> 2 fits 32 bits for V < 2^34).
  const ivl::Philox4x32 w2 = ivl::philox4x32_10({{0x40000000u, 0, 0, 0}}, 3, 0);
  CHECK(ivl::uniform(3, 0, (int64_t(1) << 32) + 1) == ivl::bits_to_uniform(w2.v[1]));
}

void test_half_widening() {
  CHECK(float(ivl::bf16{0x3fc0}) == 1.5f);
  CHECK(float(ivl::bf16{0xff80}) == -kInf);
  CHECK(float(ivl::bf16{0x7fc0}) != float(ivl::bf16{0x7fc0}));  // NaN
  CHECK(float(ivl::fp16{0x3e00}) == 1.5f);
  CHECK(float(ivl::fp16{0x3c01}) == 1.0f + 0x1p-10f);
  CHECK(float(ivl::fp16{0x7bff}) == 65504.0f);       // largest finite
  CHECK(float(ivl::fp16{0x0001}) == 0x1p-24f);       // smallest subnormal
  CHECK(float(ivl::fp16{0x03ff}) == 1023 * 0x1p-24f);  // largest subnormal
  CHECK(float(ivl::fp16{0x0400}) == 0x1p-14f);       // smallest normal
  CHECK(float(ivl::fp16{0x7c00}) == kInf);
  CHECK(float(ivl::fp16{0xfc00}) == -kInf);
  CHECK(float(ivl::fp16{0x7e00}) != float(ivl::fp16{0x7e00}));  // NaN
  CHECK(same(float(ivl::fp16{0x8000}), -0.0f));
}

ivl::MergeParams no_map(int64_t vocab_limit, int64_t value_cols) {
  return {nullptr, nullptr, 0.0f, vocab_limit, value_cols};
}

void test_merge_identity() {
  const float base[4] = {1.0f, -2.0f, -0.0f, 7.0f};
  const float value[4] = {2.0f, kInf, kNaN, 1.0f};
  const ivl::MergeParams p = no_map(3, 4);

  // No value network: base passes through; ids >= vocab_limit are -inf.
  CHECK(same(ivl::merge_one(base, (const float*)nullptr, 0.5f, 0, p), 1.0f));
  CHECK(same(ivl::merge_one(base, (const float*)nullptr, 0.5f, 2, p), -0.0f));
  CHECK(same(ivl::merge_one(base, (const float*)nullptr, 0.5f, 3, p), -kInf));

  CHECK(same(ivl::merge_one(base, value, 0.5f, 0, p), 2.0f));
  CHECK(same(ivl::merge_one(base, value, 0.5f, 1, p), kInf));
  CHECK(same(ivl::merge_one(base, value, 0.5f, 2, p), kNaN));
  CHECK(same(ivl::merge_one(base, value, 0.5f, 3, p), -kInf));
  CHECK(same(ivl::merge_one(base, value, -1.0f, 1, p), -kInf));

  // alpha = 0 skips the value: inf and NaN value logits don't leak, -0 stays -0.
  for (int b = 0; b < 3; ++b) CHECK(same(ivl::merge_one(base, value, 0.0f, b, p), base[b]));
  CHECK(same(ivl::merge_one(base, value, -0.0f, 1, p), -2.0f));

}

// merge_span (restructured for vectorisation) must equal merge_one id by id, for every span
// position relative to vocab_limit, with and without value and map, alpha zero or not.
void test_merge_span_matches_merge_one() {
  const float base[8] = {1.0f, -0.0f, kInf, -kInf, kNaN, 3.0f, -2.5f, 0.0f};
  const ivl::fp16 value[8] = {{0x3c00}, {0x7c00}, {0x7e00}, {0xfc00},
                              {0x0001}, {0xbc00}, {0x8000}, {0x4000}};
  const int64_t index[8] = {7, -1, 2, 0, 5, -1, 3, 1};
  const float weight[8] = {1.0f, 1.0f, 0.0f, 0.5f, 0.25f, 1.0f, 2.0f, 1.0f};
  const float alphas[4] = {0.0f, -0.0f, 0.5f, -3.0f};
  int mismatches = 0;
  for (int with_map = 0; with_map < 2; ++with_map) {
    for (int with_value = 0; with_value < 2; ++with_value) {
      for (float a : alphas) {
        for (int64_t limit = 0; limit <= 8; ++limit) {
          const ivl::MergeParams p{with_map ? index : nullptr, with_map ? weight : nullptr, 1.5f,
                                   limit, 8};
          const ivl::fp16* v = with_value ? value : nullptr;
          for (int64_t begin = 0; begin <= 8; ++begin) {
            for (int64_t end = begin; end <= 8; ++end) {
              float out[8];
              for (float& o : out) o = 12345.0f;
              ivl::merge_span(base, v, a, p, begin, end, out);
              for (int64_t b = 0; b < 8; ++b) {
                const bool in_span = begin <= b && b < end;
                const float want = in_span ? ivl::merge_one(base, v, a, b, p) : 12345.0f;
                mismatches += !same(out[b], want);
              }
            }
          }
        }
      }
    }
  }
  CHECK(mismatches == 0);
}

void test_merge_no_fma() {
  // (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 rounds to 1 + 2^-11 (tie to even); an FMA would keep the
  // 2^-24 and give 2^-11 + 2^-24 after adding -1.
  const float x = 1.0f + 0x1p-12f;
  const float base[1] = {-1.0f};
  const float value[1] = {x};
  CHECK(same(ivl::merge_one(base, value, x, 0, no_map(1, 1)), 0x1p-11f));
}

void test_merge_map() {
  // base id:          0     1      2     3     4      5
  const float base[6] = {1.0f, -0.0f, 5.0f, 2.0f, 1.0f, 0.0f};
  const int64_t index[6] = {2, -1, 0, 3, 1, -7};
  const float weight[6] = {0.5f, 1.0f, 0.0f, 1.0f, 1.0f / 3.0f, 1.0f};
  const float value[3] = {kNaN, 9.0f, 30.0f};
  const ivl::MergeParams p{index, weight, 3.0f, 6, 3};
  const float a = 2.0f;

  CHECK(same(ivl::merge_one(base, value, a, 0, p), 1.0f + 1.0f * 30.0f));  // s = a * w
  CHECK(same(ivl::merge_one(base, value, a, 1, p), 6.0f));  // unmapped: base + a * fill
  CHECK(same(ivl::merge_one(base, value, a, 2, p), 5.0f));  // weight 0 skips the NaN value
  CHECK(same(ivl::merge_one(base, value, a, 3, p), kNaN));  // id 3 >= Vv: NaN, not a read
  CHECK(same(ivl::merge_one(base, value, a, 5, p), 6.0f));  // any negative id is unmapped
  // s = fl(a * w) is rounded before it scales the value.
  const float s = 2.0f * (1.0f / 3.0f);
  CHECK(same(ivl::merge_one(base, value, a, 4, p), 1.0f + s * 9.0f));

  // Unmapped with a * fill == 0 returns base itself (so -0 stays -0, not -0 + 0 = +0).
  const ivl::MergeParams p0{index, weight, 0.0f, 6, 3};
  CHECK(same(ivl::merge_one(base, value, a, 1, p0), -0.0f));
  CHECK(same(ivl::merge_one(base, value, 0.0f, 1, p), -0.0f));

  // vocab_limit applies before the map.
  const ivl::MergeParams p4{index, weight, 3.0f, 4, 3};
  CHECK(same(ivl::merge_one(base, value, a, 4, p4), -kInf));
  CHECK(same(ivl::merge_one(base, value, a, 5, p4), -kInf));
}

void test_merge_16bit() {
  const ivl::bf16 base[3] = {{0x3fc0}, {0xff80}, {0x4000}};  // 1.5, -inf, 2
  const ivl::fp16 value[3] = {{0x3e00}, {0x3c00}, {0x7c00}};  // 1.5, 1, inf
  const ivl::MergeParams p = no_map(3, 3);
  CHECK(same(ivl::merge_one(base, value, 2.0f, 0, p), 4.5f));
  CHECK(same(ivl::merge_one(base, value, 2.0f, 1, p), -kInf));
  CHECK(same(ivl::merge_one(base, value, 2.0f, 2, p), kInf));
  CHECK(same(ivl::merge_one(base, value, 0.0f, 2, p), 2.0f));
  // Mixed order of storage types, and fp32 value with 16-bit base.
  const float fvalue[3] = {0.25f, 0.5f, 1.0f};
  CHECK(same(ivl::merge_one(value, fvalue, 4.0f, 1, p), 3.0f));
  CHECK(same(ivl::merge_one(value, base, 1.0f, 0, p), 3.0f));
}


// The branch-free fp16 widening against the textbook loop, for all 65536 bit patterns.
float fp16_reference(uint16_t bits) {
  const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
  const uint32_t exp = (bits >> 10) & 0x1fu;
  uint32_t man = bits & 0x3ffu;
  if (exp == 0x1f) return ivl::bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return ivl::bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return ivl::bits_to_float(sign);
  int e = 113;
  while ((man & 0x400u) == 0) man <<= 1, --e;
  return ivl::bits_to_float(sign | (uint32_t(e) << 23) | ((man & 0x3ffu) << 13));
}

void test_fp16_exhaustive() {
  int bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) bad += !same(float(ivl::fp16{uint16_t(b)}), fp16_reference(uint16_t(b)));
  CHECK(bad == 0);
}

// ---------------------------------------------------------------------------------------------
// Sampling math
// ---------------------------------------------------------------------------------------------
void test_gumbel_range() {
  const float g_max = ivl::gumbel_from_uniform(0x1p-33f);  // smallest uniform
  const float g_min = ivl::gumbel_from_uniform(1.0f);      // clamped to 1 - 2^-24
  CHECK(std::fabs(g_max - 22.8739f) < 1e-3f);  // 33 ln 2
  CHECK(std::fabs(g_min - (-2.8115f)) < 1e-3f);
  CHECK(same(ivl::gumbel_from_uniform(ivl::kOneBelowOne), g_min));
  // Decreasing in w, finite everywhere on the stream's range.
  float prev = INFINITY;
  bool mono = true, finite = true;
  for (float w = 0x1p-33f; w <= 1.0f; w *= 1.37f) {
    const float g = ivl::gumbel_from_uniform(w);
    mono &= g <= prev;
    finite &= std::isfinite(g);
    prev = g;
  }
  CHECK(mono);
  CHECK(finite);
  // The screen's floor(log2 w) reads the fp32 exponent.
  CHECK(ivl::uniform_log2_floor(1.0f) == 0.0f);
  CHECK(ivl::uniform_log2_floor(0.75f) == -1.0f);
  CHECK(ivl::uniform_log2_floor(0x1p-33f) == ivl::kMinUniformLog2);
}

// The screen must pass every token whose exact key reaches the bound (else a winner is lost).
void test_screen_is_conservative() {
  std::mt19937 gen(1);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  int missed = 0, passed = 0, reached = 0;
  const float leads[] = {-50.0f, -1.0f, 0.0f, 3.5f, 20.0f, 1000.0f, 1e6f};
  for (float lead : leads) {
    const float margin = ivl::screen_margin(lead);
    for (int i = 0; i < 200000; ++i) {
      // s within the reachable range below and a little above the lead; w spread over binades.
      const float s = lead - 25.0f * unit(gen) + 1.0f;
      const float w = std::max(0x1p-33f, std::ldexp(unit(gen), -int(34 * unit(gen))));
      const float key = ivl::add_rn(s, ivl::gumbel_from_uniform(w));
      const bool pass = ivl::uniform_log2_floor(w) <= ivl::screen_limit(s, lead, margin) ||
                        s >= lead;
      reached += key >= lead;
      passed += pass;
      missed += key >= lead && !pass;
    }
  }
  CHECK(missed == 0);
  CHECK(reached > 1000);  // the test exercises the boundary
  // With the stream's uniform w, the screen rejects most tokens more than a few units below.
  int rejected = 0;
  for (int i = 0; i < 100000; ++i) {
    const float s = -25.0f * unit(gen) + 1.0f;
    const float w = ivl::uniform(9, 1, i);
    rejected += !(ivl::uniform_log2_floor(w) <= ivl::screen_limit(s, 0.0f, 1.0f) || s >= 0.0f);
  }
  CHECK(rejected > 80000);
  (void)passed;
}

void test_exp_nonpos() {
  // Relative error: the polynomial and roundings (~2 ulp) plus ~|x| 2^-24 from rounding x log2(e)
  // (and log2(e) itself).
  double worst = 0.0;
  for (float x = -79.9f; x <= 0.0f; x += 0.0137f) {
    const double want = std::exp(double(x));
    const double err = std::fabs(ivl::exp_nonpos(x) - want) / want;
    worst = std::max(worst, err / (2.5e-7 + std::fabs(x) * 1e-7));
  }
  CHECK(worst <= 1.0);
  CHECK(ivl::exp_nonpos(0.0f) == 1.0f);
  CHECK(ivl::exp_nonpos(-INFINITY) > 0.0f && ivl::exp_nonpos(-INFINITY) < 1e-34f);
  // The vector build gives the same bits as the scalar one.
  alignas(32) float in[8] = {0.0f, -0.1f, -1.0f, -3.3f, -17.0f, -79.0f, -100.0f, -INFINITY};
  const auto v = ivl::cpu::vec::exp_nonpos(ivl::cpu::vec::load<ivl::cpu::vec::f4>(in));
  const auto u = ivl::cpu::vec::exp_nonpos(ivl::cpu::vec::load<ivl::cpu::vec::f4>(in + 4));
  for (int j = 0; j < 4; ++j) CHECK(same(v[j], ivl::exp_nonpos(in[j])));
  for (int j = 0; j < 4; ++j) CHECK(same(u[j], ivl::exp_nonpos(in[4 + j])));
}

void test_min_p_threshold() {
  CHECK(ivl::min_p_threshold(2.0f, 1.0f) == 2.0f);  // only the maximum (and its ties)
  CHECK(ivl::min_p_threshold(2.0f, 0.0f) == -INFINITY);
  const float s_max = 3.25f, min_p = 0.1f;
  const float t = ivl::min_p_threshold(s_max, min_p);
  auto ok = [&](float x) { return std::exp(double(x) - s_max) >= double(min_p); };
  CHECK(ok(t));
  CHECK(!ok(std::nextafter(t, -INFINITY)));
  CHECK(std::fabs(t - (s_max + std::log(min_p))) < 1e-5f);
}

float walk(const std::vector<float>& desc, float top_p) {
  std::vector<double> weight;
  const double total = ivl::cpu::softmax_weights(desc, desc[0], weight);
  return ivl::top_p_walk(desc.data(), weight.data(), int64_t(desc.size()), total, top_p);
}

void test_top_p_walk() {
  // probs of (2, 1, 0): 0.665, 0.245, 0.090; mass strictly above: 0, 0.665, 0.910.
  const std::vector<float> desc = {2.0f, 1.0f, 0.0f};
  CHECK(walk(desc, 0.6f) == 2.0f);
  CHECK(walk(desc, 0.7f) == 1.0f);
  CHECK(walk(desc, 0.95f) == 0.0f);
  // Ties at the boundary are kept: four equal tokens, top_p 0.5 -> threshold is their value.
  CHECK(walk({0.5f, 0.5f, 0.5f, 0.5f}, 0.5f) == 0.5f);
  // A boundary exactly at a cumulative mass is outside (mass above must be < top_p): with
  // probs 0.5, 0.25, 0.25 and top_p 0.5 the second token has mass 0.5 above it.
  const float l2 = float(-std::log(2.0));
  CHECK(walk({0.0f, l2, l2 - 1e-3f}, 0.5f) == 0.0f);
  CHECK(walk({0.0f, l2, l2 - 1e-3f}, 0.51f) == l2);
  // top_p <= 0 (out of contract): nothing inside -> NaN, callers keep only the maximum.
  CHECK(std::isnan(walk(desc, 0.0f)));
}

void test_kth_largest() {
  ivl::cpu::Workspace ws;
  const float row[5] = {5.0f, 1.0f, 5.0f, 3.0f, 5.0f};
  CHECK(ivl::cpu::kth_largest(row, 5, 1, ws) == 5.0f);
  CHECK(ivl::cpu::kth_largest(row, 5, 3, ws) == 5.0f);
  CHECK(ivl::cpu::kth_largest(row, 5, 4, ws) == 3.0f);
  // Long rows (sampled pre-filter) with ties and -inf, against a full sort.
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  for (int64_t n : {int64_t(4096), int64_t(50000), int64_t(151936)}) {
    std::vector<float> z(n);
    for (float& x : z) x = std::round(normal(gen) * 8.0f) / 4.0f;  // many ties
    for (int64_t i = 0; i < n; i += 97) z[i] = -INFINITY;
    std::vector<float> sorted = z;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    for (int64_t k : {int64_t(1), int64_t(2), int64_t(50), int64_t(63), int64_t(1000), n / 3, n - 1}) {
      CHECK(ivl::cpu::kth_largest(z.data(), n, k, ws) == sorted[k - 1]);
    }
  }
}

// Reference-style filter threshold: sort s, walk the float64 cumulative mass.
float brute_threshold(const std::vector<float>& z, const ivl::SampleRow& p) {
  const int64_t n = int64_t(z.size());
  std::vector<float> s(n);
  for (int64_t i = 0; i < n; ++i) s[i] = z[i] / p.temperature;
  std::vector<float> desc = s;
  std::sort(desc.begin(), desc.end(), std::greater<float>());
  float tau = -INFINITY;
  int64_t m = n;
  if (p.use_top_k(n)) {
    tau = desc[p.top_k - 1];
    m = std::count_if(desc.begin(), desc.end(), [&](float x) { return x >= tau; });
  }
  if (p.use_top_p()) {
    // The reference's walk over the whole top-k set, written out: no early exit, no helpers.
    double total = 0.0;
    for (int64_t i = 0; i < m; ++i) total += std::exp(double(desc[i]) - desc[0]);
    double cum = 0.0;
    int64_t inside = 0;
    for (int64_t i = 0; i < m; ++i) {
      const double prob = std::exp(double(desc[i]) - desc[0]) / total;
      cum += prob;
      inside += (cum - prob < double(p.top_p));
    }
    tau = std::max(tau, desc[std::max<int64_t>(inside, 1) - 1]);
  }
  if (p.use_min_p()) tau = std::max(tau, ivl::min_p_threshold(desc[0], p.min_p));
  return std::min(tau, desc[0]);
}

void test_filter_threshold() {
  std::mt19937 gen(11);
  std::normal_distribution<float> normal;
  ivl::cpu::Workspace ws;
  int bad = 0, cases = 0;
  for (int64_t n : {int64_t(37), int64_t(5000), int64_t(60000)}) {
    for (float scale : {0.5f, 3.0f}) {
      std::vector<float> z(n);
      for (float& x : z) x = normal(gen) * scale;
      z[n / 2] += 12.0f;  // one peaked token
      ivl::RowStats st;
      st.zmax = *std::max_element(z.begin(), z.end());
      const ivl::SampleRow params[] = {
          {1.0f, 50, 1.0f, 0.0f, 0, 0},       {0.7f, 0, 0.9f, 0.0f, 0, 0},
          {1.3f, 0, 0.5f, 0.0f, 0, 0},        {1.0f, 0, 1.0f, 0.05f, 0, 0},
          {0.8f, 20, 0.8f, 0.02f, 0, 0},      {1.0f, 20000, 0.95f, 0.0f, 0, 0},
          {1.0f, 0, 0.999f, 0.0f, 0, 0},
      };
      for (const ivl::SampleRow& p : params) {
        for (bool avx2 : {false, true}) {
          if (avx2 && !ivl::cpu::cpu_has_avx2()) continue;
          ++cases;
          bad += ivl::cpu::filter_threshold(avx2, z.data(), n, p, st, ws) != brute_threshold(z, p);
        }
      }
    }
  }
  CHECK(cases > 0);
  CHECK(bad == 0);
}

// The race (both builds) against brute force: every kept token's exact key, lowest index on ties.
void test_race_matches_brute_force() {
  std::mt19937 gen(3);
  std::normal_distribution<float> normal;
  int bad = 0;
  for (int64_t n : {int64_t(1), int64_t(63), int64_t(64), int64_t(65), int64_t(1000), int64_t(4099)}) {
    for (int rep = 0; rep < 6; ++rep) {
      std::vector<float> z(n);
      for (float& x : z) x = normal(gen) * (rep % 2 ? 3.0f : 0.3f);
      if (rep == 2) for (int64_t i = 0; i < n; i += 3) z[i] = -INFINITY;
      if (rep == 3) z[n - 1] += 30.0f;
      if (rep == 4) for (float& x : z) x = std::round(x);  // ties in s
      const float temps[] = {1.0f, 0.7f};
      for (float temp : temps) {
        const ivl::SampleRow p{temp, 0, 1.0f, 0.0f, int64_t(rep) * 1000 + n, 5};
        const float taus[] = {-INFINITY, 0.0f};
        for (float tau : taus) {
          ivl::RaceBest want;
          for (int64_t v = 0; v < n; ++v) {
            const float s = z[v] / temp;
            if (s >= tau) want.offer(ivl::gumbel_key(s, p.seed, p.step, v), v, z[v]);
          }
          for (bool avx2 : {false, true}) {
            if (avx2 && !ivl::cpu::cpu_has_avx2()) continue;
            ivl::RaceBest got;
            // Split like the op does (parts), with a bound from a token that takes part.
            const float bound = want.index >= 0 ? want.key : -INFINITY;
            for (int64_t b = 0; b < n; b += 128) {
              ivl::RaceBest part;
              ivl::cpu::race_span(avx2, z.data() + b, b, std::min<int64_t>(128, n - b), p, tau,
                                  b == 0 ? -INFINITY : bound, part);
              got.merge(part);
            }
            bad += got.index != want.index || !same(got.key, want.key);
          }
        }
      }
    }
  }
  CHECK(bad == 0);
}

// The CPU's vectorised mapped merge (both builds) equals merge_one id by id, incl. unmapped ids,
// ids past Vv, zero weights, inf / NaN values, and every span position against vocab_limit.
template <typename TB, typename TV>
int mapped_merge_mismatches(const std::vector<TB>& base, const std::vector<TV>& value,
                            const std::vector<int64_t>& index, const std::vector<float>& weight) {
  const int64_t vb = int64_t(base.size()), vv = int64_t(value.size());
  int bad = 0;
  std::vector<float> out(vb);
  std::vector<int32_t> codes(vb);
  for (float alpha : {0.0f, 0.75f, -2.0f}) {
    for (float fill : {0.0f, -1.5f}) {
      for (int64_t limit : {vb, vb - 13}) {
        const ivl::MergeParams mp{index.data(), weight.data(), fill, limit, vv};
        ivl::cpu::map_codes(mp, 0, vb, codes.data());
        for (int64_t begin : {int64_t(0), int64_t(5)}) {
          for (bool avx2 : {false, true}) {
            if (avx2 && !ivl::cpu::cpu_has_avx2()) continue;
            const int64_t end = vb - begin;
#if IVL_X86_DISPATCH
            if (avx2) {
              ivl::cpu::merge_span_cpu_avx2_for_tests(base.data(), value.data(), alpha, mp,
                                                      codes.data(), begin, end, out.data());
            } else
#endif
            {
              ivl::cpu::merge_span_cpu<false>(base.data(), value.data(), alpha, mp, codes.data(),
                                               begin, end, out.data());
            }
            for (int64_t b = begin; b < end; ++b) {
              bad += !same(out[b - begin], ivl::merge_one(base.data(), value.data(), alpha, b, mp));
            }
          }
        }
      }
    }
  }
  return bad;
}

void test_mapped_merge_matches_merge_one() {
  std::mt19937 gen(13);
  std::normal_distribution<float> normal;
  const int64_t vb = 1000, vv = 700;
  std::vector<float> base(vb), value(vv), weight(vb);
  std::vector<ivl::bf16> value16(vv);
  std::vector<int64_t> index(vb);
  for (float& x : base) x = normal(gen);
  for (int64_t i = 0; i < vv; ++i) {
    value[i] = i % 50 == 0 ? kInf : (i % 77 == 0 ? kNaN : normal(gen));
    uint32_t u;
    std::memcpy(&u, &value[i], 4);
    value16[i].bits = uint16_t(u >> 16);
  }
  for (int64_t b = 0; b < vb; ++b) {
    const uint32_t r = gen() % 20;
    index[b] = r == 0 ? -1 : (r == 1 ? -7 : (r == 2 ? vv + int64_t(gen() % 5) : int64_t(gen() % vv)));
    weight[b] = gen() % 9 == 0 ? 0.0f : 0.5f + float(gen() % 100) / 100.0f;
  }
  CHECK(mapped_merge_mismatches(base, value, index, weight) == 0);
  CHECK(mapped_merge_mismatches(base, value16, index, weight) == 0);
}

// span_pass: generic and AVX2 builds give identical stats; both match brute force.
void test_span_pass_builds_agree() {
  std::mt19937 gen(5);
  std::normal_distribution<float> normal;
  const int64_t V = 20011, Vv = 15000;
  std::vector<ivl::bf16> base(V);
  std::vector<float> value(Vv), weight(V);
  std::vector<int64_t> index(V);
  for (int64_t i = 0; i < V; ++i) {
    const float x = normal(gen) * 3.0f;
    uint32_t u;
    std::memcpy(&u, &x, 4);
    base[i].bits = uint16_t(u >> 16);
    index[i] = (i % 7 == 0) ? -1 : int64_t(gen() % Vv);
    weight[i] = (i % 11 == 0) ? 0.0f : 0.5f;
  }
  for (float& x : value) x = normal(gen);
  const ivl::MergeParams mp{index.data(), weight.data(), -0.5f, V - 5, Vv};
  const ivl::SampleRow p{0.8f, 0, 1.0f, 0.0f, 42, 7};
  std::vector<int32_t> codes(V);
  ivl::cpu::map_codes(mp, 0, V, codes.data());
  ivl::cpu::SpanArgs<ivl::bf16, float> a{base.data(), value.data(), 0.75f, &mp, codes.data(),
                                         &p,          true,         nullptr};
  ivl::RowStats st[2], carried;
  for (int avx2 = 0; avx2 < 2; ++avx2) {
    if (avx2 && !ivl::cpu::cpu_has_avx2()) {
      st[1] = st[0];
      continue;
    }
    for (int64_t b = 0; b < V; b += ivl::cpu::kPart) {
      st[avx2].merge(ivl::cpu::span_pass(avx2 != 0, a, b, std::min(V, b + ivl::cpu::kPart)));
    }
  }
  // Parts started from the leader of the parts before (as one thread runs a row) race the same.
  for (int64_t b = 0; b < V; b += ivl::cpu::kPart) {
    ivl::cpu::SpanArgs<ivl::bf16, float> ab = a;
    ab.race_bound = carried.race.key;
    carried.merge(ivl::cpu::span_pass(ivl::cpu::cpu_has_avx2(), ab, b, std::min(V, b + ivl::cpu::kPart)));
  }
  CHECK(carried.race.index == st[0].race.index && same(carried.race.key, st[0].race.key));
  CHECK(same(st[0].zmax, st[1].zmax) && st[0].argmax == st[1].argmax);
  CHECK(st[0].lse_sum == st[1].lse_sum && same(st[0].lse_ref, st[1].lse_ref));
  CHECK(st[0].race.index == st[1].race.index && same(st[0].race.key, st[1].race.key));
  CHECK(st[0].valid() && !st[0].has_nan && !st[0].has_posinf);
  // Brute force.
  ivl::RaceBest want;
  float zmax = -INFINITY;
  int64_t argmax = -1;
  double sum = 0.0;
  std::vector<float> z(V);
  for (int64_t v = 0; v < V; ++v) {
    z[v] = ivl::merge_one(base.data(), value.data(), 0.75f, v, mp);
    if (z[v] > zmax) zmax = z[v], argmax = v;
    want.offer(ivl::gumbel_key(z[v] / p.temperature, p.seed, p.step, v), v, z[v]);
  }
  for (int64_t v = 0; v < V; ++v) sum += std::exp(double(z[v]) - zmax);
  CHECK(same(st[0].zmax, zmax) && st[0].argmax == argmax);
  CHECK(std::fabs(st[0].lse_sum / sum - 1.0) < 1e-6);
  CHECK(st[0].race.index == want.index && same(st[0].race.z, z[want.index]));
  // A NaN anywhere marks the row invalid.
  base[123].bits = 0x7fc0;
  ivl::RowStats bad;
  for (int64_t b = 0; b < V; b += ivl::cpu::kPart) {
    bad.merge(ivl::cpu::span_pass(false, a, b, std::min(V, b + ivl::cpu::kPart)));
  }
  CHECK(bad.has_nan && !bad.valid());
}
}  // namespace

int main() {
  test_philox_kat();
  test_uniform();
  test_half_widening();
  test_merge_identity();
  test_merge_span_matches_merge_one();
  test_merge_no_fma();
  test_merge_map();
  test_merge_16bit();
  test_fp16_exhaustive();
  test_gumbel_range();
  test_screen_is_conservative();
  test_exp_nonpos();
  test_min_p_threshold();
  test_top_p_walk();
  test_kth_largest();
  test_filter_threshold();
  test_race_matches_brute_force();
  test_mapped_merge_matches_merge_one();
  test_span_pass_builds_agree();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
