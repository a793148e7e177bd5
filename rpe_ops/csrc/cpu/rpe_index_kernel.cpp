// CPU kernels of rpe_index / rpe_reduce: one (b, h, i) row per loop iteration,
// rows split across threads with at::parallel_for. Each row reads and writes
// only its own slice, so the reduce needs no atomics or locks. Each kernel runs
// the portable loops here or those of avx512.cpp, as loops.h says. Large
// outputs come from block_cache.h.
// rpe_index, rpe_index_qk and the portable rpe_reduce visit rows in memory order
// ((b, h)-major), each row following the last: query-major order would write or
// read B*H streams a (Lq, Lk) slice apart, which is slower, while the (Lq, Lk)
// index, read once per (b, h), stays in the last-level cache.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../rpe_index.h"
#include "avx512.h"
#include "block_cache.h"
#include "loops.h"

namespace rpe_ops {
namespace {

// Rows per parallel chunk: enough elements (ATen's usual grain, 32k) that a
// chunk's work outweighs the cost of handing it to a thread.
int64_t rows_per_chunk(int64_t row_width) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_width));
}

// One pass over the (Lq, Lk) index per call, instead of a check per element in
// each of the B*H rows that read it. On the AVX-512 loops, one_bucket_vectors
// (if given) gets the number of 16-id vectors all in one bucket (see avx512.h).
void check_bucket_ids(const at::Tensor& index, int64_t K, const char* op, bool simd,
                      int64_t* one_bucket_vectors = nullptr) {
  const int32_t* idx = index.const_data_ptr<int32_t>();
  const int64_t n = index.numel();
  if (simd && avx512::all_in_range(idx, n, K, one_bucket_vectors)) return;
  int32_t lo = 0, hi = 0;  // a min/max pass vectorizes; a search for the first bad id would not
  if (n > 0) lo = hi = idx[0];
  for (int64_t e = 0; e < n; ++e) {
    lo = std::min(lo, idx[e]);
    hi = std::max(hi, idx[e]);
  }
  if (n == 0 || (bucket_in_range(lo, K) && bucket_in_range(hi, K))) return;
  int64_t bad = 0;
  while (bucket_in_range(idx[bad], K)) ++bad;
  TORCH_CHECK_INDEX(false, op, ": index[", bad / index.size(1), ", ", bad % index.size(1), "] = ", idx[bad],
                    " is not a bucket id in [0, ", K, ")");
}

}  // namespace

at::Tensor rpe_index_cpu(const at::Tensor& input_, const at::Tensor& index_) {
  check_rows_and_index(input_, index_, "rpe_index");
  const bool simd = use_avx512();  // the AVX-512 loops (loops.h)
  const at::Tensor input = input_.contiguous();
  const at::Tensor index = index_.contiguous();
  const int64_t Lq = input.size(2), K = input.size(3), Lk = index.size(1);
  const int64_t BH = input.size(0) * input.size(1), rows = BH * Lq;
  check_bucket_ids(index, K, "rpe_index", simd);
  at::Tensor out = block_cache::empty_tensor({input.size(0), input.size(1), Lq, Lk}, input.options());

  if (input.scalar_type() == at::kFloat && simd) {
    const float* in = input.const_data_ptr<float>();
    const int32_t* idx = index.const_data_ptr<int32_t>();
    float* y = out.mutable_data_ptr<float>();
    at::parallel_for(0, rows, rows_per_chunk(Lk), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        avx512::index_row(in + row_offset(row, K), K, idx + index_row_offset(query_of_row(row, Lq), Lk),
                          y + row_offset(row, Lk), Lk);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rpe_index_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const int32_t* idx = index.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_chunk(Lk), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* in_row = in + row_offset(row, K);
        const int32_t* idx_row = idx + index_row_offset(query_of_row(row, Lq), Lk);
        scalar_t* y_row = y + row_offset(row, Lk);
        for (int64_t j = 0; j < Lk; ++j) y_row[j] = in_row[idx_row[j]];
      }
    });
  });
  return out;
}

