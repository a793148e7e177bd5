// See loops.h.
#include "loops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <limits>
#include <mutex>

#include "avx512.h"

namespace rpe_ops {
namespace {

// A more complex candidate must be this much faster than the best simpler one.
constexpr double kMargin = 0.05;
// Outputs smaller than this run the portable loops in auto mode (see loops.h).
constexpr int64_t kSmallOutputBytes = int64_t(8) << 20;
constexpr int kRounds = 3;  // timed calls per candidate, interleaved; the fastest counts

// The measured problem: B=2, H=8 on a kHeight x kWidth map (L = 768; a DETR-R50 encoder map is
// 25x38 = 950), K = 81 buckets of clipped (dr, dc) as rpe-2.0-product makes them, so keys come in
// runs of one bucket. Its (B, H, L, L) float32 output is 38 MB: larger than the last-level caches of
// most hosts, as the encoder's 58 MB output is, so streaming vs plain stores is timed as it runs.
constexpr int64_t kB = 2, kH = 8, kHeight = 24, kWidth = 32, kClip = 4;

const char* const kNames[] = {"portable", "avx512", "avx512_stream"};
const char* const kOpNames[] = {"rpe_index", "rpe_reduce", "rpe_index_qk", "rpe_reduce_qk"};

bool writes_large_output(Op op) { return op == Op::kIndex || op == Op::kIndexQk; }

// What `forced` means for `op`: the reductions have no streaming variant.
Loops for_op(Op op, Loops forced) {
  return forced == Loops::kAvx512Stream && !writes_large_output(op) ? Loops::kAvx512 : forced;
}

std::vector<Loops> candidates(Op op) {
  if (!avx512::available()) return {Loops::kPortable};
  if (writes_large_output(op)) return {Loops::kPortable, Loops::kAvx512, Loops::kAvx512Stream};
  return {Loops::kPortable, Loops::kAvx512};
}

// -1 for "auto", else a Loops; throws with what to do on a bad name.
int parse(const std::string& setting, const char* source) {
  if (setting == "auto") return -1;
  for (int l = 0; l < 3; ++l)
    if (setting == kNames[l]) {
      TORCH_CHECK_VALUE(l == 0 || avx512::available(), source, " asks for the '", setting,
                        "' loops, but this CPU has no AVX-512 (F, BW and VL); use 'portable' or 'auto'");
      return l;
    }
  TORCH_CHECK_VALUE(false, source, " must be one of auto, portable, avx512, avx512_stream, got '", setting,
                    "'; 'auto' (the default) times them on first use and keeps the fastest");
  return -1;
}

struct State {
  std::mutex mutex;  // held while an op is measured, and for set_loops / the report
  std::atomic<int> forced{-1};
  std::string setting = "auto", set_by = "default";
  std::array<std::atomic<int>, kNumOps> measured;
  std::array<std::vector<double>, kNumOps> milliseconds;  // per candidate
  int threads[kNumOps] = {};

  State() {
    for (auto& m : measured) m.store(-1);
    const char* env = std::getenv("RPE_OPS_CPU_LOOPS");
    if (env != nullptr && *env != '\0') {
      forced.store(parse(env, "RPE_OPS_CPU_LOOPS"));
      setting = env;
      set_by = "RPE_OPS_CPU_LOOPS";
    }
  }
};

// Made at the first use, reading RPE_OPS_CPU_LOOPS then (a bad value throws, and the next use tries again).
State& state() {
  static State* s = new State();  // never destroyed: ops may run during interpreter shutdown
  return *s;
}

// Bucket ids of the measured problem, (L, L) int32: (clip(dr) + kClip) * (2 kClip + 1) + clip(dc) + kClip.
at::Tensor probe_ids() {
  const int64_t L = kHeight * kWidth;
  at::Tensor ids = at::empty({L, L}, at::kInt);
  int32_t* id = ids.mutable_data_ptr<int32_t>();
  auto clip = [](int64_t d) { return std::min<int64_t>(std::max<int64_t>(d, -kClip), kClip) + kClip; };
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < L; ++j)
      id[i * L + j] = static_cast<int32_t>(clip(i / kWidth - j / kWidth) * (2 * kClip + 1) + clip(i % kWidth - j % kWidth));
  return ids;
}

// Deterministic values (the default random generator is the user's: it is not touched).
at::Tensor probe_values(at::IntArrayRef sizes) {
  at::Tensor values = at::empty(sizes, at::kFloat);
  float* v = values.mutable_data_ptr<float>();
  for (int64_t e = 0; e < values.numel(); ++e) v[e] = 0.01f * static_cast<float>(e % 97);
  return values;
}

// CPU time of the process (all its threads), not wall time: on a machine other jobs share, a call
// that was descheduled half-way would otherwise look slow (seen: 26 vs 14 ms for two sets that take
// the same CPU time).
double milliseconds_of(const std::function<void()>& run) {
  const std::clock_t start = std::clock();
  run();
  return 1000.0 * static_cast<double>(std::clock() - start) / CLOCKS_PER_SEC;
}

// Times every candidate of `op` (rpe_index or rpe_index_qk) on the measured problem; returns the chosen
// one and fills ms.
Loops measure(Op op, std::vector<double>& ms) {
  const std::vector<Loops> cands = candidates(op);
  ms.assign(cands.size(), std::numeric_limits<double>::infinity());
  if (cands.size() == 1) return cands[0];
  const int64_t L = kHeight * kWidth, K = (2 * kClip + 1) * (2 * kClip + 1);
  const at::Tensor index = probe_ids(), index_t = index.t().contiguous();
  const at::Tensor table = probe_values({kB, kH, L, K}), table_t = probe_values({kB, kH, L, K});
  auto run = [&](Loops loops) {
    if (op == Op::kIndexQk) rpe_index_qk_cpu(loops, table, index, table_t, index_t);
    else rpe_index_cpu(loops, table, index);
  };
  run(cands[0]);  // warm-up: the output block mapped (the cache of output_cache.h hands it to every later call)
  for (int round = 0; round < kRounds; ++round)
    for (size_t c = 0; c < cands.size(); ++c) ms[c] = std::min(ms[c], milliseconds_of([&] { run(cands[c]); }));
  size_t best = 0;
  for (size_t c = 1; c < cands.size(); ++c)
    if (ms[c] < ms[best] * (1.0 - kMargin)) best = c;
  return cands[best];
}

}  // namespace

