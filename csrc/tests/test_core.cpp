// Tests of the framework-free kernel core (no torch): Philox known-answer vectors, the uniform
// mapping, 16-bit widening, and the merge rule on hand-checked cases. Run by `make ctest`.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>

#include "ivl/merge.h"
#include "ivl/philox.h"

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
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
