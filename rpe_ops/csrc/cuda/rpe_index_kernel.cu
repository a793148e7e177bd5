// CUDA kernels of rpe_index / rpe_reduce.
//   rpe_index:  one thread per output element (grid-stride), a plain gather.
//   rpe_reduce: one block per (b, h, i) row; the block accumulates the row's
//               buckets in shared memory (fast shared atomics), then writes
//               them once. No global atomics. Rows with more buckets than fit
//               in shared memory are split into tiles of buckets, one block
//               per (row, tile) (grid.y), each scanning the whole row.
//   rpe_index_qk:  as rpe_index, plus the key-side gather.
//   rpe_reduce_qk: the rpe_reduce kernel for the query-side table, and the same
//               scheme per key row (b, h, j), scanning the column j of values.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../rpe_index.h"

namespace rpe_ops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;
constexpr int64_t kSharedBytes = 48 * 1024;  // available to every block without opt-in

template <typename scalar_t>
__global__ void rpe_index_kernel(const scalar_t* __restrict__ in, const int32_t* __restrict__ idx,
                                 scalar_t* __restrict__ y, int64_t numel, int64_t Lq, int64_t K,
                                 int64_t Lk) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = e / Lk, j = e - row * Lk;
    const int32_t t = idx[index_row_offset(query_of_row(row, Lq), Lk) + j];
    CUDA_KERNEL_ASSERT(bucket_in_range(t, K));
    y[row_offset(row, Lk) + j] = in[row_offset(row, K) + t];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rpe_reduce_kernel(const scalar_t* __restrict__ v, const int32_t* __restrict__ idx,
                                  scalar_t* __restrict__ y, int64_t rows, int64_t Lq, int64_t Lk,
                                  int64_t K, int64_t tile) {
  extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
  acc_t* acc = reinterpret_cast<acc_t*>(shared_raw);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* v_row = v + row_offset(row, Lk);
    const int32_t* idx_row = idx + index_row_offset(query_of_row(row, Lq), Lk);
    scalar_t* y_row = y + row_offset(row, K);
    for (int64_t first = blockIdx.y * tile; first < K; first += gridDim.y * tile) {
      const int64_t width = min(tile, K - first);
      for (int64_t t = threadIdx.x; t < width; t += blockDim.x) acc[t] = acc_t(0);
      __syncthreads();
      for (int64_t j = threadIdx.x; j < Lk; j += blockDim.x) {
        const int32_t t = idx_row[j];
        CUDA_KERNEL_ASSERT(bucket_in_range(t, K));
        const int64_t local = t - first;
        if (local >= 0 && local < width) atomicAdd(acc + local, static_cast<acc_t>(v_row[j]));
      }
      __syncthreads();
      for (int64_t t = threadIdx.x; t < width; t += blockDim.x)
        y_row[first + t] = static_cast<scalar_t>(acc[t]);
      __syncthreads();  // the next tile or row reuses acc
    }
  }
}

template <typename scalar_t>
__global__ void rpe_index_qk_kernel(const scalar_t* __restrict__ in, const int32_t* __restrict__ idx,
                                    const scalar_t* __restrict__ in_t, const int32_t* __restrict__ idx_t,
                                    scalar_t* __restrict__ y, int64_t numel, int64_t Lq, int64_t K,
                                    int64_t Lk, int64_t Kt) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t row = e / Lk, j = e - row * Lk;
    const int64_t at = index_row_offset(query_of_row(row, Lq), Lk) + j;
    const int32_t t = idx[at], u = idx_t[at];
    CUDA_KERNEL_ASSERT(bucket_in_range(t, K));
    CUDA_KERNEL_ASSERT(bucket_in_range(u, Kt));
    y[row_offset(row, Lk) + j] = in[row_offset(row, K) + t] + in_t[row_offset(key_row_of(row, j, Lq, Lk), Kt) + u];
  }
}