namespace {

// The element type the AVX-512 loops read for a tensor's scalar_t (same bits).
template <typename scalar_t>
using simd_t = std::conditional_t<std::is_same_v<scalar_t, float>, float,
                                  std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, avx512::BFloat16Bits,
                                                     avx512::Float16Bits>>;

// The rows of query i for the (b, h) group g (b * H + h in [16 g, 16 g + 16)),
// and where their per-bucket sums go: the float32 output rows themselves, or,
// for half types, a float32 buffer that store() then rounds into the output.
template <typename scalar_t>
struct Group {
  int n = 0;
  const simd_t<scalar_t>* rows[avx512::kRows];
  float* sums[avx512::kRows];
  scalar_t* out[avx512::kRows];
  std::vector<float> buffer;

  explicit Group(int64_t K) : buffer(std::is_same_v<scalar_t, float> ? 0 : avx512::kRows * K) {}

  void select(const scalar_t* values, scalar_t* y, int64_t g, int64_t i, int64_t BH, int64_t Lq, int64_t Lk,
              int64_t K) {
    n = static_cast<int>(std::min<int64_t>(avx512::kRows, BH - g * avx512::kRows));
    for (int r = 0; r < n; ++r) {
      const int64_t row = row_of_bh_query(g * avx512::kRows + r, i, Lq);
      rows[r] = reinterpret_cast<const simd_t<scalar_t>*>(values + row_offset(row, Lk));
      out[r] = y + row_offset(row, K);
      sums[r] = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out[r]) : buffer.data() + r * K;
    }
  }

  void store(int64_t K) {
    if constexpr (!std::is_same_v<scalar_t, float>)
      for (int r = 0; r < n; ++r)
        for (int64_t t = 0; t < K; ++t) out[r][t] = static_cast<scalar_t>(sums[r][t]);
  }
};

// rpe_reduce on AVX-512 (float32, bfloat16, float16; sums in float32): one task
// per (query i, group of up to 16 (b, h) rows), the rows of a group summed
// together, one per SIMD lane.
template <typename scalar_t>
void reduce_avx512(const at::Tensor& values, const at::Tensor& index, at::Tensor& out) {
  const int64_t Lq = values.size(2), Lk = values.size(3), K = out.size(3);
  const int64_t BH = values.size(0) * values.size(1);
  const int64_t groups = (BH + avx512::kRows - 1) / avx512::kRows;
  const scalar_t* v = values.const_data_ptr<scalar_t>();
  const int32_t* idx = index.const_data_ptr<int32_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, Lq * groups, rows_per_chunk(avx512::kRows * Lk), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * K * avx512::kRows);
    Group<scalar_t> group(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / groups;  // query-major: a group's 16 rows share query i's index row
      group.select(v, y, task % groups, i, BH, Lq, Lk, K);
      avx512::reduce_rows(group.rows, group.n, idx + index_row_offset(i, Lk), Lk, K, group.sums, scratch.data());
      group.store(K);
    }
  });
}

