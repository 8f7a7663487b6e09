// y = x W^T (+ b) for few rows of x: the decode-step linear of a CPU forward (host only,
// framework-free; csrc/cpu/linear.cpp binds it as torch.ops.ivl.narrow_linear). Weights are
// fp32, bf16 or fp16, read where they lie and widened to fp32 in registers; x, bias and the
// products are fp32 (a 16-bit model's activations are widened once per call by the binding,
// and its outputs rounded once at the end).
//
// Why not BLAS: at decode sizes (M = 1..64 rows against a weight of N x K) the product streams
// the weight once and does only 2M flops per weight element; torch's BLAS sgemm (MKL here) is
// built for large M and runs 1.6-2.9x slower than this kernel at M = 16 (docs/engine.md).
// Here the weight is used where it lies: each output element is a dot product of one x row and
// one weight row over K, computed for a 4 x 3 tile of (rows, outputs) at once: 12 AVX2
// accumulators, 7 loads per 12 FMAs, and the 3 weight rows of a tile (K floats each) stay in L1
// while every group of 4 x rows passes over them. Callers split the outputs [n0, n1) between
// threads; each thread streams its own slab of the weight.
//
// Every output element is computed by the same sequence of operations whatever M, the tile it
// falls in or the split between threads: 8 lane sums over k = 8j + lane (FMA), a fixed pairwise
// horizontal sum, then the k tail in order. So a row's result does not depend on the other rows
// in the batch (batch invariance) nor on the thread count.
#pragma once

#include <cstdint>

#include "ivl/common.h"
#include "ivl/cpu_dispatch.h"

namespace ivl {
namespace cpu {

// Whether narrow_linear_avx2 may run: the CPU has AVX2, FMA and F16C, and IVL_CPU_SIMD is not
// "0".
inline bool cpu_has_avx2_fma() {
#if IVL_X86_DISPATCH
  static const bool ok = cpu_simd_allowed() && __builtin_cpu_supports("avx2") != 0 &&
                         __builtin_cpu_supports("fma") != 0 && __builtin_cpu_supports("f16c") != 0;
  return ok;
#else
  return false;
#endif
}

#if IVL_X86_DISPATCH

#define IVL_LINEAR_TARGET __attribute__((target("avx2,fma,f16c"), always_inline))

IVL_LINEAR_TARGET inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 weights as fp32 (exact for every storage type; the K tail widens one at a time with the
// storage types' own conversions, common.h).
IVL_LINEAR_TARGET inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
IVL_LINEAR_TARGET inline __m256 load8(const bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
IVL_LINEAR_TARGET inline __m256 load8(const fp16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// y[i * ldy + j] = bias[j] + sum_k x[i * ldx + k] * w[j * ldw + k] for i < MR, j < NR.
template <int MR, int NR, typename W>
IVL_LINEAR_TARGET inline void linear_tile(const float* x, int64_t ldx, const W* w, int64_t ldw,
                                          const float* bias, int64_t K, float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load8(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = hsum8(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[i * ldx + t] * static_cast<float>(w[j * ldw + t]);
      y[i * ldy + j] = bias != nullptr ? s + bias[j] : s;
    }
  }
}

constexpr int kTileRows = 4;  // x rows per tile
constexpr int kTileCols = 3;  // weight rows (outputs) per tile

// Outputs [n0, n1) of y = x W^T (+ bias) for all M rows, in fp32: x [M, K] fp32 (row stride
// ldx), w [N, K] fp32 / bf16 / fp16 (row stride ldw), bias [N] fp32 or null, y [M, N] fp32 (row
// stride ldy). Unit stride along K. Blocks of 6 outputs: groups of 4 rows take them as two
// 4 x 3 tiles, the 1-3 rows left over as 1 x 6 tiles (6 independent FMA chains: at 1 row a
// 1 x 3 tile waits on FMA latency), all while the block's weight rows are in L1.
template <typename W>
__attribute__((target("avx2,fma,f16c"), flatten)) inline void narrow_linear_avx2(
    const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* y, int64_t ldy,
    int64_t M, int64_t K, int64_t n0, int64_t n1) {
  const int64_t m4 = M - M % kTileRows;
  int64_t n = n0;
  for (; n + 2 * kTileCols <= n1; n += 2 * kTileCols) {
    const W* wn = w + n * ldw;
    const float* bn = bias != nullptr ? bias + n : nullptr;
    const float* bn3 = bias != nullptr ? bias + n + kTileCols : nullptr;
    for (int64_t m = 0; m < m4; m += kTileRows) {
      linear_tile<kTileRows, kTileCols>(x + m * ldx, ldx, wn, ldw, bn, K, y + m * ldy + n, ldy);
      linear_tile<kTileRows, kTileCols>(x + m * ldx, ldx, wn + kTileCols * ldw, ldw, bn3, K,
                                        y + m * ldy + n + kTileCols, ldy);
    }
    for (int64_t m = m4; m < M; ++m)
      linear_tile<1, 2 * kTileCols>(x + m * ldx, ldx, wn, ldw, bn, K, y + m * ldy + n, ldy);
  }
  for (; n + kTileCols <= n1; n += kTileCols) {
    const W* wn = w + n * ldw;
    const float* bn = bias != nullptr ? bias + n : nullptr;
    for (int64_t m = 0; m < m4; m += kTileRows)
      linear_tile<kTileRows, kTileCols>(x + m * ldx, ldx, wn, ldw, bn, K, y + m * ldy + n, ldy);
    for (int64_t m = m4; m < M; ++m)
      linear_tile<1, kTileCols>(x + m * ldx, ldx, wn, ldw, bn, K, y + m * ldy + n, ldy);
  }
  for (; n < n1; ++n) {
    const float* bn = bias != nullptr ? bias + n : nullptr;
    for (int64_t m = 0; m < M; ++m)
      linear_tile<1, 1>(x + m * ldx, ldx, w + n * ldw, ldw, bn, K, y + m * ldy + n, ldy);
  }
}

#undef IVL_LINEAR_TARGET

#endif  // IVL_X86_DISPATCH

}  // namespace cpu
}  // namespace ivl
