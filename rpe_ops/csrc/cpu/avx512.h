// AVX-512 loops of the float32 CPU kernels, for CPUs that have it (checked at
// run time; other CPUs and dtypes run the portable loops in rpe_index_kernel.cpp).
//
// avx512.cpp is compiled for AVX-512 function by function and includes no
// ATen header, so no inline ATen code is ever built with AVX-512 instructions
// and then picked by the linker for a CPU without them. Callers pass raw
// pointers; all offsets come from ../rpe_index.h in the caller.
#pragma once

#include <cstdint>

namespace rpe_ops {
namespace avx512 {

// Rows of one reduce call that share an index row: one per 32-bit SIMD lane.
constexpr int kRows = 16;

// True when this CPU and OS run AVX-512F code.
bool available();

// Whether the CPU kernels use these loops: available() unless switched off
// (rpe_ops._C._set_cpu_simd(False), for tests and comparisons).
bool enabled();
void set_enabled(bool on);

// out_row[j] = in_row[index_row[j]] for j < Lk.
void index_row(const float* in_row, const int32_t* index_row, float* out_row, int64_t Lk);

// out_row[j] = in_row[index_row[j]] + keys[j * Kt + index_t_row[j]] for j < Lk (Lk * Kt < 2^31).
void index_qk_row(const float* in_row, const int32_t* index_row, const float* keys,
                  const int32_t* index_t_row, int64_t Kt, float* out_row, int64_t Lk);

// For the n_rows <= kRows rows that share index_row (one query i, several (b, h)):
//   out_rows[r][t] = sum_j rows[r][j] * [index_row[j] == t],  j < Lk, t < K.
// Sixteen rows are summed at once, one per lane: the values of 16 keys are
// transposed in registers so that each key adds one vector to its bucket.
// scratch: 2 * K * kRows floats.
void reduce_rows(const float* const* rows, int n_rows, const int32_t* index_row, int64_t Lk, int64_t K,
                 float* const* out_rows, float* scratch);

}  // namespace avx512
}  // namespace rpe_ops
