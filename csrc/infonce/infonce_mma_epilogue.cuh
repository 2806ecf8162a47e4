// InfoNCE epilogues on tensor-core accumulators, shared by the "mma" kernels
// (infonce_mma_cuda.cu, mma.sync) and the "wgmma" kernels (infonce_wgmma_cuda.cu, sm_90a):
// whatever mainloop produced the dot tile, the logits, LSE states, partial merges and s*G are
// computed by this code, so the emulator's checks of kernel 1 cover kernel 2's epilogue.
//
// Geometry (template arguments): a CTA tile of BM rows x BN columns, held by SLOTS_M x SLOTS_N
// epilogue warps, each with MI x NJ m16n8 fragments (common/mma_frag.cuh gives a thread's
// coordinates). kernel 1: 128 x 128 by 4 x 2 warps of 2 x 8 fragments; a wgmma consumer: 128
// x BN by 8 x 1 warps of 1 x BN/8. Cross-warp merges go through shared scratch (kScratchFloats
// floats, the caller's) and a barrier callable `bar()` that synchronises the kThreads epilogue
// threads (__syncthreads, or a named barrier over consumer warpgroups). Merges run in slot
// order: no atomics, results are reproducible for a given launch shape.
//
// Numerics (as infonce_cuda.cu): logits x = mul_rn(dot, s) in fp32; LSE states (max, sum of
// exp2((x - m) log2 e)) in natural units; a column outside [0, nk) is -inf (it drops out of
// maxima and sums), a row outside the rows in play is left out of column states.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/mma_frag.cuh"

namespace semcomp::mma_epi {

using semcomp::cuda::exp_diff;
using semcomp::cuda::Lse2;
using semcomp::cuda::mul_rn;
using semcomp::cuda::nan_max;
using semcomp::cuda::neg_inf;
using semcomp::mma_frag::Frag;

// Forward: per tile, the logits; the positive S_i,i+offset (stored by its one holder); row
// (max, sum) states folded in registers; with SYM, the tile's column (max, sum) over the CTA's
// rows, written as the row block's partial. finish() merges the row states of the SLOTS_N
// column slots (in order) into the split's row partial.
template <int BM, int BN, int SLOTS_M, int SLOTS_N, int MI, int NJ, bool SYM>
struct InfoNCEFwd {
  static constexpr int kThreads = SLOTS_M * SLOTS_N * 32;
  // column partials [2 buffers][SLOTS_M][BN] (m, s), then row states [SLOTS_N - 1][BM] (m, s)
  static constexpr int kColFloats = SYM ? 2 * 2 * SLOTS_M * BN : 0;
  static constexpr int kScratchFloats = kColFloats + 2 * (SLOTS_N - 1) * BM;
  static_assert(BM == 16 * MI * SLOTS_M && BN == 8 * NJ * SLOTS_N, "warps must tile the CTA tile");

  Frag<MI, NJ> f;
  int64_t r0, nq, nk, offset;
  float s;
  float* scratch;
  int tid;
  float *col_pm, *col_ps;  // this row block's column partials (nk each), only when SYM
  float* diag;             // (nq)
  bool row_ok[MI][2];
  Lse2<float> row[MI][2];

  // r0: the CTA's first row; rows at or past nq are padding. tid: 0 .. kThreads - 1.
  __device__ __forceinline__ InfoNCEFwd(Frag<MI, NJ> f_, int64_t r0_, int64_t nq_, int64_t nk_,
                                        float s_, int64_t offset_, float* scratch_, int tid_,
                                        float* col_pm_, float* col_ps_, float* diag_)
      : f(f_), r0(r0_), nq(nq_), nk(nk_), offset(offset_), s(s_), scratch(scratch_), tid(tid_),
        col_pm(col_pm_), col_ps(col_ps_), diag(diag_) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_ok[mi][h] = r0 + f.row(mi, h) < nq;
        row[mi][h] = Lse2<float>::empty();
      }
  }

  // The dot tile of column tile ct (columns ct * BN ...) in acc (overwritten with the logits).
  // Every epilogue thread calls it at the same step.
  template <typename Bar>
  __device__ __forceinline__ void tile(int64_t ct, float (&acc)[MI][NJ][4], Bar&& bar) {
    const int64_t c0 = ct * BN;
    // element (nj, b) of this thread is column c0 + cw + nj * 8 + b, valid when nj * 8 + b < ncol
    const int cw = f.col(0, 0);
    const int ncol = static_cast<int>(std::min<int64_t>(nk - c0, BN)) - cw;
#pragma unroll
    for (int nj = 0; nj < NJ; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = nj * 8 + (e & 1) < ncol;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) acc[mi][nj][e] = ok ? mul_rn(acc[mi][nj][e], s) : neg_inf<float>();
      }
    // the positive logit (tile column = tile row + dd)
    const int64_t dd64 = r0 + offset - c0;
    if (dd64 > -BM && dd64 < BN) {
      const int dd = static_cast<int>(dd64);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int lr = f.row(mi, h), target = lr + dd - cw;
#pragma unroll
          for (int nj = 0; nj < NJ; ++nj)
#pragma unroll
            for (int b = 0; b < 2; ++b)
              if (row_ok[mi][h] && nj * 8 + b == target) diag[r0 + lr] = acc[mi][nj][2 * h + b];
        }
    }
    // rows: the warp's columns -> (max, sum) over the quad, folded into the running state
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = neg_inf<float>();
#pragma unroll
        for (int nj = 0; nj < NJ; ++nj)
