// Which loops each CPU op runs, decided per host at run time.
//
// A fast path that wins on one CPU can lose badly on another of the same kind:
// rpe_index's AVX-512 loop with streaming stores was faster than with plain stores
// on an AMD EPYC (Zen 4) and 12x slower on an Intel Xeon (Ice Lake). The sets are
//   portable       plain C++ loops, any CPU
//   avx512         the loops of avx512.h, plain stores      (CPUs with AVX-512 F/BW/VL)
//   avx512_stream  the same, rpe_index / rpe_index_qk writing their output with
//                  streaming stores (the reductions have no large output: as avx512)
// rpe_index and rpe_index_qk time every set this CPU runs at their first call in a
// process whose output is 8 MiB or more, on one problem of DETR-encoder proportions
// (float32; 3 rounds of calls, interleaved, timed in process CPU time; about 40-200 ms
// once per op on 2 cores), and keep the fastest; a more complex set must beat the
// simpler ones before it by kMargin, so that noise does not trade a loop for a more
// complex one that is no faster. Smaller outputs run the portable loops: such calls take well under a
// millisecond, less than timing would cost (tests, the demo's 4x4 maps). Their outputs
// are the same bits on every set, so neither choice can change a result.
// rpe_reduce and rpe_reduce_qk go by CPU features (avx512 where it runs): each set sums
// in its own order (equal up to rounding, not bit for bit), and a timed choice, which
// noise can flip between runs, would let two runs with one seed train differently.
// Their AVX-512 loops are 4-5x faster than the portable ones (Zen 4; see docs/benchmark.md).
//
// RPE_OPS_CPU_LOOPS=auto|portable|avx512|avx512_stream (read at first use; default
// auto) or rpe_ops.set_cpu_loops(...) forces one set for every op instead.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

namespace rpe_ops {

enum class Loops : int { kPortable = 0, kAvx512 = 1, kAvx512Stream = 2 };
enum class Op : int { kIndex = 0, kReduce = 1, kIndexQk = 2, kReduceQk = 3 };
constexpr int kNumOps = 4;

const char* loops_name(Loops loops);
const char* op_name(Op op);

// The loops `op` runs for a call writing output_bytes: forced, by CPU features, or timed (see above).
Loops loops_for(Op op, int64_t output_bytes);

// Force one set ("portable", "avx512", "avx512_stream") for every op, or "auto" (measure; earlier
// measurements are kept). Throws on an unknown name or on AVX-512 loops for a CPU without them.
// Returns the previous setting.
std::string set_loops(const std::string& setting);

struct LoopsReport {
  std::string setting;  // auto, portable, avx512, avx512_stream
  std::string set_by;   // default, RPE_OPS_CPU_LOOPS, set_cpu_loops
  std::vector<std::string> candidates;
  struct Choice {
    std::string op;
    std::string loops;                                           // "" until the op is first used
    std::string reason;
    std::vector<std::tuple<std::string, double>> milliseconds;  // per candidate, when measured
  };
  std::vector<Choice> ops;
};
LoopsReport loops_report();

// The kernels of rpe_index_kernel.cpp with the loops given (the measurement runs them all).
at::Tensor rpe_index_cpu(Loops loops, const at::Tensor& input, const at::Tensor& index);
at::Tensor rpe_reduce_cpu(Loops loops, const at::Tensor& values, const at::Tensor& index, int64_t K);
at::Tensor rpe_index_qk_cpu(Loops loops, const at::Tensor& input, const at::Tensor& index,
                            const at::Tensor& input_t, const at::Tensor& index_t);
std::tuple<at::Tensor, at::Tensor> rpe_reduce_qk_cpu(Loops loops, const at::Tensor& values,
                                                     const at::Tensor& index, int64_t K,
                                                     const at::Tensor& index_t, int64_t Kt);

}  // namespace rpe_ops
