// InfoNCE "mma" kernels (see infonce_mma.h): FlashAttention-2 style logit passes on the
// common/ptx.cuh wrappers (cp.async, ldmatrix, mma.sync.m16n8k16; sm_80 and newer).
//
// Tiling, shared layout and the mainloop: common/mma_mainloop.cuh (shared with SigLIP).
//
// Numerics (as infonce_cuda.cu): logits x = mul_rn(dot, s) in fp32; LSE states (max, sum of
// exp2((x - m) log2 e)) in natural units. The dot of element (i, j) is accumulated by the
// same mma sequence over the same D steps in the forward and the backward kernel, so the
// backward sees the forward's S bit for bit (N = 1: loss and gradients exactly 0).
//
// Forward epilogue (per column tile, in registers): per row, the warp's 64 columns reduce by
// quad shuffles to (max, sum) and fold into a running state per (row, column half); per
// column, the warp's 32 rows reduce by shuffles over the 8 row groups, the 4 row warps merge
// through shared memory in warp order and one thread per column writes the row block's
// partial. After the last tile the two column halves merge through shared memory (fixed
// order) into the split's row partial. Splits, row blocks and passes merge in index order in
// small kernels below: no atomics, results are reproducible for a given launch shape.
//
// Backward epilogue: G_ij = rc_i e^(x - r_i) [+ cc_j e^(x - c_j)] - dc_i [j = i + offset],
// s*G (times gscale) stored from registers in the input dtype (2 columns per 4-byte store),
// row shares of sum_j G_ij dot_ij per split. The host multiplies the s*G block by k and q on
// cuBLAS. (The alternative, dq accumulated in registers against k tiles and dk in a second
// pass over transposed tiles, avoids the s*G round trip through memory; it needs the ldmatrix
// .trans staging of k and q and is left for the GPU measurements to justify.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "common/cuda_utils.cuh"  // also SEMCOMP_MM_OUT_DTYPE
#include "common/mma_mainloop.cuh"
#include "infonce/infonce.h"
#include "infonce/infonce_lse.cuh"
#include "infonce/infonce_mma.h"

namespace semcomp::mma {
namespace {

using semcomp::cuda::ceil_div;
using semcomp::cuda::exp_diff;
using semcomp::cuda::Lse2;
using semcomp::cuda::mul_rn;
using semcomp::cuda::nan_max;
using semcomp::cuda::neg_inf;
using semcomp::infonce_lse::FwdPartials;
using semcomp::infonce_lse::scale_ok;
using namespace semcomp::mma_loop;
// stages, then fp32 scratch: column partials [kWarpsM][kBN] (m, s), row halves [kBM] (m, s)
constexpr int kSmemBytes = kStageBytes + (2 * kWarpsM * kBN + 2 * kBM) * 4;

// grid (row blocks of this pass, splits); rb0: first row block of the pass. row_pm/row_ps:
// (splits, nq); col_pm/col_ps: (row blocks of a pass, nk), only when SYM; diag: (nq).
template <bool BF16, bool SYM, bool VEC>
__global__ void __launch_bounds__(kThreads)
mma_fwd_kernel(const uint16_t* __restrict__ q, int64_t nq, const uint16_t* __restrict__ k,
               int64_t nk, int64_t d, const float* __restrict__ scale, int64_t offset, int64_t rb0,
               float* __restrict__ row_pm, float* __restrict__ row_ps, float* __restrict__ col_pm,
               float* __restrict__ col_ps, float* __restrict__ diag) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* stages = reinterpret_cast<uint16_t*>(smem_raw);
  float* cm = reinterpret_cast<float*>(smem_raw + kStages * kStageElems * 2);
  float* cs = cm + kWarpsM * kBN;
  float* hm = cs + kWarpsM * kBN;
  float* hs = hm + kBM;
  const int64_t rbl = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = (rb0 + rbl) * kBM;
  int64_t t0, t1;
  split_range(ceil_div(nk, kBN), split, splits, t0, t1);
  const float s = scale[0];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM, g = lane >> 2, tq = lane & 3;
  bool row_ok[kMI][2];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_ok[mi][h] = r0 + wm * kWM + mi * 16 + g + 8 * h < nq;
  Lse2<float> row[kMI][2];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) row[mi][0] = row[mi][1] = Lse2<float>::empty();