#pragma unroll
          for (int b = 0; b < 2; ++b) m = nan_max(m, acc[mi][nj][2 * h + b]);
        m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 2));
        float e2 = 0.f;
        if (m != neg_inf<float>()) {  // no valid column here: the empty state
#pragma unroll
          for (int nj = 0; nj < NJ; ++nj)
#pragma unroll
            for (int b = 0; b < 2; ++b) e2 += exp_diff(acc[mi][nj][2 * h + b], m);
        }
        e2 += __shfl_xor_sync(0xffffffffu, e2, 1);
        e2 += __shfl_xor_sync(0xffffffffu, e2, 2);
        row[mi][h].merge(m, e2);
      }
    if constexpr (SYM) {
      // double-buffered by tile parity: a slot written at tile ct + 2 was last read at tile ct,
      // before every thread passed tile ct + 1's barrier
      float* cm = scratch + (ct & 1) * 2 * SLOTS_M * BN;
      float* cs = cm + SLOTS_M * BN;
      // columns: the warp's rows (rows past the end left out) -> (max, sum) over the 8 row groups
#pragma unroll
      for (int nj = 0; nj < NJ; ++nj)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          float m = neg_inf<float>();
#pragma unroll
          for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              if (row_ok[mi][h]) m = nan_max(m, acc[mi][nj][2 * h + b]);
          m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 4));
          m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 8));
          m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 16));
          float e2 = 0.f;
          if (m != neg_inf<float>()) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
              for (int h = 0; h < 2; ++h)
                if (row_ok[mi][h]) e2 += exp_diff(acc[mi][nj][2 * h + b], m);
          }
          e2 += __shfl_xor_sync(0xffffffffu, e2, 4);
          e2 += __shfl_xor_sync(0xffffffffu, e2, 8);
          e2 += __shfl_xor_sync(0xffffffffu, e2, 16);
          if (f.g == 0) {
            const int col = f.col(nj, b);
            cm[f.slot_m * BN + col] = m;
            cs[f.slot_m * BN + col] = e2;
          }
        }
      bar();
      for (int j = tid; j < BN; j += kThreads) {
        if (c0 + j >= nk) break;
        Lse2<float> st{cm[j], cs[j]};
#pragma unroll
        for (int w = 1; w < SLOTS_M; ++w) st.merge(cm[w * BN + j], cs[w * BN + j]);
        col_pm[c0 + j] = st.m;
        col_ps[c0 + j] = st.s;
      }
    }
  }

  // After the last tile: the split's row partials row_pm/row_ps[r0 + row] (the caller offsets
  // them by split * nq).
  template <typename Bar>
  __device__ __forceinline__ void finish(float* row_pm, float* row_ps, Bar&& bar) {
    if constexpr (SLOTS_N > 1) {
      float* hm = scratch + kColFloats;
      float* hs = hm + (SLOTS_N - 1) * BM;
      if (f.slot_n > 0 && f.t == 0) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int at = (f.slot_n - 1) * BM + f.row(mi, h);
            hm[at] = row[mi][h].m;
            hs[at] = row[mi][h].s;
          }
      }
      bar();
      if (f.slot_n == 0 && f.t == 0) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int rr = f.row(mi, h);
            if (row_ok[mi][h]) {
              Lse2<float> st = row[mi][h];
#pragma unroll
              for (int w = 1; w < SLOTS_N; ++w) st.merge(hm[(w - 1) * BM + rr], hs[(w - 1) * BM + rr]);
              row_pm[r0 + rr] = st.m;
              row_ps[r0 + rr] = st.s;
            }
          }
      }
    } else {
      if (f.t == 0) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            if (row_ok[mi][h]) {
              row_pm[r0 + f.row(mi, h)] = row[mi][h].m;
              row_ps[r0 + f.row(mi, h)] = row[mi][h].s;
            }
      }
    }
  }
};

