// AVX-512 loops of the CPU kernels, for CPUs that have it (checked at run time;
// other CPUs run the portable loops in rpe_index_kernel.cpp): the index ops for
// float32, the reductions for float32, bfloat16 and float16.
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

// The bits of a bfloat16 / float16 value (c10::BFloat16 / c10::Half store exactly these).
struct BFloat16Bits { uint16_t x; };
struct Float16Bits { uint16_t x; };

// True when this CPU and OS run AVX-512 F, BW and VL code (loops.h decides
// whether the kernels use these loops).
bool available();

// True if every ids[e], e < n, lies in [0, K). With one_bucket_vectors (else nullptr), also counts
// the vectors ids[16 v .. 16 v + 15] whose 16 ids are all equal into *one_bucket_vectors.
bool all_in_range(const int32_t* ids, int64_t n, int64_t K, int64_t* one_bucket_vectors = nullptr);

// Rows of at most this many entries are looked up with register permutes, longer ones with gathers.
constexpr int64_t kMaxPermuteK = 128;

// out_row[j] = in_row[index_row[j]] for j < Lk; in_row has K entries.
void index_row(const float* in_row, int64_t K, const int32_t* index_row, float* out_row, int64_t Lk);

// out_row[j] = in_row[index_row[j]] + keys_t[index_t_row[j] * Lk + j] for j < Lk, with keys_t the
// key-side table of this (b, h) transposed to (Kt, Lk) (Kt * Lk < 2^31): neighbouring keys mostly
// share a bucket, so they read neighbouring entries -- one load where all 16 do.
void index_qk_row(const float* in_row, int64_t K, const int32_t* index_row, const float* keys_t,
                  const int32_t* index_t_row, int64_t Lk, float* out_row);

// For the n_rows <= kRows rows that share index_row (one query i, several (b, h)):
//   out_rows[r][t] = sum_j rows[r][j] * [index_row[j] == t],  j < Lk, t < K.
// Sixteen rows are summed at once, one per lane: the values of 16 keys are
// transposed in registers so that each key adds one vector to its bucket.
// scratch: 2 * K * kRows floats.
// With key_sums (else nullptr), also the key-side sums of rpe_reduce_qk for this query:
//   key_sums[(j * Kt + index_t_row[j]) * kRows + r] += rows[r][j]
// into a (Lk, Kt, kRows) table of this group of rows, summed over the queries it is given.
// The same for bfloat16 and float16 rows, summed in float32; out_rows are float32.
void reduce_rows(const float* const* rows, int n_rows, const int32_t* index_row, int64_t Lk, int64_t K,
                 float* const* out_rows, float* scratch, const int32_t* index_t_row = nullptr, int64_t Kt = 0,
                 float* key_sums = nullptr);
void reduce_rows(const BFloat16Bits* const* rows, int n_rows, const int32_t* index_row, int64_t Lk, int64_t K,
                 float* const* out_rows, float* scratch, const int32_t* index_t_row = nullptr, int64_t Kt = 0,
                 float* key_sums = nullptr);
void reduce_rows(const Float16Bits* const* rows, int n_rows, const int32_t* index_row, int64_t Lk, int64_t K,
                 float* const* out_rows, float* scratch, const int32_t* index_t_row = nullptr, int64_t Kt = 0,
                 float* key_sums = nullptr);

}  // namespace avx512
}  // namespace rpe_ops
