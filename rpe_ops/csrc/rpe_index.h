// Index arithmetic shared by the CPU and CUDA kernels of rpe_index / rpe_reduce.
//
// Both ops work on "rows": one row is one (b, h, i) triple, flattened as
// row = (b * H + h) * Lq + i, so a contiguous (B, H, Lq, X) tensor is a
// (B*H*Lq, X) matrix and query i of a row is row % Lq.
//
//   rpe_index:  out[row, j] = input[row, index[i, j]]             (K -> Lk)
//   rpe_reduce: out[row, t] = sum_j values[row, j] * [index[i, j] == t]
//                                                                  (Lk -> K)
//
// The _qk ops add a second, key-side table: its row for key j of the same
// (b, h) is key_row = (b * H + h) * Lk + j, of width Kt, and index_t[i, j]
// picks the bucket in it (bucket_ids[j, i] for self-attention).
//   rpe_index_qk:  out[row, j] = input[row, index[i, j]] + input_t[key_row, index_t[i, j]]
//   rpe_reduce_qk: the two reductions of one values tensor, one per table.
//
// The kernels only loop; every offset and bound they use comes from here, so
// the CPU tests exercise the same arithmetic the GPU runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <cstdint>

namespace rpe_ops {

// Query position i of a flattened (b, h, i) row.
C10_HOST_DEVICE inline int64_t query_of_row(int64_t row, int64_t Lq) {
  return row % Lq;
}

// Row of query i for the flattened (b, h) index bh = b * H + h.
C10_HOST_DEVICE inline int64_t row_of_bh_query(int64_t bh, int64_t i, int64_t Lq) {
  return bh * Lq + i;
}

// Row of key j in a contiguous (B, H, Lk, Kt) key-side table, for the (b, h)
// of query row `row`.
C10_HOST_DEVICE inline int64_t key_row_of(int64_t row, int64_t j, int64_t Lq, int64_t Lk) {
  return (row / Lq) * Lk + j;
}

// The inverse walk, for kernels that sum over queries per key row: the query
// row of query i for the (b, h) of key row `key_row`.
C10_HOST_DEVICE inline int64_t query_row_of(int64_t key_row, int64_t i, int64_t Lq, int64_t Lk) {
  return (key_row / Lk) * Lq + i;
}

// Key j of a key row.
C10_HOST_DEVICE inline int64_t key_of_row(int64_t key_row, int64_t Lk) {
  return key_row % Lk;
}

// Start of row `row` in a contiguous (B, H, Lq, width) tensor.
C10_HOST_DEVICE inline int64_t row_offset(int64_t row, int64_t width) {
  return row * width;
}

// Start of the index row shared by all (b, h) rows of query i: (Lq, Lk).
C10_HOST_DEVICE inline int64_t index_row_offset(int64_t i, int64_t Lk) {
  return i * Lk;
}

// Bucket ids come from bucket_ids and should lie in [0, K), but an id out of
// range would read, or in the reduce write, outside its row. So the CPU path
// checks the (Lq, Lk) index once per call (raising IndexError) and the CUDA
// kernels assert per element (a device-side assert; no host sync needed).
C10_HOST_DEVICE inline bool bucket_in_range(int32_t bucket, int64_t K) {
  return bucket >= 0 && static_cast<int64_t>(bucket) < K;
}

// Shapes the kernels rely on. The Python wrapper (rpe_ops/__init__.py) checks
// the same things first with messages that say what to do; these checks keep
// direct torch.ops.rpe_ops.* calls from reading out of bounds.
//   rows:  (B, H, Lq, width) floating point;  index: (Lq, Lk) int32.
inline void check_rows_and_index(const at::Tensor& rows, const at::Tensor& index,
                                 const char* op) {
  TORCH_CHECK(rows.dim() == 4, op, ": expected a 4-D (B, H, Lq, X) tensor, got ",
              rows.dim(), "-D");
  TORCH_CHECK(index.dim() == 2 && index.size(0) == rows.size(2), op,
              ": expected index of shape (Lq, Lk) with Lq = ", rows.size(2),
              ", got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt, op,
              ": expected an int32 index, got ", index.scalar_type(),
              "; pass index.to(torch.int32)");
  TORCH_CHECK(index.device() == rows.device(), op, ": index is on ", index.device(),
              " but the tensor it indexes is on ", rows.device());
}

// The _qk ops: the key-side table has the same B, H as the query-side one and
// one row per key; index_t has the shape of index.
inline void check_key_side(const at::Tensor& rows, const at::Tensor& index,
                           const at::Tensor& rows_t, const at::Tensor& index_t, const char* op) {
  check_rows_and_index(rows, index, op);
  TORCH_CHECK(rows_t.dim() == 4 && rows_t.size(0) == rows.size(0) && rows_t.size(1) == rows.size(1) &&
                  rows_t.size(2) == index.size(1),
              op, ": expected the key-side table of shape (B, H, Lk, Kt) = (", rows.size(0), ", ",
              rows.size(1), ", ", index.size(1), ", Kt), got ", rows_t.sizes());
  TORCH_CHECK(rows_t.scalar_type() == rows.scalar_type() && rows_t.device() == rows.device(), op,
              ": the two tables must share dtype and device, got ", rows.scalar_type(), " on ",
              rows.device(), " and ", rows_t.scalar_type(), " on ", rows_t.device());
  TORCH_CHECK(index_t.sizes() == index.sizes() && index_t.scalar_type() == at::kInt &&
                  index_t.device() == index.device(),
              op, ": expected index_t like index, an int32 (", index.size(0), ", ", index.size(1),
              ") tensor on ", index.device(), ", got ", index_t.scalar_type(), " ", index_t.sizes(),
              " on ", index_t.device());
}

}  // namespace rpe_ops
