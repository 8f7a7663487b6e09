// Run-time choice of the CPU kernels' SIMD builds (host only): x86 with GCC / clang compiles
// AVX2 versions next to the generic ones, and each kernel asks here whether they may run.
#pragma once

#include <cstdlib>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define IVL_X86_DISPATCH 1
#include <immintrin.h>
#else
#define IVL_X86_DISPATCH 0
#endif

namespace ivl {
namespace cpu {

#if IVL_X86_DISPATCH
// Whether SIMD builds may run at all (IVL_CPU_SIMD=0 forces the generic ones); also initialises
// __builtin_cpu_supports, which the callers then query for their features.
inline bool cpu_simd_allowed() {
  static const bool ok = [] {
    const char* env = std::getenv("IVL_CPU_SIMD");
    if (env != nullptr && env[0] == '0') return false;
    __builtin_cpu_init();
    return true;
  }();
  return ok;
}
#endif

}  // namespace cpu
}  // namespace ivl