// rpe_reduce_qk on AVX-512, one read of values: the groups of 16 rows of
// reduce_avx512, whose transposed vectors (one (b, h) per lane) also go to the
// key-side sums, in a float32 (Lk, Kt, 16) table per group. Consecutive queries
// mostly hit the same entries of it (bucket ids change slowly along a column
// too), so the table's working set stays in L2. Queries are split into one
// range per thread, each with its own tables (at most 256 MiB in all), which
// are summed at the end.
template <typename scalar_t>
void reduce_qk_avx512(const at::Tensor& values, const at::Tensor& index, const at::Tensor& index_t,
                      at::Tensor& out, at::Tensor& out_t) {
  constexpr int64_t R = avx512::kRows;
  const int64_t Lq = values.size(2), Lk = values.size(3), K = out.size(3), Kt = out_t.size(3);
  const int64_t BH = values.size(0) * values.size(1), groups = (BH + R - 1) / R;
  const int64_t table = groups * Lk * Kt * R;  // floats of one range's key-side tables
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), Lq, (int64_t(256) << 20) / (4 * table)}));
  at::Tensor partial = block_cache::empty_tensor({parts, groups, Lk, Kt, R}, values.options().dtype(at::kFloat)).zero_();
  const scalar_t* v = values.const_data_ptr<scalar_t>();
  const int32_t* idx = index.const_data_ptr<int32_t>();
  const int32_t* idx_t = index_t.const_data_ptr<int32_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  float* key_sums = partial.mutable_data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * K * R);
    Group<scalar_t> group(K);
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t i = part * Lq / parts; i < (part + 1) * Lq / parts; ++i) {
        for (int64_t g = 0; g < groups; ++g) {
          group.select(v, y, g, i, BH, Lq, Lk, K);
          avx512::reduce_rows(group.rows, group.n, idx + index_row_offset(i, Lk), Lk, K, group.sums, scratch.data(),
                              idx_t + index_row_offset(i, Lk), Kt, key_sums + (part * groups + g) * Lk * Kt * R);
          group.store(K);
        }
      }
    }
  });
  // (groups, Lk, Kt, R) -> (B * H, Lk, Kt): lane r of group g is (b, h) = g * R + r
  const at::Tensor total = parts > 1 ? partial.sum(0) : partial[0];
  out_t.view({BH, Lk, Kt}).copy_(total.permute({0, 3, 1, 2}).reshape({groups * R, Lk, Kt}).slice(0, 0, BH));
}

// Whether the AVX-512 reduce loops take these values: float32 or half types, and
// more than one (b, h) row per query (one row would leave 15 of 16 lanes idle).
bool avx512_reduce(bool simd, const at::Tensor& values) {
  const auto dtype = values.scalar_type();
  return simd && values.size(0) * values.size(1) >= 2 &&
         (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf);
}

// Neighbouring keys often share a bucket (all far keys fall in the clipped
// bucket), which would chain every add on the one before it through memory;
// kLanes interleaved copies of the buckets let consecutive adds run in parallel.
constexpr int64_t kLanes = 4;

}  // namespace

at::Tensor rpe_reduce_cpu(const at::Tensor& values_, const at::Tensor& index_, int64_t K) {
  check_rows_and_index(values_, index_, "rpe_reduce");
  const bool simd = use_avx512();  // the AVX-512 loops (loops.h)
  TORCH_CHECK(index_.size(1) == values_.size(3), "rpe_reduce: index has Lk = ", index_.size(1),
              " columns but values has Lk = ", values_.size(3));
  TORCH_CHECK(K >= 0, "rpe_reduce: num_buckets must be >= 0, got ", K);
  const at::Tensor values = values_.contiguous();
  const at::Tensor index = index_.contiguous();
  const int64_t Lq = values.size(2), Lk = values.size(3);
  const int64_t BH = values.size(0) * values.size(1), rows = BH * Lq;
  check_bucket_ids(index, K, "rpe_reduce", simd);
  at::Tensor out = block_cache::empty_tensor({values.size(0), values.size(1), Lq, K}, values.options());

  if (avx512_reduce(simd, values)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "rpe_reduce_avx512", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) reduce_avx512<scalar_t>(values, index, out);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "rpe_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // half types accumulate in float
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const int32_t* idx = index.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_chunk(Lk), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> lanes(kLanes * K);
      acc_t* acc[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) acc[l] = lanes.data() + l * K;
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* v_row = v + row_offset(row, Lk);
        const int32_t* idx_row = idx + index_row_offset(query_of_row(row, Lq), Lk);
        std::fill(lanes.begin(), lanes.end(), acc_t(0));
        int64_t j = 0;
        for (; j + kLanes <= Lk; j += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) acc[l][idx_row[j + l]] += static_cast<acc_t>(v_row[j + l]);
        for (; j < Lk; ++j) acc[0][idx_row[j]] += static_cast<acc_t>(v_row[j]);
        scalar_t* y_row = y + row_offset(row, K);
        for (int64_t t = 0; t < K; ++t) y_row[t] = static_cast<scalar_t>((acc[0][t] + acc[1][t]) + (acc[2][t] + acc[3][t]));
      }
    });
  });
  return out;
}

