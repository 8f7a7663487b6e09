// CPU merge_sample and merged_log_softmax: validation, dtype dispatch and the parallel schedule
// around the framework-free building blocks of csrc/include/ivl/sample_cpu.h. Schemas are in
// ops.cpp.
//
// A row is processed in fixed parts of kPart tokens, in three steps:
//   phase 1  per part: merge + stats, and the whole Gumbel race for rows without filters; rows
//            with filters keep their merged logits in a scratch row;
//   phase 2  the parts' stats merged in order: greedy / raced tokens are decided; rows with
//            filters get their threshold;
//   phase 3  per part: the race over the kept tokens of the scratch row.
// Schedule: with enough rows, each thread takes whole rows (one parallel region per call, the
// scratch row stays in its cache); with a few long rows (B=1..3 on 2 cores, say), the tasks are
// (row, part), phase by phase, so every core works on one row. Parts are fixed by V, never by the
// thread count, and merged in index order: tokens and log-probs are the same either way and for
// any number of threads.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "ivl/sample.h"
#include "ivl/sample_cpu.h"
#include "ops.h"

namespace ivl {
namespace {

using cpu::kPart;

// Scratch floats held for the merged rows of one wave of filtered rows in the (row, part)
// schedule (~8 MB: L3-sized).
constexpr int64_t kWaveFloats = int64_t(1) << 21;

// A growable scratch buffer owned by the calling thread, reused across calls (no page faults
// from a fresh multi-MB allocation per decode step).
float* scratch_rows(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(floats);
  return buf.data();
}

cpu::Workspace& thread_workspace() {
  thread_local cpu::Workspace ws;
  return ws;
}

// Rows of a validated [B] parameter tensor (any stride, e.g. an expanded scalar).
template <typename T>
T param_at(const at::Tensor& t, int64_t r) {
  return t.data_ptr<T>()[r * t.stride(0)];
}

// Everything the row loops need, with the storage types erased to raw bytes.
struct Rows {
  const char* base;
  int64_t base_stride;  // in elements
  const char* value;    // nullptr: no value network
  int64_t value_stride;
  const float* alpha;
  int64_t alpha_stride;
  MergeParams merge;
  int64_t rows, cols;
  const int32_t* codes;  // cpu::map_codes of the map ([Vb]), nullptr without one
};

// The calling thread's map-code buffer, reused across calls: a fresh 600 KB vector per decode
// step cost page faults that measured up to 30% of a remapped B=32 step.
int32_t* code_buffer(int64_t n) {
  thread_local std::vector<int32_t> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

Rows rows_of(const MergeInputs& in) {
  const bool has_value = in.value.defined();
  Rows x{static_cast<const char*>(in.base.data_ptr()),
         in.base.stride(0),
         has_value ? static_cast<const char*>(in.value.data_ptr()) : nullptr,
         has_value ? in.value.stride(0) : 0,
         in.alpha.data_ptr<float>(),
         in.alpha.stride(0),
         in.params,
         in.rows,
         in.cols,
         nullptr};
  const MergeParams& p = x.merge;
  if (has_value && p.map_index != nullptr && cpu::codes_fit(p)) {
    const int64_t vb = in.index.numel();
    int32_t* codes = code_buffer(vb);
    at::parallel_for(0, vb, int64_t(1) << 15, [&](int64_t b0, int64_t b1) {
      cpu::map_codes(p, b0, b1, codes);
    });
    x.codes = codes;
  }
  return x;
}

template <typename TB, typename TV>
cpu::SpanArgs<TB, TV> span_args(const Rows& x, int64_t r) {
  const TB* base = reinterpret_cast<const TB*>(x.base) + r * x.base_stride;
  const TV* value =
      x.value != nullptr ? reinterpret_cast<const TV*>(x.value) + r * x.value_stride : nullptr;
  return cpu::SpanArgs<TB, TV>{base,    value, x.alpha[r * x.alpha_stride],
                               &x.merge, x.codes,
                               nullptr, false, nullptr};
}

// Whether every thread can take whole rows: enough rows to share out evenly, or rows too short
// to split. Then one parallel region does everything for a row while it is in cache; otherwise
// (a few long rows) the tasks are (row, part) in three phases.
bool by_rows(int64_t rows, int64_t nparts) {
  const int64_t threads = at::get_num_threads();
  return nparts == 1 || rows >= 2 * threads || rows % threads == 0;
}

// ---------------------------------------------------------------------------------------------
// merge_sample
// ---------------------------------------------------------------------------------------------
template <typename TB, typename TV>
struct Sampler {
  const Rows& x;
  const std::vector<SampleRow>& params;
  bool want_lp;
  int64_t* tokens;
  float* logprobs;
  int64_t V = x.cols;
  int64_t nparts = (x.cols + kPart - 1) / kPart;
  bool avx2 = cpu::cpu_has_avx2();

  bool filtered(int64_t r) const { return !params[r].greedy() && params[r].filtered(V); }

  // Phase 1 of one (row, part): merge + stats, the race too for rows without filters; rows with
  // filters keep their merged logits in `row` ([V], the part at its offset).
  RowStats part_pass(int64_t r, int64_t part, float* row, float race_bound = -INFINITY) const {
    const int64_t begin = part * kPart, end = std::min(V, begin + kPart);
    cpu::SpanArgs<TB, TV> a = span_args<TB, TV>(x, r);
    a.lse = want_lp;
    a.race_bound = race_bound;
    if (filtered(r)) {
      a.store = row + begin;
    } else if (!params[r].greedy()) {
      a.race = &params[r];
    }
    return cpu::span_pass(avx2, a, begin, end);
  }

  void finish(int64_t r, const RowStats& st, int64_t token, float z_token) const {
    tokens[r] = token;
    logprobs[r] = want_lp ? st.logprob(z_token) : NAN;
  }

  // Phase 2: the parts merged in order. Returns true when the row still needs the filtered race.
  bool decide(int64_t r, const RowStats& st) const {
    const SampleRow& p = params[r];
    if (!st.valid()) {
      tokens[r] = kInvalidToken;
      logprobs[r] = NAN;
    } else if (p.greedy()) {
      finish(r, st, st.argmax, st.zmax);
    } else if (!filtered(r)) {
      finish(r, st, st.race.index, st.race.z);
    } else {
      return true;
    }
    return false;
  }

  // The filter threshold of a stored row, and the key of its argmax (always kept): a bound that
  // lets the race skip most blocks from the start.
  std::pair<float, float> threshold(int64_t r, const float* row, const RowStats& st) const {
    const SampleRow& p = params[r];
    const float tau = cpu::filter_threshold(avx2, row, V, p, st, thread_workspace());
    return {tau, gumbel_key(p.scale(st.zmax), p.seed, p.step, st.argmax)};
  }

  // Phase 3 of one (row, part): the race over its kept tokens.
  RaceBest race_part(int64_t r, int64_t part, const float* row, float tau, float bound) const {
    const int64_t begin = part * kPart, end = std::min(V, begin + kPart);
    RaceBest best;
    cpu::race_span(avx2, row + begin, begin, end - begin, params[r], tau, bound, best);
    return best;
  }

  // Everything for one row on the calling thread, parts in index order.
  void whole_row(int64_t r, float* row) const {
    RowStats st = part_pass(r, 0, row);
    // Each part's race starts from the leader of the parts before it: on real LM rows a fresh
    // leader lets almost every block of a part through the screen.
    for (int64_t k = 1; k < nparts; ++k) st.merge(part_pass(r, k, row, st.race.key));
    if (!decide(r, st)) return;
    const auto [tau, bound] = threshold(r, row, st);
    RaceBest best = race_part(r, 0, row, tau, bound);
    for (int64_t k = 1; k < nparts; ++k) best.merge(race_part(r, k, row, tau, bound));
    finish(r, st, best.index, best.z);
  }

  void run() const {
    const int64_t B = x.rows;
    if (by_rows(B, nparts)) {
      at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
        thread_local std::vector<float> row;  // this thread's scratch row, reused across calls
        if (static_cast<int64_t>(row.size()) < V) row.resize(V);
        for (int64_t r = r0; r < r1; ++r) whole_row(r, row.data());
      });
      return;
    }
    // A few long rows: (row, part) tasks, phase by phase, in waves that bound the scratch.
    bool any_filtered = false;
    for (int64_t r = 0; r < B; ++r) any_filtered |= filtered(r);
    const int64_t wave = std::clamp<int64_t>(kWaveFloats / std::max<int64_t>(V, 1), 1, B);
    float* scratch = any_filtered ? scratch_rows(wave * V) : nullptr;
    std::vector<RowStats> parts(wave * nparts), stats(wave);
    std::vector<float> tau(wave), bound(wave);
    std::vector<int64_t> raced;
    std::vector<RaceBest> bests;
    for (int64_t w0 = 0; w0 < B; w0 += wave) {
      const int64_t nr = std::min(wave, B - w0);
      at::parallel_for(0, nr * nparts, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t / nparts;
          parts[t] = part_pass(w0 + i, t % nparts, scratch + i * V);
        }
      });
      raced.clear();
      for (int64_t i = 0; i < nr; ++i) {
        stats[i] = parts[i * nparts];
        for (int64_t k = 1; k < nparts; ++k) stats[i].merge(parts[i * nparts + k]);
        if (decide(w0 + i, stats[i])) raced.push_back(i);
      }
      const int64_t nf = static_cast<int64_t>(raced.size());
      if (nf == 0) continue;
      at::parallel_for(0, nf, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t i = raced[j];
          std::tie(tau[i], bound[i]) = threshold(w0 + i, scratch + i * V, stats[i]);
        }
      });
      bests.assign(nf * nparts, RaceBest{});
      at::parallel_for(0, nf * nparts, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = raced[t / nparts];
          bests[t] = race_part(w0 + i, t % nparts, scratch + i * V, tau[i], bound[i]);
        }
      });
      for (int64_t j = 0; j < nf; ++j) {
        RaceBest best = bests[j * nparts];
        for (int64_t k = 1; k < nparts; ++k) best.merge(bests[j * nparts + k]);
        finish(w0 + raced[j], stats[raced[j]], best.index, best.z);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> merge_sample_cpu(
    const at::Tensor& base, const std::optional<at::Tensor>& value, const at::Tensor& alpha,
    const std::optional<at::Tensor>& map_index, const std::optional<at::Tensor>& map_weight,
    double fill, int64_t vocab_limit, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
    const at::Tensor& step, bool want_logprobs) {
  constexpr const char* op = "ivl::merge_sample";
  MergeInputs in =
      check_merge_inputs(base, value, alpha, map_index, map_weight, fill, vocab_limit, op);
  if (in.value.defined() && in.index.defined()) check_map_range(in.index, in.params.value_cols, op);
  const int64_t B = in.rows;
  const auto dev = base.device();
  check_sample_params(temperature, top_k, top_p, min_p, seed, step, B, dev);

  at::Tensor tokens = at::empty({B}, base.options().dtype(at::kLong));     // [B]
  at::Tensor logprobs = at::empty({B}, base.options().dtype(at::kFloat));  // [B]
  if (B == 0) return {tokens, logprobs};
  std::vector<SampleRow> params(B);
  for (int64_t r = 0; r < B; ++r) {
    params[r] = SampleRow{param_at<float>(temperature, r), param_at<int64_t>(top_k, r),
                          param_at<float>(top_p, r),       param_at<float>(min_p, r),
                          param_at<int64_t>(seed, r),      param_at<int64_t>(step, r)};
  }
  const Rows x = rows_of(in);
  dispatch_pair(in, op, [&](auto tb, auto tv) {
    Sampler<decltype(tb), decltype(tv)>{x, params, want_logprobs, tokens.data_ptr<int64_t>(),
                                        logprobs.data_ptr<float>()}
        .run();
  });
  return {tokens, logprobs};
}

// ---------------------------------------------------------------------------------------------
// merged_log_softmax
// ---------------------------------------------------------------------------------------------
template <typename TB, typename TV>
void log_softmax_rows(const Rows& x, float* out) {  // out: [B, V] contiguous
  const int64_t B = x.rows, V = x.cols;
  const int64_t nparts = (V + kPart - 1) / kPart;
  const bool avx2 = cpu::cpu_has_avx2();
  auto pass = [&](int64_t r, int64_t part) {
    const int64_t begin = part * kPart, end = std::min(V, begin + kPart);
    cpu::SpanArgs<TB, TV> a = span_args<TB, TV>(x, r);
    a.lse = true;
    a.store = out + r * V + begin;
    return cpu::span_pass(avx2, a, begin, end);
  };
  // torch.log_softmax: (x - max) - log(sum exp(x - max)), in fp32. An invalid row (NaN, +inf,
  // or nothing finite) has no distribution: all NaN, as torch gives for it.
  auto normalise = [&](int64_t r, const RowStats& st, int64_t begin, int64_t end) {
    float* row = out + r * V;
    if (!st.valid()) {
      std::fill(row + begin, row + end, NAN);
      return;
    }
    const float m = st.zmax, l = static_cast<float>(std::log(st.lse_sum));
    for (int64_t v = begin; v < end; ++v) row[v] = (row[v] - m) - l;
  };
  if (by_rows(B, nparts)) {  // one region; each row normalised while it is still in cache
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        RowStats st = pass(r, 0);
        for (int64_t k = 1; k < nparts; ++k) st.merge(pass(r, k));
        normalise(r, st, 0, V);
      }
    });
    return;
  }
  std::vector<RowStats> parts(B * nparts), stats(B);
  at::parallel_for(0, B * nparts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) parts[t] = pass(t / nparts, t % nparts);
  });
  for (int64_t r = 0; r < B; ++r) {
    stats[r] = parts[r * nparts];
    for (int64_t k = 1; k < nparts; ++k) stats[r].merge(parts[r * nparts + k]);
  }
  at::parallel_for(0, B * nparts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t begin = (t % nparts) * kPart;
      normalise(t / nparts, stats[t / nparts], begin, std::min(V, begin + kPart));
    }
  });
}

at::Tensor merged_log_softmax_cpu(const at::Tensor& base, const std::optional<at::Tensor>& value,
                                  const at::Tensor& alpha,
                                  const std::optional<at::Tensor>& map_index,
                                  const std::optional<at::Tensor>& map_weight, double fill,
                                  int64_t vocab_limit) {
  constexpr const char* op = "ivl::merged_log_softmax";
  MergeInputs in =
      check_merge_inputs(base, value, alpha, map_index, map_weight, fill, vocab_limit, op);
  if (in.value.defined() && in.index.defined()) check_map_range(in.index, in.params.value_cols, op);
  at::Tensor out = at::empty({in.rows, in.cols}, base.options().dtype(at::kFloat));  // [B, Vb]
  if (out.numel() == 0) return out;
  const Rows x = rows_of(in);
  dispatch_pair(in, op, [&](auto tb, auto tv) {
    log_softmax_rows<decltype(tb), decltype(tv)>(x, out.data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace ivl

TORCH_LIBRARY_IMPL(ivl, CPU, m) {
  m.impl("merge_sample", &ivl::merge_sample_cpu);
  m.impl("merged_log_softmax", &ivl::merged_log_softmax_cpu);
}