const char* loops_name(Loops loops) { return kNames[static_cast<int>(loops)]; }
const char* op_name(Op op) { return kOpNames[static_cast<int>(op)]; }

Loops loops_for(Op op, int64_t output_bytes) {
  State& s = state();
  const int forced = s.forced.load(std::memory_order_relaxed);
  if (forced >= 0) return for_op(op, static_cast<Loops>(forced));
  if (!writes_large_output(op)) return candidates(op).back();  // by CPU features: see loops.h
  if (output_bytes < kSmallOutputBytes) return Loops::kPortable;
  const int o = static_cast<int>(op);
  const int known = s.measured[o].load(std::memory_order_acquire);
  if (known >= 0) return static_cast<Loops>(known);
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.measured[o].load(std::memory_order_relaxed) < 0) {
    const Loops chosen = measure(op, s.milliseconds[o]);
    s.threads[o] = at::get_num_threads();
    s.measured[o].store(static_cast<int>(chosen), std::memory_order_release);
  }
  return static_cast<Loops>(s.measured[o].load(std::memory_order_relaxed));
}

std::string set_loops(const std::string& setting) {
  State& s = state();
  const int forced = parse(setting, "rpe_ops.set_cpu_loops");
  std::lock_guard<std::mutex> lock(s.mutex);
  std::string previous = s.setting;
  s.forced.store(forced, std::memory_order_relaxed);
  s.setting = setting;
  s.set_by = "set_cpu_loops";
  return previous;
}

LoopsReport loops_report() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  LoopsReport report{s.setting, s.set_by, {}, {}};
  for (Loops loops : candidates(Op::kIndex)) report.candidates.push_back(loops_name(loops));
  const int forced = s.forced.load();
  for (int o = 0; o < kNumOps; ++o) {
    const Op op = static_cast<Op>(o);
    LoopsReport::Choice choice{op_name(op), "", "", {}};
    const std::vector<Loops> cands = candidates(op);
    const int known = s.measured[o].load();
    if (known >= 0)
      for (size_t c = 0; c < cands.size() && c < s.milliseconds[o].size(); ++c)
        if (s.milliseconds[o][c] < std::numeric_limits<double>::infinity())
          choice.milliseconds.emplace_back(loops_name(cands[c]), s.milliseconds[o][c]);
    if (forced >= 0) {
      choice.loops = loops_name(for_op(op, static_cast<Loops>(forced)));
      choice.reason = "forced by " + std::string(s.set_by == "RPE_OPS_CPU_LOOPS" ? "RPE_OPS_CPU_LOOPS=" : "rpe_ops.set_cpu_loops: ") +
                      s.setting + (choice.loops != s.setting ? " (the reductions have no streaming variant)" : "");
    } else if (!writes_large_output(op)) {
      choice.loops = loops_name(cands.back());
      choice.reason = cands.size() == 1 ? "by CPU features: no AVX-512 (F, BW and VL)"
                                        : "by CPU features: AVX-512 (F, BW and VL); not timed, so that runs "
                                          "with one seed sum in one order (see loops.h)";
    } else if (known < 0) {
      choice.loops = loops_name(Loops::kPortable);
      choice.reason = "outputs under 8 MiB (every call so far) run the portable loops; the sets are timed at "
                      "the first call with a larger output";
    } else {
      choice.loops = loops_name(static_cast<Loops>(known));
      choice.reason = cands.size() == 1
                          ? "the only candidate: this CPU has no AVX-512 (F, BW and VL)"
                          : "fastest when timed at the first call with an output of 8 MiB or more (B=2, H=8, "
                            "L=24x32, K=81, float32, " + std::to_string(s.threads[o]) +
                                " threads; a more complex set must win by 5%); outputs under 8 MiB run the "
                                "portable loops";
    }
    report.ops.push_back(std::move(choice));
  }
  return report;
}

}  // namespace rpe_ops