// Portable loops: rows in (b, h)-major order, so that the key-side table of one (b, h), Lk * Kt
// entries that each row reads all across, stays in L2 while its Lq rows run.
at::Tensor rpe_index_qk_cpu(const at::Tensor& input_, const at::Tensor& index_, const at::Tensor& input_t_,
                            const at::Tensor& index_t_) {
  check_key_side(input_, index_, input_t_, index_t_, "rpe_index_qk");
  const bool simd = use_avx512();  // the AVX-512 loops (loops.h)
  const at::Tensor input = input_.contiguous(), input_t = input_t_.contiguous();
  const at::Tensor index = index_.contiguous(), index_t = index_t_.contiguous();
  const int64_t Lq = input.size(2), K = input.size(3), Lk = index.size(1), Kt = input_t.size(3);
  const int64_t rows = input.size(0) * input.size(1) * Lq;
  int64_t runs = 0;
  check_bucket_ids(index, K, "rpe_index_qk", simd);
  check_bucket_ids(index_t, Kt, "rpe_index_qk (index_t)", simd, &runs);
  at::Tensor out = block_cache::empty_tensor({input.size(0), input.size(1), Lq, Lk}, input.options());

  // The AVX-512 loop gathers the key-side entries, which pays off only where neighbouring keys share a
  // key-side bucket (one load for 16 keys), as iRPE's ids mostly do; ids with fewer such runs than 10% of
  // their 16-id vectors run the portable loop, which is faster there.
  const bool runs_of_buckets = runs * 10 >= index_t.numel() / 16;
  if (input.scalar_type() == at::kFloat && simd && Kt * Lk <= INT32_MAX && runs_of_buckets) {
    // The key-side table transposed to (B, H, Kt, Lk): see avx512::index_qk_row.
    const at::Tensor keys_t = input_t.transpose(2, 3).contiguous();
    const float* in = input.const_data_ptr<float>();
    const float* k_t = keys_t.const_data_ptr<float>();
    const int32_t* idx = index.const_data_ptr<int32_t>();
    const int32_t* idx_t = index_t.const_data_ptr<int32_t>();
    float* y = out.mutable_data_ptr<float>();
    // (b, h)-major, as the portable loop below.
    at::parallel_for(0, rows, rows_per_chunk(Lk), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t i = query_of_row(row, Lq);
        avx512::index_qk_row(in + row_offset(row, K), K, idx + index_row_offset(i, Lk),
                             k_t + row_offset(key_row_of(row, 0, Lq, Lk), Kt), idx_t + index_row_offset(i, Lk), Lk,
                             y + row_offset(row, Lk));
      }
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rpe_index_qk_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* in_t = input_t.const_data_ptr<scalar_t>();
    const int32_t* idx = index.const_data_ptr<int32_t>();
    const int32_t* idx_t = index_t.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_chunk(Lk), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* in_row = in + row_offset(row, K);
        const scalar_t* keys = in_t + row_offset(key_row_of(row, 0, Lq, Lk), Kt);
        const int64_t i = query_of_row(row, Lq);
        const int32_t* idx_row = idx + index_row_offset(i, Lk);
        const int32_t* idx_t_row = idx_t + index_row_offset(i, Lk);
        scalar_t* y_row = y + row_offset(row, Lk);
        for (int64_t j = 0; j < Lk; ++j)
          y_row[j] = in_row[idx_row[j]] + keys[row_offset(j, Kt) + idx_t_row[j]];
      }
    });
  });
  return out;
}

