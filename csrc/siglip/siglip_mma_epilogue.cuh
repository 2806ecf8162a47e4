// The SigLIP sigmoid epilogue on tensor-core accumulators (math in siglip/siglip.h), shared by
// the mma.sync kernel (siglip_mma_cuda.cu, on common/mma_mainloop.cuh) and any kernel whose
// accumulators sit in the m16n8 layout of common/mma_frag.cuh (a Hopper wgmma consumer: MI = 1,
// NJ = BN / 8, 8 consumer warps as SLOTS_M = 8 x SLOTS_N = 1).
//
// Per accumulator element (dot w of row i, column j; columns past nb and rows past rows_end
// are left out):
//   z = mul_rn(s, w) + t (as siglip_cuda.cu's rows_kernel: the product rounded, never fused)
//   e = exp(-|z|); the positive pair (j == i, unless negative_only) uses yz = -z, else yz = z
//   loss_i += max(yz, 0) + log1p(e)                       (softplus(yz))
//   G_ij = g_i (sigmoid(z) - [positive]) = (positive ? -g_i : g_i) sigmoid(yz), computed as
//          rows_kernel does: r = 1 / (1 + e), sigmoid(yz) = (yz >= 0 ? r : e r)
//   ds_i += G w, dt_i += G, and s*G (times the fp16 power-of-two pre-scale) is stored in the
//   input dtype at gbuf[(i - i0) * ld_g + j] (two columns per 4-byte store when pair_store).
// A non-finite scale or bias makes both NaN (the caller passes them so): every output is NaN,
// as on the gemm path.
//
// Reductions, all in a fixed order (no atomics, no timing dependence): each thread sums its
// columns tile after tile; finish() adds the 4 threads of a quad (xor 1, then xor 2), the
// SLOTS_N column warps of a row in slot order through shared scratch, and writes the CTA's
// row share part[(p * splits + split) * ld_part + (i - i0)], p over the enabled partials
// (loss, then ds and dt). The host sums the splits in order.
//
// Use: one Epilogue object per thread; begin() once, tile() for every column tile (after the
// mainloop has accumulated it), finish() once, by all epilogue threads (it uses `bar`, a
// callable that synchronises exactly the epilogue threads, and shuffles with full masks).
#pragma once

#include <cstdint>
#include <limits>

#include "common/cuda_utils.cuh"  // mul_rn
#include "common/mma_frag.cuh"

namespace semcomp::siglip_epi {

// What the kernel passes to the epilogue (device pointers; one per launch).
struct Params {
  float s, t;                    // scale and bias, both NaN when either is non-finite
  float sg;                      // the stored factor: s, times the fp16 pre-scale
  const float* grad_rows;        // (Na,) upstream gradients g_i, or nullptr for ones
  bool positive;                 // the diagonal j == i holds the positives
  int64_t nb;                    // columns (rows of b)
  int64_t i0, rows_end;          // rows [i0, rows_end) of a: this launch's chunk
  uint16_t* gbuf;                // with GRAD: s*G, row i at gbuf + (i - i0) * ld_g
  int64_t ld_g;
  bool pair_store;               // gbuf rows 4-byte aligned at even columns (ld_g even)
  float* part;                   // row shares, (parts, splits, ld_part)
  int64_t splits, ld_part;
};

// Non-finite scale or bias: both NaN (the gemm path's contract: poisoned outputs, no raise).
__device__ __forceinline__ void poison_params(float& s, float& t) {
  if (!(s - s == 0.f) || !(t - t == 0.f)) s = t = std::numeric_limits<float>::quiet_NaN();
}

// T: c10::BFloat16 or c10::Half (the dtype of the stored s*G block). BM x BN: the CTA tile the
// epilogue threads cover together, as SLOTS_M x SLOTS_N warps of Frag<MI, NJ> tiles.
template <typename T, int MI, int NJ, int BM, int BN, int SLOTS_M, int SLOTS_N, bool LOSS, bool GRAD>
struct Epilogue {
  static_assert(SLOTS_M * 16 * MI == BM && SLOTS_N * 8 * NJ == BN,
                "the warps' fragments must tile the CTA tile exactly");
  static_assert(LOSS || GRAD, "nothing to compute");
  using F = mma_frag::Frag<MI, NJ>;
  static constexpr int kParts = (LOSS ? 1 : 0) + (GRAD ? 2 : 0);
  // shared scratch finish() needs, in floats
  static constexpr int kScratchFloats = kParts * SLOTS_N * BM;

  int64_t r0;  // the CTA tile's first row
  float g[MI][2], l[MI][2], ds[MI][2], dt[MI][2];
  bool ok[MI][2];

