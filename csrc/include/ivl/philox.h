// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// project's RNG contract: one uniform in (0, 1] per (seed, step, vocab index).
//
// Counter-based, so any backend can draw the number for any (row, step, index) directly: the
// same inputs give the same tokens on CPU, CUDA and Triton, whatever else shares the batch.
#pragma once

#include <cstdint>

#include "ivl/common.h"

namespace ivl {

struct Philox4x32 {
  uint32_t v[4];
};

namespace philox_detail {

constexpr uint32_t kM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // key schedule increments (Weyl sequence)
constexpr uint32_t kW1 = 0xBB67AE85u;

IVL_HOST_DEVICE inline void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = uint64_t(a) * uint64_t(b);
  lo = uint32_t(p);
  hi = uint32_t(p >> 32);
#endif
}

IVL_HOST_DEVICE inline Philox4x32 one_round(const Philox4x32& c, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(kM0, c.v[0], hi0, lo0);
  mulhilo(kM1, c.v[2], hi1, lo1);
  return Philox4x32{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
}

}  // namespace philox_detail

// Philox-4x32 with 10 rounds: counter (4 words) and key (2 words) -> 4 random words.
IVL_HOST_DEVICE inline Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {  // the key is bumped between rounds, not before the first
      k0 += kW0;
      k1 += kW1;
    }
    ctr = one_round(ctr, k0, k1);
  }
  return ctr;
}

// 32 random bits -> fp32 in (0, 1]: x * 2^-32 is exact (a power-of-two scale of an fp32), so only
// the uint->float conversion and the final add round (to nearest); FMA contraction cannot change
// the result. x = 0 maps to 2^-33 and x = 2^32 - 1 to 1.0f, so log(w) is always finite.
IVL_HOST_DEVICE inline float bits_to_uniform(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(__uint2float_rn(x), 0x1p-32f), 0x1p-33f);
#else
  return add_rn(mul_rn(float(x), 0x1p-32f), 0x1p-33f);
#endif
}

// The four words drawn for vocab indices 4*group .. 4*group + 3 of one row.
// seed and step are int64 reinterpreted as uint64 bit patterns (negative seeds are valid).
IVL_HOST_DEVICE inline Philox4x32 philox_group(int64_t seed, int64_t step, int64_t group) {
  const uint64_t s = uint64_t(seed);
  const uint64_t t = uint64_t(step);
  const Philox4x32 ctr{{uint32_t(uint64_t(group)), 0u, uint32_t(t), uint32_t(t >> 32)}};
  return philox4x32_10(ctr, uint32_t(s), uint32_t(s >> 32));
}

// The contract: the uniform for vocab index v of a row with this seed at this step.
IVL_HOST_DEVICE inline float uniform(int64_t seed, int64_t step, int64_t v) {
  return bits_to_uniform(philox_group(seed, step, v >> 2).v[v & 3]);
}

}  // namespace ivl