// Portable loops: one task per (b, h); it owns out_t's (Lk, Kt) slice of that (b, h), summed
// over all Lq rows in a buffer that stays in L2, so no two threads share an
// output element. Each values element is read once for both tables.
std::tuple<at::Tensor, at::Tensor> rpe_reduce_qk_cpu(const at::Tensor& values_, const at::Tensor& index_,
                                                     int64_t K, const at::Tensor& index_t_, int64_t Kt) {
  check_rows_and_index(values_, index_, "rpe_reduce_qk");
  const bool simd = use_avx512();  // the AVX-512 loops (loops.h)
  TORCH_CHECK(index_.size(1) == values_.size(3), "rpe_reduce_qk: index has Lk = ", index_.size(1),
              " columns but values has Lk = ", values_.size(3));
  TORCH_CHECK(index_t_.sizes() == index_.sizes() && index_t_.scalar_type() == at::kInt &&
                  index_t_.device() == index_.device(),
              "rpe_reduce_qk: expected index_t like index, int32 ", index_.sizes(), ", got ",
              index_t_.scalar_type(), " ", index_t_.sizes());
  TORCH_CHECK(K >= 0 && Kt >= 0, "rpe_reduce_qk: num_buckets must be >= 0, got ", K, " and ", Kt);
  const at::Tensor values = values_.contiguous();
  const at::Tensor index = index_.contiguous(), index_t = index_t_.contiguous();
  const int64_t B = values.size(0), H = values.size(1), Lq = values.size(2), Lk = values.size(3);
  check_bucket_ids(index, K, "rpe_reduce_qk", simd);
  check_bucket_ids(index_t, Kt, "rpe_reduce_qk (index_t)", simd);
  at::Tensor out = block_cache::empty_tensor({B, H, Lq, K}, values.options());
  at::Tensor out_t = block_cache::empty_tensor({B, H, Lk, Kt}, values.options());

  if (avx512_reduce(simd, values)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "rpe_reduce_qk_avx512", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) reduce_qk_avx512<scalar_t>(values, index, index_t, out, out_t);
    });
    return {out, out_t};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "rpe_reduce_qk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const int32_t* idx = index.const_data_ptr<int32_t>();
    const int32_t* idx_t = index_t.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    scalar_t* y_t = out_t.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> lanes(kLanes * K), keys(Lk * Kt);
      acc_t* acc[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) acc[l] = lanes.data() + l * K;
      for (int64_t bh = begin; bh < end; ++bh) {
        std::fill(keys.begin(), keys.end(), acc_t(0));
        for (int64_t row = bh * Lq; row < (bh + 1) * Lq; ++row) {
          const scalar_t* v_row = v + row_offset(row, Lk);
          const int64_t i = query_of_row(row, Lq);
          const int32_t* idx_row = idx + index_row_offset(i, Lk);
          const int32_t* idx_t_row = idx_t + index_row_offset(i, Lk);
          std::fill(lanes.begin(), lanes.end(), acc_t(0));
          int64_t j = 0;
          for (; j + kLanes <= Lk; j += kLanes)
            for (int64_t l = 0; l < kLanes; ++l) {
              const acc_t value = static_cast<acc_t>(v_row[j + l]);
              acc[l][idx_row[j + l]] += value;
              keys[row_offset(j + l, Kt) + idx_t_row[j + l]] += value;
            }
          for (; j < Lk; ++j) {
            const acc_t value = static_cast<acc_t>(v_row[j]);
            acc[0][idx_row[j]] += value;
            keys[row_offset(j, Kt) + idx_t_row[j]] += value;
          }
          scalar_t* y_row = y + row_offset(row, K);
          for (int64_t t = 0; t < K; ++t) y_row[t] = static_cast<scalar_t>((acc[0][t] + acc[1][t]) + (acc[2][t] + acc[3][t]));
        }
        scalar_t* y_t_bh = y_t + row_offset(key_row_of(bh * Lq, 0, Lq, Lk), Kt);
        for (int64_t e = 0; e < Lk * Kt; ++e) y_t_bh[e] = static_cast<scalar_t>(keys[e]);
      }
    });
  });
  return {out, out_t};
}

TORCH_LIBRARY_IMPL(rpe_ops, CPU, m) {
  m.impl("rpe_index", rpe_index_cpu);
  m.impl("rpe_reduce", rpe_reduce_cpu);
  m.impl("rpe_index_qk", rpe_index_qk_cpu);
  m.impl("rpe_reduce_qk", rpe_reduce_qk_cpu);
}

}  // namespace rpe_ops