// Backward: G_ij = rc_i e^(x - r_i) [+ cc_j e^(x - c_j)] - dc_i [j = i + offset] from the
// recomputed logits; s*G (times gscale) stored from registers in the input dtype T (c10::BFloat16
// or c10::Half; 2 columns per 4-byte store when pair_store), and per row sum_j G_ij dot_ij.
// finish() merges the SLOTS_N column slots' row shares (in order) into the split's.
template <typename T, int BM, int BN, int SLOTS_M, int SLOTS_N, int MI, int NJ, bool SYM>
struct InfoNCEGrad {
  static constexpr int kThreads = SLOTS_M * SLOTS_N * 32;
  static constexpr int kScratchFloats = (SLOTS_N - 1) * BM;
  static_assert(BM == 16 * MI * SLOTS_M && BN == 8 * NJ * SLOTS_N, "warps must tile the CTA tile");

  Frag<MI, NJ> f;
  int64_t r0, i0, nk, offset;
  float s, sg;
  const float *clse, *ccoef;
  uint16_t* gbuf;  // row i - i0, column j at gbuf[(i - i0) * ld_g + j]
  int64_t ld_g;
  bool pair_store;
  float* scratch;
  bool row_ok[MI][2];
  float rl[MI][2], rc[MI][2], dc[MI][2], ds[MI][2];

  // Rows [i0, rows_end) are this pass's; r0: the CTA's first row. s: the logit scale (NaN when
  // it is not usable), sg: s times the fp16 pre-scale (s otherwise).
  __device__ __forceinline__ InfoNCEGrad(Frag<MI, NJ> f_, int64_t r0_, int64_t i0_, int64_t rows_end,
                                         int64_t nk_, int64_t offset_, float s_, float sg_,
                                         const float* rlse, const float* rcoef, const float* dcoef,
                                         const float* clse_, const float* ccoef_, uint16_t* gbuf_,
                                         int64_t ld_g_, bool pair_store_, float* scratch_)
      : f(f_), r0(r0_), i0(i0_), nk(nk_), offset(offset_), s(s_), sg(sg_), clse(clse_),
        ccoef(ccoef_), gbuf(gbuf_), ld_g(ld_g_), pair_store(pair_store_), scratch(scratch_) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = r0 + f.row(mi, h);
        row_ok[mi][h] = i < rows_end;
        rl[mi][h] = row_ok[mi][h] ? rlse[i] : 0.f;
        rc[mi][h] = row_ok[mi][h] ? rcoef[i] : 0.f;
        dc[mi][h] = row_ok[mi][h] ? dcoef[i] : 0.f;
        ds[mi][h] = 0.f;
      }
  }

  __device__ __forceinline__ void tile(int64_t ct, float (&acc)[MI][NJ][4]) {
    const int64_t c0 = ct * BN;
    const int cw = f.col(0, 0);  // (nj, b) is column c0 + cw + nj * 8 + b
    const int ncol = static_cast<int>(std::min<int64_t>(nk - c0, BN)) - cw;
    const int64_t dd64 = r0 + offset - c0;  // diagonal: tile column = tile row + dd
    const bool diag_here = dd64 > -BM && dd64 < BN;
    const int dd = diag_here ? static_cast<int>(dd64) : 0;
    float cl[NJ][2], cc[NJ][2];
    if constexpr (SYM) {
#pragma unroll
      for (int nj = 0; nj < NJ; ++nj)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const bool ok = nj * 8 + b < ncol;
          cl[nj][b] = ok ? clse[c0 + cw + nj * 8 + b] : 0.f;
          cc[nj][b] = ok ? ccoef[c0 + cw + nj * 8 + b] : 0.f;
        }
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!row_ok[mi][h]) continue;
        const int lr = f.row(mi, h), target = diag_here ? lr + dd - cw : -1;
        uint16_t* grow = gbuf + (r0 - i0 + lr) * ld_g + c0 + cw;
#pragma unroll
        for (int nj = 0; nj < NJ; ++nj) {
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
  }

  // After the last tile: the split's row shares, ds_part[(r0 - i0) + row] (the caller offsets
  // it by split * ld_ds).
  template <typename Bar>
  __device__ __forceinline__ void finish(float* ds_part, Bar&& bar) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // quad sums
        ds[mi][h] += __shfl_xor_sync(0xffffffffu, ds[mi][h], 1);
        ds[mi][h] += __shfl_xor_sync(0xffffffffu, ds[mi][h], 2);
      }
    if constexpr (SLOTS_N > 1) {
      if (f.slot_n > 0 && f.t == 0) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) scratch[(f.slot_n - 1) * BM + f.row(mi, h)] = ds[mi][h];
      }
      bar();
    }
    if (f.slot_n == 0 && f.t == 0) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int rr = f.row(mi, h);
          if (!row_ok[mi][h]) continue;
          float v = ds[mi][h];
#pragma unroll
          for (int w = 1; w < SLOTS_N; ++w) v += scratch[(w - 1) * BM + rr];
          ds_part[(r0 - i0) + rr] = v;
        }
    }
  }
};

}  // namespace semcomp::mma_epi
