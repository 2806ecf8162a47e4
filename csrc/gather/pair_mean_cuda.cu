// Fused pair mean + column gather + finite flags on CUDA (see pair_mean.h).
//
// One warp per row (grid-stride over rows): the lanes first scan the row's D columns of every
// modality for a non-finite value (__any_sync), then each lane owns output columns
// c = lane, lane + 32, ... and sums zs[0..M-1][i, f[c]] in modality order in the accumulation
// dtype, then divides by M: the CPU kernel's rounding, so both backends give the same bits.
// Up to kMaxModalities tensors go to one launch by value; more are summed by further launches
// that continue from the partial sums held in `out` (the order of the additions is unchanged).
// Index validation: one device scan and one host sync before the gather, as gather_columns.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "common/cuda_utils.cuh"
#include "gather/pair_mean.h"

namespace semcomp {
namespace {

using namespace semcomp::cuda;

constexpr int kMaxModalities = 8;

template <typename T>
struct Inputs {
  const T* p[kMaxModalities];
  int64_t sr[kMaxModalities];
  int64_t sc[kMaxModalities];
};

template <typename T>
__device__ __forceinline__ bool finite_value(T v) {
  return isfinite(static_cast<acc_t<T>>(v));
}

template <typename T>
__global__ void pair_mean_kernel(Inputs<T> z, int count, int64_t n, int64_t d,
                                 const int64_t* __restrict__ idx, int64_t k, acc_t<T>* __restrict__ out,
                                 bool* __restrict__ finite, bool first, bool last, acc_t<T> denom) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; i < n; i += warps) {
    bool bad = false;
    for (int m = 0; m < count; ++m) {
      const T* row = z.p[m] + i * z.sr[m];
      for (int64_t j = lane; j < d; j += 32) bad |= !finite_value(row[j * z.sc[m]]);
    }
    bad = __any_sync(0xffffffffu, bad);
    A* dst = out + i * k;
    for (int64_t c = lane; c < k; c += 32) {
      const int64_t col = idx ? idx[c] : c;
      A acc = first ? static_cast<A>(z.p[0][i * z.sr[0] + col * z.sc[0]]) : dst[c];
      for (int m = first ? 1 : 0; m < count; ++m) acc = acc + static_cast<A>(z.p[m][i * z.sr[m] + col * z.sc[m]]);
      dst[c] = last ? acc / denom : acc;
    }
    if (lane == 0) finite[i] = first ? !bad : (finite[i] && !bad);
  }
}

std::tuple<at::Tensor, at::Tensor> pair_mean_cuda(at::TensorList zs, const c10::optional<at::Tensor>& features) {
  constexpr const char* op = "pair_mean";
  check_pair_mean_args(op, zs, features);
  c10::cuda::CUDAGuard guard(zs[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(zs[0].device().index()).stream();
  const int64_t m_count = static_cast<int64_t>(zs.size());
  const int64_t n = zs[0].size(0), d = zs[0].size(1);
  at::Tensor idx;
  if (features.has_value()) {
    idx = features->to(at::kLong).contiguous();
    at::Tensor status = new_status(1, zs[0]);
    launch_index_scan(idx, d, status, 0, stream);
    raise_if_bad(op, "features", finish_status(status, 1u, stream), 0, idx, d);  // the one sync
  }
  const int64_t k = idx.defined() ? idx.numel() : d;
  const at::ScalarType acc_type = zs[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({n, k}, zs[0].options().dtype(acc_type));
  at::Tensor finite = at::empty({n}, zs[0].options().dtype(at::kBool));
  if (n == 0) return {out, finite};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zs[0].scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(n * 32, threads), 65535);
    for (int64_t m0 = 0; m0 < m_count; m0 += kMaxModalities) {
      const int count = static_cast<int>(std::min<int64_t>(kMaxModalities, m_count - m0));
      Inputs<scalar_t> in{};
      for (int j = 0; j < count; ++j) {
        in.p[j] = zs[m0 + j].const_data_ptr<scalar_t>();
        in.sr[j] = zs[m0 + j].stride(0);
        in.sc[j] = zs[m0 + j].stride(1);
      }
      pair_mean_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          in, count, n, d, idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr, k, out.data_ptr<A>(),
          finite.data_ptr<bool>(), m0 == 0, m0 + count == m_count, static_cast<A>(m_count));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, finite};
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CUDA, m) {
  m.impl("pair_mean", &pair_mean_cuda);
}

}  // namespace semcomp
