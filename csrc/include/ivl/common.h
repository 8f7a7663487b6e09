// Shared by every kernel: the host/device qualifier, correctly rounded fp32 arithmetic, and
// 16-bit float storage types for code (the C++ tests) that cannot use torch's.
//
// Framework-free on purpose: no torch headers, raw pointers only, so the same math compiles into
// the CPU extension, the CUDA kernels and the standalone C++ tests.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define IVL_HOST_DEVICE __host__ __device__
#else
#define IVL_HOST_DEVICE
#endif

// Every backend must produce bit-identical merged logits, so a*b + c must round twice. GCC and
// MSVC honour -ffp-contract=off / /fp:precise (set by setup.py and CMakeLists.txt); clang also
// takes the standard pragma, which makes the headers safe even if a build forgets the flag.
#if defined(__clang__) && !defined(__CUDA_ARCH__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace ivl {

// fp32 multiply / add rounded to nearest, never fused into an FMA.
IVL_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

IVL_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

IVL_HOST_DEVICE inline float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// bfloat16 storage: the top 16 bits of an fp32, so widening is a shift.
struct bf16 {
  uint16_t bits;
  IVL_HOST_DEVICE operator float() const { return bits_to_float(uint32_t(bits) << 16); }
};

IVL_HOST_DEVICE inline uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// IEEE binary16 storage (1 sign, 5 exponent, 10 mantissa bits), widened exactly to fp32.
// Branch-free (selects, no loop) so loops over fp16 rows vectorise; subnormals go through an
// exact integer -> float conversion rather than denormal arithmetic (safe under flush-to-zero).
struct fp16 {
  uint16_t bits;
  IVL_HOST_DEVICE operator float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
    const uint32_t em = bits & 0x7fffu;  // exponent and mantissa
    const uint32_t exp = em >> 10;
    const uint32_t normal = (em << 13) + (112u << 23);  // rebias the exponent: 15 -> 127
    const uint32_t inf_nan = (em << 13) | 0x7f800000u;
    const float subnormal = static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f;  // exact
    const float mag = exp == 0 ? subnormal : bits_to_float(exp == 0x1fu ? inf_nan : normal);
    return bits_to_float(float_to_bits(mag) | sign);
  }
};

}  // namespace ivl
