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

// IEEE binary16 storage (1 sign, 5 exponent, 10 mantissa bits), widened exactly to fp32.
struct fp16 {
  uint16_t bits;
  IVL_HOST_DEVICE operator float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
    const uint32_t exp = (bits >> 10) & 0x1fu;
    uint32_t man = bits & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
    if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
    if (man == 0) return bits_to_float(sign);  // +-0
    // Subnormal: value = man * 2^-24; normalise the mantissa into fp32's implicit-1 form.
    int e = 113;  // fp32 biased exponent of 2^-14, decremented per shift
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --e;
    }
    return bits_to_float(sign | (uint32_t(e) << 23) | ((man & 0x3ffu) << 13));
  }
};

}  // namespace ivl
