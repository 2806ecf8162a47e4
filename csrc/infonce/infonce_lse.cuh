// Log-sum-exp finishing kernels shared by the InfoNCE CUDA implementations (gemm, tile, mma).
// Partial states are (max, sum) pairs in base 2 (Lse2); every merge runs in a fixed order
// (splits, then row tiles or row blocks), so results do not depend on scheduling.
#pragma once

#include <cstdint>
#include <limits>

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

}  // namespace semcomp::infonce_lse