  auto epi = [&](int64_t ct, float (&acc)[kMI][kNJ][4]) {
    const int64_t c0 = ct * kBN;
    // element (nj, b) of this thread is column c0 + cw + nj * 8 + b, valid when nj * 8 + b < ncol
    const int cw = wn * kWN + 2 * tq;
    const int ncol = static_cast<int>(std::min<int64_t>(nk - c0, kBN)) - cw;
    // logits; -inf past nk (they drop out of maxima and sums)
#pragma unroll
    for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = nj * 8 + (e & 1) < ncol;
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) acc[mi][nj][e] = ok ? mul_rn(acc[mi][nj][e], s) : neg_inf<float>();
      }
    // the positive logit S_i,i+offset (tile column = tile row + dd), stored by its one holder
    const int64_t dd64 = r0 + offset - c0;
    if (dd64 > -kBM && dd64 < kBN) {
      const int dd = static_cast<int>(dd64);
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int lr = wm * kWM + mi * 16 + g + 8 * h, target = lr + dd - cw;
#pragma unroll
          for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
            for (int b = 0; b < 2; ++b)
              if (row_ok[mi][h] && nj * 8 + b == target) diag[r0 + lr] = acc[mi][nj][2 * h + b];
        }
    }
    // rows: the warp's 64 columns -> (max, sum) over the quad, folded into the running state
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = neg_inf<float>();
#pragma unroll
        for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
          for (int b = 0; b < 2; ++b) m = nan_max(m, acc[mi][nj][2 * h + b]);
        m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 2));
        float e2 = 0.f;
        if (m != neg_inf<float>()) {  // no valid column in this half: the empty state
#pragma unroll
          for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
            for (int b = 0; b < 2; ++b) e2 += exp_diff(acc[mi][nj][2 * h + b], m);
        }
        e2 += __shfl_xor_sync(0xffffffffu, e2, 1);
        e2 += __shfl_xor_sync(0xffffffffu, e2, 2);
        row[mi][h].merge(m, e2);
      }
    if constexpr (SYM) {
      // columns: the warp's 32 rows (rows past nq left out) -> (max, sum) over the 8 row groups
#pragma unroll
      for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          float m = neg_inf<float>();
#pragma unroll
          for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              if (row_ok[mi][h]) m = nan_max(m, acc[mi][nj][2 * h + b]);
          m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 4));
          m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 8));
          m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 16));
          float e2 = 0.f;
          if (m != neg_inf<float>()) {
#pragma unroll
            for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
              for (int h = 0; h < 2; ++h)
                if (row_ok[mi][h]) e2 += exp_diff(acc[mi][nj][2 * h + b], m);
          }
          e2 += __shfl_xor_sync(0xffffffffu, e2, 4);
          e2 += __shfl_xor_sync(0xffffffffu, e2, 8);
          e2 += __shfl_xor_sync(0xffffffffu, e2, 16);
          if (g == 0) {
            const int col = wn * kWN + nj * 8 + 2 * tq + b;
            cm[wm * kBN + col] = m;
            cs[wm * kBN + col] = e2;
          }
        }
      __syncthreads();
      // (cm, cs) are written again only after the next mainloop barrier
      const int t = threadIdx.x;
      if (t < kBN && c0 + t < nk) {
        Lse2<float> st{cm[t], cs[t]};
#pragma unroll
        for (int w = 1; w < kWarpsM; ++w) st.merge(cm[w * kBN + t], cs[w * kBN + t]);
        col_pm[rbl * nk + c0 + t] = st.m;
        col_ps[rbl * nk + c0 + t] = st.s;
      }
    }
  };
  tile_loop<BF16, VEC>(q, nq, k, nk, d, r0, t0, t1, stages, epi);

  // the two column halves of each row, merged in order (half 0, then half 1)
  if (wn == 1 && tq == 0) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = wm * kWM + mi * 16 + g + 8 * h;
        hm[rr] = row[mi][h].m;
        hs[rr] = row[mi][h].s;
      }
  }
  __syncthreads();
  if (wn == 0 && tq == 0) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = wm * kWM + mi * 16 + g + 8 * h;
        if (row_ok[mi][h]) {
          Lse2<float> st = row[mi][h];
          st.merge(hm[rr], hs[rr]);
          row_pm[split * nq + r0 + rr] = st.m;
          row_ps[split * nq + r0 + rr] = st.s;
        }
      }
  }
}

