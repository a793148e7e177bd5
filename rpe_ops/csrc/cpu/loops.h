// Which loops the CPU kernels run: the AVX-512 loops of avx512.h where the CPU has AVX-512 (F, BW and
// VL) and torch runs its own AVX-512 kernels (at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=avx2
// turns them off as it does torch's), the portable loops of rpe_index_kernel.cpp elsewhere.
// RPE_OPS_CPU_LOOPS=auto|portable|avx512 (read at the first use; default auto) or
// rpe_ops.set_cpu_loops(...) forces one set for every op, e.g. to test the portable loops on an
// AVX-512 host.
#pragma once

#include <string>
#include <vector>

namespace rpe_ops {

// True when the kernels run the AVX-512 loops.
bool use_avx512();

// Force "portable" or "avx512", or go back to "auto" (by CPU feature). Throws c10::ValueError on an
// unknown name or on "avx512" where they do not run. Returns the previous setting.
std::string set_loops(const std::string& setting);

struct LoopsReport {
  std::string loops;                   // portable or avx512
  std::string reason;                  // by CPU feature ..., or forced by ...
  std::vector<std::string> available;  // the sets this CPU runs
};
LoopsReport loops_report();

}  // namespace rpe_ops
