// Microbenchmark of the framework-free core, single thread, no torch: ns per element of
// merge_span (no map / identity map / permuted map) and of the uniform stream. Medians of
// repeated runs; compare ratios, not absolute times (machines here are noisy).
//   cmake --build build/core && ./build/core/bench_core [vocab]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "ivl/merge.h"
#include "ivl/philox.h"

namespace {

template <typename F>
double median_ns_per_elem(F&& f, int64_t n) {
  std::vector<double> t(51);
  for (double& x : t) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    x = std::chrono::duration<double, std::nano>(t1 - t0).count() / double(n);
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t V = argc > 1 ? std::atoll(argv[1]) : 151936;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<float> base(V), value(V), weight(V, 0.5f), out(V);
  std::vector<int64_t> ident(V), perm(V);
  for (int64_t i = 0; i < V; ++i) base[i] = normal(gen), value[i] = normal(gen);
  std::iota(ident.begin(), ident.end(), 0);
  perm = ident;
  std::shuffle(perm.begin(), perm.end(), gen);

  const ivl::MergeParams none{nullptr, nullptr, 0.0f, V, V};
  const ivl::MergeParams id{ident.data(), weight.data(), 0.0f, V, V};
  const ivl::MergeParams pm{perm.data(), weight.data(), 0.0f, V, V};
  auto merge = [&](const ivl::MergeParams& p) {
    return [&, p] { ivl::merge_span(base.data(), value.data(), 0.5f, p, 0, V, out.data()); };
  };
  auto uniform = [&] {
    for (int64_t g = 0; g < V / 4; ++g) {
      const ivl::Philox4x32 x = ivl::philox_group(42, 7, g);
      for (int j = 0; j < 4; ++j) out[4 * g + j] = ivl::bits_to_uniform(x.v[j]);
    }
  };
  std::printf("V = %lld, single thread, median ns/element\n", static_cast<long long>(V));
  std::printf("  merge, no map       %6.3f\n", median_ns_per_elem(merge(none), V));
  std::printf("  merge, identity map %6.3f\n", median_ns_per_elem(merge(id), V));
  std::printf("  merge, permuted map %6.3f\n", median_ns_per_elem(merge(pm), V));
  std::printf("  philox uniform      %6.3f\n", median_ns_per_elem(uniform, V));
  return out[V / 2] == 12345.0f;  // keep the results observable
}