// grid (row blocks of rows [i0, i0 + c), splits). gbuf: row i - i0, column j at
// gbuf[(i - i0) * ld_g + j] (input dtype bits); ds_part: (splits, ld_ds) row shares.
template <typename T, bool BF16, bool SYM, bool VEC>
__global__ void __launch_bounds__(kThreads)
mma_grad_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, int64_t nk,
                int64_t d, const float* __restrict__ scale, int64_t i0, int64_t c, int64_t offset,
                const float* __restrict__ rlse, const float* __restrict__ rcoef,
                const float* __restrict__ dcoef, const float* __restrict__ clse,
                const float* __restrict__ ccoef, const float* __restrict__ gscale,
                uint16_t* __restrict__ gbuf, int64_t ld_g, bool pair_store,
                float* __restrict__ ds_part, int64_t ld_ds) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* stages = reinterpret_cast<uint16_t*>(smem_raw);
  float* hs = reinterpret_cast<float*>(smem_raw + kStages * kStageElems * 2) + 2 * kWarpsM * kBN;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = i0 + int64_t(blockIdx.x) * kBM, rows_end = i0 + c;
  int64_t t0, t1;
  split_range(ceil_div(nk, kBN), split, splits, t0, t1);
  const float s = scale_ok(scale[0]) ? scale[0] : std::numeric_limits<float>::quiet_NaN();
  const float sg = gscale ? s * gscale[0] : s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM, g = lane >> 2, tq = lane & 3;
  bool row_ok[kMI][2];
  float rl[kMI][2], rc[kMI][2], dc[kMI][2], ds[kMI][2];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = r0 + wm * kWM + mi * 16 + g + 8 * h;
      row_ok[mi][h] = i < rows_end;
      rl[mi][h] = row_ok[mi][h] ? rlse[i] : 0.f;
      rc[mi][h] = row_ok[mi][h] ? rcoef[i] : 0.f;
      dc[mi][h] = row_ok[mi][h] ? dcoef[i] : 0.f;
      ds[mi][h] = 0.f;
    }

  auto epi = [&](int64_t ct, float (&acc)[kMI][kNJ][4]) {
    const int64_t c0 = ct * kBN;
    const int cw = wn * kWN + 2 * tq;  // (nj, b) is column c0 + cw + nj * 8 + b
    const int ncol = static_cast<int>(std::min<int64_t>(nk - c0, kBN)) - cw;
    const int64_t dd64 = r0 + offset - c0;  // diagonal: tile column = tile row + dd
    const bool diag_here = dd64 > -kBM && dd64 < kBN;
    const int dd = diag_here ? static_cast<int>(dd64) : 0;
    float cl[kNJ][2], cc[kNJ][2];
    if constexpr (SYM) {
#pragma unroll
      for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const bool ok = nj * 8 + b < ncol;
          cl[nj][b] = ok ? clse[c0 + cw + nj * 8 + b] : 0.f;
          cc[nj][b] = ok ? ccoef[c0 + cw + nj * 8 + b] : 0.f;
        }
    }
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!row_ok[mi][h]) continue;
        const int lr = wm * kWM + mi * 16 + g + 8 * h, target = diag_here ? lr + dd - cw : -1;
        uint16_t* grow = gbuf + (r0 - i0 + lr) * ld_g + c0 + cw;
#pragma unroll
        for (int nj = 0; nj < kNJ; ++nj) {
          uint16_t out[2];
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            float gv = 0.f;
            if (nj * 8 + b < ncol) {
              const float w = acc[mi][nj][2 * h + b];
              const float x = mul_rn(w, s);
              gv = rc[mi][h] * exp_diff(x, rl[mi][h]);
              if constexpr (SYM) gv += cc[nj][b] * exp_diff(x, cl[nj][b]);
              if (nj * 8 + b == target) gv -= dc[mi][h];
              ds[mi][h] += gv * w;
            }
            out[b] = T(sg * gv).x;
          }
          if (pair_store && nj * 8 + 1 < ncol) {
            *reinterpret_cast<uint32_t*>(grow + nj * 8) = uint32_t(out[0]) | (uint32_t(out[1]) << 16);
          } else {
            if (nj * 8 < ncol) grow[nj * 8] = out[0];
            if (nj * 8 + 1 < ncol) grow[nj * 8 + 1] = out[1];
          }
        }
      }
  };
  tile_loop<BF16, VEC>(q, rows_end, k, nk, d, r0, t0, t1, stages, epi);

  // row shares: quad sums, then column half 0 + half 1
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ds[mi][h] += __shfl_xor_sync(0xffffffffu, ds[mi][h], 1);
      ds[mi][h] += __shfl_xor_sync(0xffffffffu, ds[mi][h], 2);
    }
  if (wn == 1 && tq == 0) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) hs[wm * kWM + mi * 16 + g + 8 * h] = ds[mi][h];
  }
  __syncthreads();
  if (wn == 0 && tq == 0) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = wm * kWM + mi * 16 + g + 8 * h;
        if (row_ok[mi][h]) ds_part[split * ld_ds + (r0 - i0) + rr] = ds[mi][h] + hs[rr];
      }
  }
}

