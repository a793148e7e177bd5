// See loops.h.
#include "loops.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "avx512.h"

namespace rpe_ops {
namespace {

enum Setting : int { kAuto = -1, kPortable = 0, kAvx512 = 1 };

// Whether the AVX-512 loops run on this host, and why or why not.
struct Feature {
  bool avx512;
  std::string reason;
};

const Feature& feature() {
  static const Feature f = [] {
    if (!avx512::available()) return Feature{false, "no AVX-512 (F, BW and VL) on this CPU"};
    const std::string torch = at::get_cpu_capability();
    if (torch != "AVX512")
      return Feature{false, "torch's CPU capability is " + torch + ", not AVX512 (see ATEN_CPU_CAPABILITY)"};
    return Feature{true, "AVX-512 (F, BW and VL) on this CPU and torch's CPU capability AVX512"};
  }();
  return f;
}

// The setting `name` stands for; throws with what to do on a bad one.
Setting parse(const std::string& name, const char* source) {
  if (name == "auto") return kAuto;
  if (name == "portable") return kPortable;
  TORCH_CHECK_VALUE(name == "avx512", source, " must be one of auto, portable, avx512, got '", name,
                    "'; 'auto' (the default) picks by CPU feature");
  TORCH_CHECK_VALUE(feature().avx512, source, " asks for the 'avx512' loops, but ", feature().reason,
                    "; use 'portable' or 'auto'");
  return kAvx512;
}

struct State {
  std::atomic<int> setting{kAuto};
  std::mutex mutex;  // guards name and forced_by
  std::string name = "auto", forced_by;

  State() {
    const char* env = std::getenv("RPE_OPS_CPU_LOOPS");
    if (env != nullptr && *env != '\0') {
      setting.store(parse(env, "RPE_OPS_CPU_LOOPS"));
      name = env;
      forced_by = std::string("RPE_OPS_CPU_LOOPS=") + env;
    }
  }
};

// Made at the first use, reading RPE_OPS_CPU_LOOPS then (a bad value throws, and the next use tries again).
State& state() {
  static State* s = new State();  // never destroyed: ops may run during interpreter shutdown
  return *s;
}

}  // namespace

bool use_avx512() {
  const int setting = state().setting.load(std::memory_order_relaxed);
  return setting == kAuto ? feature().avx512 : setting == kAvx512;
}

std::string set_loops(const std::string& name) {
  State& s = state();
  const Setting setting = parse(name, "rpe_ops.set_cpu_loops");
  std::lock_guard<std::mutex> lock(s.mutex);
  std::string previous = s.name;
  s.setting.store(setting, std::memory_order_relaxed);
  s.name = name;
  s.forced_by = "rpe_ops.set_cpu_loops('" + name + "')";
  return previous;
}

LoopsReport loops_report() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  LoopsReport report{use_avx512() ? "avx512" : "portable", "", {"portable"}};
  if (feature().avx512) report.available.push_back("avx512");
  report.reason = s.setting.load() == kAuto ? "by CPU feature: " + feature().reason : "forced by " + s.forced_by;
  return report;
}

}  // namespace rpe_ops
