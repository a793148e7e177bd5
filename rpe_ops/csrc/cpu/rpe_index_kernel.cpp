// CPU kernels of rpe_index / rpe_reduce: one (b, h, i) row per loop iteration,
// rows split across threads with at::parallel_for. Each row reads and writes
// only its own slice, so the reduce needs no atomics or locks.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../rpe_index.h"

namespace rpe_ops {
namespace {

// Rows per parallel chunk: enough elements (ATen's usual grain, 32k) that a
// chunk's work outweighs the cost of handing it to a thread.
int64_t rows_per_chunk(int64_t row_width) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_width));
}

// One pass over the (Lq, Lk) index per call, instead of a check per element in
// each of the B*H rows that read it.
void check_bucket_ids(const at::Tensor& index, int64_t K, const char* op) {
  const int32_t* idx = index.const_data_ptr<int32_t>();
  const int64_t n = index.numel();
  int64_t bad = n;
  for (int64_t e = 0; e < n; ++e) {
    if (!bucket_in_range(idx[e], K)) {
      bad = e;
      break;
    }
  }
  TORCH_CHECK_INDEX(bad == n, op, ": index[", bad / index.size(1), ", ", bad % index.size(1),
                    "] = ", bad < n ? idx[bad] : 0, " is not a bucket id in [0, ", K, ")");
}

at::Tensor rpe_index_cpu(const at::Tensor& input_, const at::Tensor& index_) {
  check_rows_and_index(input_, index_, "rpe_index");
  const at::Tensor input = input_.contiguous();
  const at::Tensor index = index_.contiguous();
  const int64_t Lq = input.size(2), K = input.size(3), Lk = index.size(1);
  const int64_t BH = input.size(0) * input.size(1), rows = BH * Lq;
  check_bucket_ids(index, K, "rpe_index");
  at::Tensor out = at::empty({input.size(0), input.size(1), Lq, Lk}, input.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rpe_index_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const int32_t* idx = index.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_chunk(Lk), [&](int64_t begin, int64_t end) {
      for (int64_t step = begin; step < end; ++step) {
        const int64_t row = row_of_query_major_step(step, BH, Lq);
        const scalar_t* in_row = in + row_offset(row, K);
        const int32_t* idx_row = idx + index_row_offset(query_of_row(row, Lq), Lk);
        scalar_t* y_row = y + row_offset(row, Lk);
        for (int64_t j = 0; j < Lk; ++j) y_row[j] = in_row[idx_row[j]];
      }
    });
  });
  return out;
}

// Neighbouring keys often share a bucket (all far keys fall in the clipped
// bucket), which would chain every add on the one before it through memory;
// kLanes interleaved copies of the buckets let consecutive adds run in parallel.
constexpr int64_t kLanes = 4;

at::Tensor rpe_reduce_cpu(const at::Tensor& values_, const at::Tensor& index_, int64_t K) {
  check_rows_and_index(values_, index_, "rpe_reduce");
  TORCH_CHECK(index_.size(1) == values_.size(3), "rpe_reduce: index has Lk = ", index_.size(1),
              " columns but values has Lk = ", values_.size(3));
  TORCH_CHECK(K >= 0, "rpe_reduce: num_buckets must be >= 0, got ", K);
  const at::Tensor values = values_.contiguous();
  const at::Tensor index = index_.contiguous();
  const int64_t Lq = values.size(2), Lk = values.size(3);
  const int64_t BH = values.size(0) * values.size(1), rows = BH * Lq;
  check_bucket_ids(index, K, "rpe_reduce");
  at::Tensor out = at::empty({values.size(0), values.size(1), Lq, K}, values.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "rpe_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // half types accumulate in float
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const int32_t* idx = index.const_data_ptr<int32_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_chunk(Lk), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> lanes(kLanes * K);
      acc_t* acc[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) acc[l] = lanes.data() + l * K;
      for (int64_t step = begin; step < end; ++step) {
        const int64_t row = row_of_query_major_step(step, BH, Lq);
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

}  // namespace

TORCH_LIBRARY_IMPL(rpe_ops, CPU, m) {
  m.impl("rpe_index", &rpe_index_cpu);
  m.impl("rpe_reduce", &rpe_reduce_cpu);
}

}  // namespace rpe_ops