  __device__ __forceinline__ void begin(const Params& p, const F& f, int64_t row0) {
    r0 = row0;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = r0 + f.row(mi, h);
        ok[mi][h] = i < p.rows_end;
        g[mi][h] = (GRAD && ok[mi][h] && p.grad_rows != nullptr) ? p.grad_rows[i] : 1.f;
        l[mi][h] = ds[mi][h] = dt[mi][h] = 0.f;
      }
  }

  // The column tile starting at column c0: acc[mi][nj][e] (any type indexable so, e.g. a
  // float[MI][NJ][4] or a wgmma accumulator array viewed as float[1][NJ][4]) holds the dots.
  template <typename Acc>
  __device__ __forceinline__ void tile(const Params& p, const F& f, int64_t c0, const Acc& acc) {
    const int ncol = static_cast<int>(p.nb - c0 < BN ? p.nb - c0 : BN);  // valid tile columns
    // the positive of tile row r is tile column r + dd, when this tile holds some
    const int64_t dd64 = r0 - c0;
    const bool diag_here = p.positive && dd64 > -BM && dd64 < BN;
    const int dd = diag_here ? static_cast<int>(dd64) : 0;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = f.row(mi, h);
        const int target = diag_here ? lr + dd : -1;  // tile column of the positive (-1: none)
        uint16_t* grow = nullptr;
        if constexpr (GRAD) grow = p.gbuf + (r0 + lr - p.i0) * p.ld_g + c0;
        float lsum = 0.f, dss = 0.f, dts = 0.f;
#pragma unroll
        for (int nj = 0; nj < NJ; ++nj) {
          uint16_t out[2] = {0, 0};
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            const int lc = f.col(nj, b);
            if (lc < ncol) {
              const float w = acc[mi][nj][2 * h + b];
              const float z = semcomp::cuda::mul_rn(p.s, w) + p.t;
              const float e = expf(-fabsf(z));
              const bool pos = lc == target;
              const float yz = pos ? -z : z;
              if constexpr (LOSS) lsum += (yz > 0.f ? yz : 0.f) + log1pf(e);
              if constexpr (GRAD) {
                const float r = 1.f / (1.f + e);
                const float gj = (pos ? -g[mi][h] : g[mi][h]) * (yz >= 0.f ? r : e * r);
                dss += gj * w;
                dts += gj;
                out[b] = T(p.sg * gj).x;
              }
            }
          }
          if constexpr (GRAD) {
            if (ok[mi][h]) {
              const int lc = f.col(nj, 0);
              if (p.pair_store && lc + 1 < ncol) {
                *reinterpret_cast<uint32_t*>(grow + lc) = uint32_t(out[0]) | (uint32_t(out[1]) << 16);
              } else {
                if (lc < ncol) grow[lc] = out[0];
                if (lc + 1 < ncol) grow[lc + 1] = out[1];
              }
            }
          }
        }
        // rows past rows_end compute on zero-filled operands and are dropped here
        if (ok[mi][h]) {
          l[mi][h] += lsum;
          ds[mi][h] += dss;
          dt[mi][h] += dts;
        }
      }
  }

  // Row shares of this CTA tile for split `split`: quad sums, then the SLOTS_N column warps in
  // slot order through `scratch` (kScratchFloats floats of shared memory). tid / nthreads:
  // the thread's index among the epilogue threads and their number. `scratch` may be reused
  // after the next bar().
  template <typename Bar>
  __device__ __forceinline__ void finish(const Params& p, const F& f, int64_t split,
                                         float* scratch, Bar&& bar, int tid, int nthreads) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v[3] = {l[mi][h], ds[mi][h], dt[mi][h]};
#pragma unroll
        for (int q = 0; q < 3; ++q) {
          v[q] += __shfl_xor_sync(0xffffffffu, v[q], 1);
          v[q] += __shfl_xor_sync(0xffffffffu, v[q], 2);
        }
        if (f.t == 0) {
          const int lr = f.row(mi, h);
          int q = 0;
          if constexpr (LOSS) scratch[(q++ * SLOTS_N + f.slot_n) * BM + lr] = v[0];
          if constexpr (GRAD) {
            scratch[(q++ * SLOTS_N + f.slot_n) * BM + lr] = v[1];
            scratch[(q++ * SLOTS_N + f.slot_n) * BM + lr] = v[2];
          }
        }
      }
    bar();
    for (int lr = tid; lr < BM; lr += nthreads) {
      const int64_t i = r0 + lr;
      if (i >= p.rows_end) continue;
#pragma unroll
      for (int q = 0; q < kParts; ++q) {
        float v = scratch[(q * SLOTS_N) * BM + lr];
#pragma unroll
        for (int sn = 1; sn < SLOTS_N; ++sn) v += scratch[(q * SLOTS_N + sn) * BM + lr];
        p.part[(q * p.splits + split) * p.ld_part + (i - p.i0)] = v;
      }
    }
  }
};

}  // namespace semcomp::siglip_epi