// out_t[key_row, t] = sum_i v[query_row_of(key_row, i), j] * [idx_t[i, j] == t]; as rpe_reduce_kernel.
template <typename scalar_t, typename acc_t>
__global__ void rpe_reduce_keys_kernel(const scalar_t* __restrict__ v, const int32_t* __restrict__ idx_t,
                                       scalar_t* __restrict__ y_t, int64_t key_rows, int64_t Lq,
                                       int64_t Lk, int64_t Kt, int64_t tile) {
  extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
  acc_t* acc = reinterpret_cast<acc_t*>(shared_raw);
  for (int64_t key_row = blockIdx.x; key_row < key_rows; key_row += gridDim.x) {
    const int64_t j = key_of_row(key_row, Lk);
    scalar_t* y_row = y_t + row_offset(key_row, Kt);
    for (int64_t first = blockIdx.y * tile; first < Kt; first += gridDim.y * tile) {
      const int64_t width = min(tile, Kt - first);
      for (int64_t t = threadIdx.x; t < width; t += blockDim.x) acc[t] = acc_t(0);
      __syncthreads();
      for (int64_t i = threadIdx.x; i < Lq; i += blockDim.x) {
        const int32_t t = idx_t[index_row_offset(i, Lk) + j];
        CUDA_KERNEL_ASSERT(bucket_in_range(t, Kt));
        const int64_t local = t - first;
        if (local >= 0 && local < width)
          atomicAdd(acc + local, static_cast<acc_t>(v[row_offset(query_row_of(key_row, i, Lq, Lk), Lk) + j]));
      }
      __syncthreads();
      for (int64_t t = threadIdx.x; t < width; t += blockDim.x)
        y_row[first + t] = static_cast<scalar_t>(acc[t]);
      __syncthreads();
    }
  }
}