// ---- host ----------------------------------------------------------------------------------

template <bool SYM>
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const float* sp, int64_t offset,
                int64_t rb0, int64_t n_blocks, int64_t splits, at::Tensor& rpm, at::Tensor& rps,
                at::Tensor& cpm, at::Tensor& cps, at::Tensor& diag, cudaStream_t stream) {
  const int64_t nq = q.size(0), nk = k.size(0), d = q.size(1);
  const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>(splits));
  const auto* qp = static_cast<const uint16_t*>(q.const_data_ptr());
  const auto* kp = static_cast<const uint16_t*>(k.const_data_ptr());
  float* cpm_p = SYM ? cpm.data_ptr<float>() : nullptr;
  float* cps_p = SYM ? cps.data_ptr<float>() : nullptr;
  dispatch(q, vec_ok(q, k), [&](auto bf16, auto vec) {
    constexpr bool B = decltype(bf16)::value, V = decltype(vec)::value;
    allow_smem(&mma_fwd_kernel<B, SYM, V>, kSmemBytes);
    mma_fwd_kernel<B, SYM, V><<<grid, kThreads, kSmemBytes, stream>>>(
        qp, nq, kp, nk, d, sp, offset, rb0, rpm.data_ptr<float>(), rps.data_ptr<float>(), cpm_p,
        cps_p, diag.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <bool SYM>
std::vector<at::Tensor> fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s,
                                 int64_t offset, int64_t chunk) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t nq = q.size(0), nk = k.size(0);
  const auto opts = q.options().dtype(at::kFloat);
  const int64_t n_rb = ceil_div(nq, kBM), n_ct = ceil_div(nk, kBN);
  // column partials of a pass: 2 fp32 per (row block, column)
  const int64_t pass = SYM ? pick_blocks(chunk, n_rb, 8 * nk) : n_rb;
  TORCH_CHECK_VALUE(pass <= std::numeric_limits<int>::max(), "infonce: too many rows (", nq, ")");
  const int64_t splits = pick_splits(pass, n_ct, semcomp::cuda::multiprocessor_count(q.device().index()));
  FwdPartials p(splits, nq, pass, nk, SYM, opts);
  const float* sp = s.const_data_ptr<float>();
  for (int64_t rb0 = 0; rb0 < n_rb; rb0 += pass) {
    const int64_t nb = std::min(pass, n_rb - rb0);
    launch_fwd<SYM>(q, k, sp, offset, rb0, nb, splits, p.rpm, p.rps, p.cpm, p.cps, p.diag, stream);
    if constexpr (SYM) p.merge_columns(nb, stream);
  }
  return p.template finish<SYM>(sp, stream);
}

#if SEMCOMP_MM_OUT_DTYPE
template <bool SYM>
std::vector<at::Tensor> bwd_impl(const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& logit_scale, const at::Tensor& s,
                                 const at::Tensor& rlse, const at::Tensor& rcoef,
                                 const at::Tensor& dcoef, const at::Tensor& clse,
                                 const at::Tensor& ccoef, int64_t offset, int64_t chunk) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t nq = q.size(0), nk = k.size(0), d = q.size(1);
  const auto opts = q.options().dtype(at::kFloat);
  const int64_t n_rb = ceil_div(nq, kBM), n_ct = ceil_div(nk, kBN);
  const int64_t C = chunk > 0 ? std::min(chunk, nq)
                              : std::min(nq, pick_blocks(0, n_rb, kBM * nk * q.element_size()) * kBM);
  const int64_t splits =
      pick_splits(ceil_div(C, kBM), n_ct, semcomp::cuda::multiprocessor_count(q.device().index()));
  // fp16 s*G blocks are stored times an exact power of two p (pow2_prescale, as the gemm
  // path: bound = s * (max|rc| + max|cc| + max|dc|)); dq is then computed in fp32 and both
  // gradients are multiplied by 1/p.
  const bool prescale = q.scalar_type() == at::kHalf;
  at::Tensor gscale;
  if (prescale) {
    at::Tensor m = rcoef.abs().amax().add(dcoef.abs().amax());
    if constexpr (SYM) m = m.add(ccoef.abs().amax());
    gscale = semcomp::cuda::pow2_prescale(m.mul(s.reshape({})));
  }
  at::Tensor gbuf = at::empty({C, nk}, q.options());
  at::Tensor ds_part = at::empty({splits, C}, opts);
  at::Tensor gq = at::empty({nq, d}, prescale ? opts : q.options());
  at::Tensor gk = at::zeros({nk, d}, opts);
  at::Tensor ds_rows = at::empty({nq}, opts);
  at::Tensor scratch;
  const float* sp = s.const_data_ptr<float>();
  const float* gsp = prescale ? gscale.const_data_ptr<float>() : nullptr;
  const float* clp = SYM ? clse.const_data_ptr<float>() : nullptr;
  const float* ccp = SYM ? ccoef.const_data_ptr<float>() : nullptr;
  const bool vec = vec_ok(q, k);
  const bool pair_store = nk % 2 == 0;  // 4-byte stores of column pairs (gbuf from empty: aligned)
  const auto* qp = static_cast<const uint16_t*>(q.const_data_ptr());
  const auto* kp = static_cast<const uint16_t*>(k.const_data_ptr());
  auto* gp = static_cast<uint16_t*>(gbuf.data_ptr());
  for (int64_t i0 = 0; i0 < nq; i0 += C) {
    const int64_t c = std::min(C, nq - i0);
    const dim3 grid(static_cast<unsigned>(ceil_div(c, kBM)), static_cast<unsigned>(splits));
    dispatch(q, vec, [&](auto bf16, auto vtag) {
      constexpr bool B = decltype(bf16)::value, V = decltype(vtag)::value;
      using T = std::conditional_t<B, c10::BFloat16, c10::Half>;
      allow_smem(&mma_grad_kernel<T, B, SYM, V>, kSmemBytes);
      mma_grad_kernel<T, B, SYM, V><<<grid, kThreads, kSmemBytes, stream>>>(
          qp, kp, nk, d, sp, i0, c, offset, rlse.const_data_ptr<float>(),
          rcoef.const_data_ptr<float>(), dcoef.const_data_ptr<float>(), clp, ccp, gsp, gp, nk,
          pair_store, ds_part.data_ptr<float>(), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    ds_rows.narrow(0, i0, c).copy_(at::sum(ds_part.narrow(1, 0, c), 0));
    const at::Tensor gblk = gbuf.narrow(0, 0, c), qc = q.narrow(0, i0, c);
    at::Tensor gq_blk = gq.narrow(0, i0, c);
    if (prescale) at::mm_out(gq_blk, gblk, k, at::kFloat);  // p * dq_c in fp32
    else at::mm_out(gq_blk, gblk, k);                       // dq_c, one rounding to the dtype
    semcomp::cuda::addmm_fp32_accumulate(gk, gblk.t(), qc, scratch,  // dk += (sG)^T q_c, fp32
                                         infonce_dk_accumulate_mode());
  }
  at::Tensor gs = at::sum(ds_rows).reshape(logit_scale.sizes()).to(logit_scale.scalar_type());
  if (prescale) {
    const at::Tensor inv = gscale.reciprocal();  // exact: p is a power of two
    gq.mul_(inv);
    gk.mul_(inv);
  }
  return {gq.to(q.scalar_type()), gk.to(k.scalar_type()), gs};
}
#endif

}  // namespace

bool available(const at::Tensor& q) {
  if (!SEMCOMP_MM_OUT_DTYPE) return false;
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) return false;
  if (q.size(1) == 0) return false;  // every logit 0: the gemm path (no D step to run here)
#if defined(EMU_HAVE_TORCH)  // the host emulator (shared/tools/cuda-emu) runs the sm_80 code
#if defined(EMU_CUDA_ARCH)
  return true;
#else
  return false;
#endif
#else
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  return major >= 8;
#endif
}

std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s,
                            int64_t offset, bool sym, int64_t chunk) {
  return sym ? fwd_impl<true>(q, k, s, offset, chunk) : fwd_impl<false>(q, k, s, offset, chunk);
}

std::vector<at::Tensor> bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& logit_scale,
                            const at::Tensor& s, const at::Tensor& rlse, const at::Tensor& rcoef,
                            const at::Tensor& dcoef, const at::Tensor& clse,
                            const at::Tensor& ccoef, int64_t offset, bool sym, int64_t chunk) {
#if SEMCOMP_MM_OUT_DTYPE
  return sym ? bwd_impl<true>(q, k, logit_scale, s, rlse, rcoef, dcoef, clse, ccoef, offset, chunk)
             : bwd_impl<false>(q, k, logit_scale, s, rlse, rcoef, dcoef, clse, ccoef, offset, chunk);
#else
  TORCH_CHECK(false, "infonce mma: needs torch >= 2.8 (mm.dtype_out)");
  return {};
#endif
}

}  // namespace semcomp::mma
