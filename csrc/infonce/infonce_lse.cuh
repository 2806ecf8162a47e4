// Log-sum-exp finishing kernels shared by the InfoNCE CUDA implementations (gemm, tile, mma).
// Partial states are (max, sum) pairs in base 2 (Lse2); every merge runs in a fixed order
// (splits, then row tiles or row blocks), so results do not depend on scheduling.
#pragma once

#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cuda_utils.cuh"

namespace semcomp::infonce_lse {

using semcomp::cuda::Lse2;

// A usable logit scale: false for NaN, inf and s <= 0 (the outputs are then poisoned).
template <typename A>
__device__ __forceinline__ bool scale_ok(A s) {
  return s > A(0) && s <= std::numeric_limits<A>::max();
}

// One thread per row: the row's split partials merged in split order; r_i (poisoned by a bad
// scale) and, for the rect form, loss_i = r_i - S_i,i+offset.
template <bool SYM>
__global__ void row_finish_kernel(const float* __restrict__ pm, const float* __restrict__ ps,
                                  int64_t splits, int64_t n, const float* __restrict__ diag,
                                  const float* __restrict__ scale, float* __restrict__ rlse,
                                  float* __restrict__ loss) {
  const bool ok = scale_ok(scale[0]);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    Lse2<float> st{pm[i], ps[i]};
    for (int64_t sp = 1; sp < splits; ++sp) st.merge(pm[sp * n + i], ps[sp * n + i]);
    const float r = ok ? st.lse_natural() : std::numeric_limits<float>::quiet_NaN();
    rlse[i] = r;
    if constexpr (!SYM) loss[i] = r - diag[i];
  }
}

// One thread per column: n_parts column partials (rows of pm/ps, nk wide) folded, in order,
// into the running column states (cm, cs) kept across chunks or passes.
template <typename A>
__global__ void col_merge_kernel(const A* __restrict__ pm, const A* __restrict__ ps,
                                 int64_t n_parts, int64_t nk, A* __restrict__ cm,
                                 A* __restrict__ cs) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < nk;
       j += int64_t(gridDim.x) * blockDim.x) {
    Lse2<A> st{cm[j], cs[j]};
    for (int64_t t = 0; t < n_parts; ++t) st.merge(pm[t * nk + j], ps[t * nk + j]);
    cm[j] = st.m;
    cs[j] = st.s;
  }
}

// Column LSEs c_j (poisoned by a bad scale) and the symmetric loss_i = (r_i + c_i)/2 - S_ii.
template <typename A>
__global__ void sym_finish_kernel(const A* __restrict__ cm, const A* __restrict__ cs,
                                  const A* __restrict__ rlse, const A* __restrict__ diag,
                                  const A* __restrict__ scale, int64_t n, A* __restrict__ clse,
                                  A* __restrict__ loss) {
  const bool ok = scale_ok(scale[0]);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const A cl = ok ? Lse2<A>{cm[i], cs[i]}.lse_natural() : std::numeric_limits<A>::quiet_NaN();
    clse[i] = cl;
    loss[i] = A(0.5) * (rlse[i] + cl) - diag[i];
  }
}

// ---- host side ---------------------------------------------------------------------------

constexpr int kFinishThreads = 256;

inline unsigned finish_grid(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>(semcomp::cuda::ceil_div(n, kFinishThreads), 1, 65536));
}

// {loss, rlse} of the rect form, or {loss, rlse, clse} of the symmetric one: the column LSEs
// from the running column states (cm, cs) and loss_i = (r_i + c_i)/2 - S_ii (loss rewritten).
template <typename A, bool SYM>
std::vector<at::Tensor> finish_fwd(const at::Tensor& cm, const at::Tensor& cs, const at::Tensor& rlse,
                                   const at::Tensor& diag, at::Tensor& loss, const A* sp,
                                   cudaStream_t stream) {
  if constexpr (SYM) {
    const int64_t nq = rlse.size(0);
    at::Tensor clse = at::empty({cm.size(0)}, rlse.options());
    sym_finish_kernel<A><<<finish_grid(nq), kFinishThreads, 0, stream>>>(
        cm.const_data_ptr<A>(), cs.const_data_ptr<A>(), rlse.const_data_ptr<A>(),
        diag.const_data_ptr<A>(), sp, nq, clse.data_ptr<A>(), loss.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {loss, rlse, clse};
  }
  return {loss, rlse};
}

// The fp32 partial states of a tiled forward (tile and mma paths): row (max, sum) per column
// split (splits, nq); symmetric form: column (max, sum) of up to `parts` row tiles of a chunk
// (parts, nk), folded after each chunk into the running column states (cm, cs); S's diagonal.
struct FwdPartials {
  at::Tensor rpm, rps, diag, cpm, cps, cm, cs;

  FwdPartials(int64_t splits, int64_t nq, int64_t parts, int64_t nk, bool sym, const at::TensorOptions& opts)
      : rpm(at::empty({splits, nq}, opts)), rps(at::empty({splits, nq}, opts)), diag(at::empty({nq}, opts)) {
    if (sym) {
      cpm = at::empty({parts, nk}, opts);
      cps = at::empty({parts, nk}, opts);
      cm = at::full({nk}, -std::numeric_limits<double>::infinity(), opts);
      cs = at::zeros({nk}, opts);
    }
  }

  // Folds the chunk's first n_parts column partials, in order, into (cm, cs).
  void merge_columns(int64_t n_parts, cudaStream_t stream) {
    const int64_t nk = cm.size(0);
    col_merge_kernel<float><<<finish_grid(nk), kFinishThreads, 0, stream>>>(
        cpm.const_data_ptr<float>(), cps.const_data_ptr<float>(), n_parts, nk, cm.data_ptr<float>(),
        cs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // The row LSEs from the split partials, then finish_fwd: {loss, rlse[, clse]}.
  template <bool SYM>
  std::vector<at::Tensor> finish(const float* sp, cudaStream_t stream) {
    const int64_t nq = diag.size(0);
    at::Tensor rlse = at::empty({nq}, diag.options()), loss = at::empty({nq}, diag.options());
    row_finish_kernel<SYM><<<finish_grid(nq), kFinishThreads, 0, stream>>>(
        rpm.const_data_ptr<float>(), rps.const_data_ptr<float>(), rpm.size(0), nq,
        diag.const_data_ptr<float>(), sp, rlse.data_ptr<float>(), loss.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return finish_fwd<float, SYM>(cm, cs, rlse, diag, loss, sp, stream);
  }
};

}  // namespace semcomp::infonce_lse