at::Tensor rpe_index_cuda(const at::Tensor& input_, const at::Tensor& index_) {
  check_rows_and_index(input_, index_, "rpe_index");
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor index = index_.contiguous();
  const int64_t Lq = input.size(2), K = input.size(3), Lk = index.size(1);
  at::Tensor out = at::empty({input.size(0), input.size(1), Lq, Lk}, input.options());
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks * 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rpe_index_cuda", [&] {
    rpe_index_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), index.const_data_ptr<int32_t>(),
        out.mutable_data_ptr<scalar_t>(), numel, Lq, K, Lk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor rpe_reduce_cuda(const at::Tensor& values_, const at::Tensor& index_, int64_t K) {
  check_rows_and_index(values_, index_, "rpe_reduce");
  TORCH_CHECK(index_.size(1) == values_.size(3), "rpe_reduce: index has Lk = ", index_.size(1),
              " columns but values has Lk = ", values_.size(3));
  TORCH_CHECK(K >= 0, "rpe_reduce: num_buckets must be >= 0, got ", K);
  const c10::cuda::CUDAGuard device_guard(values_.device());
  const at::Tensor values = values_.contiguous();
  const at::Tensor index = index_.contiguous();
  const int64_t Lq = values.size(2), Lk = values.size(3);
  const int64_t rows = values.size(0) * values.size(1) * Lq;
  at::Tensor out = at::empty({values.size(0), values.size(1), Lq, K}, values.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "rpe_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // half types accumulate in float
    const int64_t tile = std::min<int64_t>(K, kSharedBytes / sizeof(acc_t));
    const dim3 blocks(std::min<int64_t>(rows, kMaxBlocks * 8),
                      std::min<int64_t>((K + tile - 1) / tile, kMaxBlocks));
    rpe_reduce_kernel<scalar_t, acc_t><<<blocks, kThreads, tile * sizeof(acc_t), stream>>>(
        values.const_data_ptr<scalar_t>(), index.const_data_ptr<int32_t>(),
        out.mutable_data_ptr<scalar_t>(), rows, Lq, Lk, K, tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor rpe_index_qk_cuda(const at::Tensor& input_, const at::Tensor& index_,
                             const at::Tensor& input_t_, const at::Tensor& index_t_) {
  check_key_side(input_, index_, input_t_, index_t_, "rpe_index_qk");
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous(), input_t = input_t_.contiguous();
  const at::Tensor index = index_.contiguous(), index_t = index_t_.contiguous();
  const int64_t Lq = input.size(2), K = input.size(3), Lk = index.size(1), Kt = input_t.size(3);
  at::Tensor out = at::empty({input.size(0), input.size(1), Lq, Lk}, input.options());
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks * 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rpe_index_qk_cuda", [&] {
    rpe_index_qk_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), index.const_data_ptr<int32_t>(),
        input_t.const_data_ptr<scalar_t>(), index_t.const_data_ptr<int32_t>(),
        out.mutable_data_ptr<scalar_t>(), numel, Lq, K, Lk, Kt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rpe_reduce_qk_cuda(const at::Tensor& values_, const at::Tensor& index_,
                                                      int64_t K, const at::Tensor& index_t_, int64_t Kt) {
  TORCH_CHECK(index_t_.sizes() == index_.sizes() && index_t_.scalar_type() == at::kInt &&
                  index_t_.device() == index_.device(),
              "rpe_reduce_qk: expected index_t like index, int32 ", index_.sizes(), ", got ",
              index_t_.scalar_type(), " ", index_t_.sizes());
  TORCH_CHECK(Kt >= 0, "rpe_reduce_qk: num_buckets_t must be >= 0, got ", Kt);
  at::Tensor out = rpe_reduce_cuda(values_, index_, K);
  const c10::cuda::CUDAGuard device_guard(values_.device());
  const at::Tensor values = values_.contiguous();
  const at::Tensor index_t = index_t_.contiguous();
  const int64_t Lq = values.size(2), Lk = values.size(3);
  const int64_t key_rows = values.size(0) * values.size(1) * Lk;
  at::Tensor out_t = at::empty({values.size(0), values.size(1), Lk, Kt}, values.options());
  if (out_t.numel() == 0) return {out, out_t};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "rpe_reduce_qk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t tile = std::min<int64_t>(Kt, kSharedBytes / sizeof(acc_t));
    const dim3 blocks(std::min<int64_t>(key_rows, kMaxBlocks * 8),
                      std::min<int64_t>((Kt + tile - 1) / tile, kMaxBlocks));
    rpe_reduce_keys_kernel<scalar_t, acc_t><<<blocks, kThreads, tile * sizeof(acc_t), stream>>>(
        values.const_data_ptr<scalar_t>(), index_t.const_data_ptr<int32_t>(),
        out_t.mutable_data_ptr<scalar_t>(), key_rows, Lq, Lk, Kt, tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, out_t};
}

}  // namespace

// Names of their own: rpe_ops/cuda.py registers the public ops' CUDA kernel (Triton by default) and calls
// these with RPE_OPS_CUDA_KERNELS=cuda; a second kernel for the same op and key would replace the first.
TORCH_LIBRARY_FRAGMENT(rpe_ops, m) {
  m.def("_cuda_rpe_index(Tensor input, Tensor index) -> Tensor");
  m.def("_cuda_rpe_reduce(Tensor values, Tensor index, int num_buckets) -> Tensor");
  m.def("_cuda_rpe_index_qk(Tensor input, Tensor index, Tensor input_t, Tensor index_t) -> Tensor");
  m.def("_cuda_rpe_reduce_qk(Tensor values, Tensor index, int num_buckets, Tensor index_t, "
        "int num_buckets_t) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rpe_ops, CUDA, m) {
  m.impl("_cuda_rpe_index", &rpe_index_cuda);
  m.impl("_cuda_rpe_reduce", &rpe_reduce_cuda);
  m.impl("_cuda_rpe_index_qk", &rpe_index_qk_cuda);
  m.impl("_cuda_rpe_reduce_qk", &rpe_reduce_qk_cuda);
}

}  // namespace rpe_ops
