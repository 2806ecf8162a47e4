// Column gather (random feature selection) on CUDA: out[i, c] = x[i, index[c]].
//
// Forward thread mapping: blockIdx.y walks rows (grid-stride), threads walk groups of V
// consecutive output columns (V = 16 bytes / sizeof(T) when the output rows are 16-byte
// aligned, else 1). A thread whose V source columns form one aligned run (index[c+v] ==
// index[c] + v, common for RFS with small drop rates) reads them with one 16-byte load;
// otherwise it gathers V scalars. Every output vector is one 16-byte store, coalesced.
// Strided x is read in place through its strides (no copy).
//
// Backward: a scatter-add with possible duplicate indices, written as a gather over the
// column CSR of `index` (common/cuda_utils.cuh): each dx element is summed by one thread in
// index order, fp32 accumulation, no atomics, bit-for-bit deterministic.
//
// Index validation: a device scan records the first out-of-range position; the forward
// syncs once before its gather (the gather must not read out of bounds); the backward's CSR
// path is memory-safe for any index, so it syncs once at the end.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/column_csr.cuh"
#include "common/cuda_utils.cuh"
#include "gather/gather.h"

namespace semcomp {
namespace {

using namespace semcomp::cuda;

template <typename T, int V>
__global__ void gather_columns_kernel(const T* __restrict__ x, int64_t n, int64_t sr, int64_t sc,
                                      const int64_t* __restrict__ idx, int64_t k,
                                      T* __restrict__ out) {
  const int64_t groups = ceil_div(k, V);
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const T* row = x + i * sr;
    T* dst = out + i * k;
    for (int64_t gi = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; gi < groups;
         gi += int64_t(gridDim.x) * blockDim.x) {
      const int64_t c0 = gi * V;
      if constexpr (V == 1) {
        dst[c0] = row[idx[c0] * sc];
      } else {
        if (c0 + V <= k) {
          int64_t src[V];
          bool run = (sc == 1);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            src[v] = idx[c0 + v];
            run &= (src[v] == src[0] + v);
          }
          Vec<T, V> val;
          if (run && aligned16(row + src[0])) {
            val = *reinterpret_cast<const Vec<T, V>*>(row + src[0]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) val.v[v] = row[src[v] * sc];
          }
          *reinterpret_cast<Vec<T, V>*>(dst + c0) = val;
        } else {
          for (int64_t c = c0; c < k; ++c) dst[c] = row[idx[c] * sc];  // ragged tail
        }
      }
    }
  }
}

at::Tensor gather_columns_cuda(const at::Tensor& x, const at::Tensor& index) {
  constexpr const char* op = "gather_columns";
  check_gather_args(op, x, index);
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t n = x.size(0), d = x.size(1), k = index.size(0);
  at::Tensor out = at::empty({n, k}, x.options());
  if (k == 0) return out;
  const at::Tensor idx = index.to(at::kLong).contiguous();
  at::Tensor status = new_status(1, x);
  launch_index_scan(idx, d, status, 0, stream);
  raise_if_bad(op, "index", finish_status(status, 1u, stream), 0, idx, d);  // the one sync
  if (n == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = (k % V == 0) && aligned16(out.data_ptr());
    const int threads = 128;
    const int64_t groups = vec ? k / V : k;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(groups, threads), 1024)),
                    static_cast<unsigned>(std::min<int64_t>(n, kMaxGridY)));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (vec) {
      gather_columns_kernel<scalar_t, V><<<grid, threads, 0, stream>>>(
          xp, n, x.stride(0), x.stride(1), idx.const_data_ptr<int64_t>(), k,
          out.data_ptr<scalar_t>());
    } else {
      gather_columns_kernel<scalar_t, 1><<<grid, threads, 0, stream>>>(
          xp, n, x.stride(0), x.stride(1), idx.const_data_ptr<int64_t>(), k,
          out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_columns_bwd_cuda(const at::Tensor& grad, const at::Tensor& index, int64_t dim) {
  constexpr const char* op = "gather_columns_bwd";
  check_gather_args(op, grad, index);
  TORCH_CHECK_VALUE(dim >= 0, op, ": dim must be >= 0, got ", dim);
  TORCH_CHECK_VALUE(grad.size(1) == index.size(0), op, ": grad must have one column per index entry (",
              index.size(0), "), got ", grad.size(1));
  c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.device().index()).stream();
  const int64_t n = grad.size(0), k = grad.size(1);
  if (k == 0) return at::zeros({n, dim}, grad.options());
  const at::Tensor idx = index.to(at::kLong).contiguous();
  at::Tensor status = new_status(3, grad);  // [row (unused), count (unused), index]
  launch_index_scan(idx, dim, status, 2, stream);
  if (n == 0 || dim == 0) {  // nothing to scatter, but a bad index still raises (as on CPU)
    raise_if_bad(op, "index", finish_status(status, 4u, stream), 2, idx, dim);
    return at::zeros({n, dim}, grad.options());
  }
  auto [off, src] = column_csr(idx, dim, stream);
  const at::Tensor gr = grad.contiguous();
  at::Tensor dx = at::empty({n, dim}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), op, [&] {
    const int threads = 256;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(dim, threads), 1024)),
                    static_cast<unsigned>(std::min<int64_t>(n, kMaxGridY)));
    column_csr_scatter_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        gr.const_data_ptr<scalar_t>(), k, n, /*rows=*/nullptr, /*counts=*/nullptr,
        off.const_data_ptr<int64_t>(), src.const_data_ptr<int64_t>(), dx.data_ptr<scalar_t>(),
        n, dim, reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_if_bad(op, "index", finish_status(status, 4u, stream), 2, idx, dim);  // the one sync
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CUDA, m) {
  m.impl("gather_columns", &gather_columns_cuda);
  m.impl("gather_columns_bwd", &gather_columns_bwd_cuda);
}

}  // namespace semcomp
