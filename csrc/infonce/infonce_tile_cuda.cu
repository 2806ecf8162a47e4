// Tile-fused InfoNCE kernels (see infonce_tile.h). Each CTA (256 threads, 8 warps) owns a
// block of kBM rows of q and a contiguous range of column tiles of k. Per column tile:
//
//   1. the kBM x kBN dot-product tile is accumulated over D in steps of kBK: both operand
//      tiles are staged in shared memory (zero-padded past nq, nk and D) and multiplied on
//      the tensor cores (WMMA 16x16x16, bf16/fp16 operands, fp32 accumulation; sm_80+), the
//      accumulators stored to a shared fp32 tile;
//   2. the epilogue reads the tile from shared memory: logits x = mul_rn(dot, s) (natural
//      units, exponentials as exp2((x - m) log2(e)), as in infonce_cuda.cu), every quantity
//      in fp32.
//
// Forward epilogue: row partials (4 threads per row, 16 columns each, combined by shuffles)
// are folded into a running online state per row; column partials (one thread per column
// and group of 16 rows, combined through shared memory in a fixed order) are written once
// per (row block, column); the positive logit is stored by the one thread that sees it.
// Gradient epilogue: G_ij = rc_i e^(x - r_i) [+ cc_j e^(x - c_j)] - dc_i [j = i + offset] is
// stored as s*G (times the pre-scale) in the input dtype; row shares of sum_j G_ij dot_ij are
// summed per split.
//
// d must be positive: with d = 0 the D loop of dot_tile is empty, and so are the barriers that
// order the previous tile's epilogue reads of sm.s before its next store (the callers route
// d = 0 to the gemm path).
//
// Without tensor cores (the host emulator in shared/tools/cuda-emu, or __CUDA_ARCH__ < 800)
// the same tile is computed by plain FMAs with the same thread layout for the epilogue,
// so everything but the WMMA calls can be checked on a CPU.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define SEMCOMP_TILE_WMMA 1
#else
#define SEMCOMP_TILE_WMMA 0
#endif

#include <algorithm>
#include <limits>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "infonce/infonce_lse.cuh"
#include "infonce/infonce_tile.h"

namespace semcomp::tile {
namespace {

using semcomp::cuda::ceil_div;
using semcomp::cuda::exp_diff;
using semcomp::cuda::Lse2;
using semcomp::cuda::mul_rn;
using semcomp::cuda::nan_max;
using semcomp::cuda::neg_inf;
using semcomp::infonce_lse::scale_ok;

constexpr int kThreads = 256;
constexpr int kBK = 32;             // D step of the staged operand tiles
constexpr int kLdOp = kBK + 8;      // operand row stride (elements; multiple of 8 for WMMA)
constexpr int kLdS = int(kBN) + 4;  // fp32 tile row stride (multiple of 4 for WMMA)
static_assert(kBM == 64 && kBN == 64, "thread layouts below assume 64 x 64 tiles");

template <typename T>
struct alignas(128) Smem {  // WMMA fragment loads/stores need 32-byte aligned pointers
  T a[kBM * kLdOp];          // q rows of the block, D slice
  T b[kBN * kLdOp];          // k rows of the column tile, D slice
  float s[kBM * kLdS];       // the dot-product tile
  float cm[4][kBN], cs[4][kBN];  // column partials of the 4 row groups
};


// Stages rows [r0, r0 + 64) x columns [k0, k0 + kBK) of x (rows x d, row-major) into dst
// (64 x kLdOp), zero outside. Thread t loads 8 consecutive elements of row t / 4.
template <typename T>
__device__ __forceinline__ void stage(const T* __restrict__ x, int64_t rows, int64_t d,
                                      int64_t r0, int64_t k0, bool vec, T* __restrict__ dst) {
  const int t = threadIdx.x, rr = t >> 2, kk = (t & 3) * 8;
  const int64_t r = r0 + rr, kc = k0 + kk;
  T* out = dst + rr * kLdOp + kk;
  if (r < rows && vec && kc + 8 <= d) {
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(x + r * d + kc);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      out[e] = (r < rows && kc + e < d) ? x[r * d + kc + e] : T(0.f);
  }
}

#if SEMCOMP_TILE_WMMA
template <typename T>
using wmma_t = std::conditional_t<std::is_same_v<T, c10::BFloat16>, __nv_bfloat16, __half>;
#endif

// The kBM x kBN tile of q[r0:] k[c0:]^T over all of d, stored to sm.s (fp32).
// Warp layout (tensor cores): 4 x 2 warps, each 16 rows x 32 columns (two 16x16 fragments).
template <typename T>
__device__ void dot_tile(const T* __restrict__ q, int64_t nq, const T* __restrict__ k,
                         int64_t nk, int64_t d, int64_t r0, int64_t c0, bool vec, Smem<T>& sm) {
#if SEMCOMP_TILE_WMMA
  namespace wm = nvcuda::wmma;
  using W = wmma_t<T>;
  const int warp = threadIdx.x >> 5, wr = warp >> 1, wc = warp & 1;
  wm::fragment<wm::accumulator, 16, 16, 16, float> acc[2];
  wm::fill_fragment(acc[0], 0.f);
  wm::fill_fragment(acc[1], 0.f);
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    __syncthreads();  // the previous step's fragments are loaded
    stage(q, nq, d, r0, k0, vec, sm.a);
    stage(k, nk, d, c0, k0, vec, sm.b);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wm::fragment<wm::matrix_a, 16, 16, 16, W, wm::row_major> fa;
      wm::load_matrix_sync(fa, reinterpret_cast<const W*>(sm.a + wr * 16 * kLdOp + kk), kLdOp);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wm::fragment<wm::matrix_b, 16, 16, 16, W, wm::col_major> fb;
        wm::load_matrix_sync(fb, reinterpret_cast<const W*>(sm.b + (wc * 32 + f * 16) * kLdOp + kk),
                             kLdOp);
        wm::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wm::store_matrix_sync(sm.s + wr * 16 * kLdS + wc * 32 + f * 16, acc[f], kLdS,
                          wm::mem_row_major);
  __syncthreads();
#else
  // Plain FMA path: thread t owns row t / 4 and columns (t % 4) * 16 .. + 15.
  const int rr = threadIdx.x >> 2, cc0 = (threadIdx.x & 3) * 16;
  float acc[16];
#pragma unroll
  for (int e = 0; e < 16; ++e) acc[e] = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    __syncthreads();
    stage(q, nq, d, r0, k0, vec, sm.a);
    stage(k, nk, d, c0, k0, vec, sm.b);
    __syncthreads();
    for (int kk = 0; kk < kBK; ++kk) {
      const float av = static_cast<float>(sm.a[rr * kLdOp + kk]);
#pragma unroll
      for (int e = 0; e < 16; ++e) acc[e] += av * static_cast<float>(sm.b[(cc0 + e) * kLdOp + kk]);
    }
  }
  __syncthreads();
#pragma unroll
  for (int e = 0; e < 16; ++e) sm.s[rr * kLdS + cc0 + e] = acc[e];
  __syncthreads();
#endif
}

// Column-tile range [t0, t1) of split `split` out of `splits` over `n_ct` tiles.
__device__ __forceinline__ void split_range(int64_t n_ct, int64_t split, int64_t splits,
                                            int64_t& t0, int64_t& t1) {
  const int64_t base = n_ct / splits, extra = n_ct % splits;
  t0 = split * base + std::min(split, extra);
  t1 = t0 + base + (split < extra ? 1 : 0);
}

template <typename T, bool SYM>
__global__ void __launch_bounds__(kThreads)
tile_fwd_kernel(const T* __restrict__ q, int64_t nq, const T* __restrict__ k, int64_t nk,
                int64_t d, const float* __restrict__ scale, int64_t i0, int64_t c,
                int64_t offset, bool vec, float* __restrict__ row_pm,
                float* __restrict__ row_ps, float* __restrict__ col_pm,
                float* __restrict__ col_ps, float* __restrict__ diag) {
  __shared__ Smem<T> sm;
  // rb: row block of the chunk [i0, i0 + c); rows past rows_end are outside the chunk
  const int64_t rb = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = i0 + rb * kBM, rows_end = i0 + c, n_ct = ceil_div(nk, kBN);
  int64_t t0, t1;
  split_range(n_ct, split, splits, t0, t1);
  const float s = scale[0];
  const int t = threadIdx.x;
  // row layout: row rr = t / 4, columns (t % 4) * 16 .. + 15 of the tile
  const int rr = t >> 2, cq = (t & 3) * 16;
  const int64_t i = r0 + rr;
  Lse2<float> row = Lse2<float>::empty();
  // column layout: column t % 64, rows (t / 64) * 16 .. + 15
  const int cj = t & 63, rg = t >> 6;
  for (int64_t ct = t0; ct < t1; ++ct) {
    const int64_t c0 = ct * kBN;
    dot_tile(q, rows_end, k, nk, d, r0, c0, vec, sm);
    // rows: tile max, then the sum against it, over the 4 lanes of the row
    float x[16];
    float m = neg_inf<float>();
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      const int64_t j = c0 + cq + e;
      x[e] = j < nk ? mul_rn(sm.s[rr * kLdS + cq + e], s) : neg_inf<float>();
      m = nan_max(m, x[e]);
    }
    m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, 2));
    float e2 = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e)
      if (c0 + cq + e < nk) e2 += exp_diff(x[e], m);
    e2 += __shfl_xor_sync(0xffffffffu, e2, 1);
    e2 += __shfl_xor_sync(0xffffffffu, e2, 2);
    row.merge(m, e2);  // a tile always holds a valid column: m is finite or NaN
    // the positive logit of row i, if this tile holds column i + offset
    const int64_t jd = i + offset - c0 - cq;
    if (i < rows_end && jd >= 0 && jd < 16) diag[i] = mul_rn(sm.s[rr * kLdS + cq + jd], s);
    if constexpr (SYM) {
      Lse2<float> col = Lse2<float>::empty();
#pragma unroll 4
      for (int e = 0; e < 16; ++e) {
        const int r = rg * 16 + e;
        if (r0 + r < rows_end) col.add(mul_rn(sm.s[r * kLdS + cj], s));
      }
      sm.cm[rg][cj] = col.m;
      sm.cs[rg][cj] = col.s;
      __syncthreads();
      if (t < kBN && c0 + t < nk) {
        Lse2<float> st{sm.cm[0][t], sm.cs[0][t]};
        for (int g = 1; g < 4; ++g) st.merge(sm.cm[g][t], sm.cs[g][t]);
        col_pm[rb * nk + c0 + t] = st.m;
        col_ps[rb * nk + c0 + t] = st.s;
      }
    }
  }
  if ((t & 3) == 0 && i < rows_end) {
    row_pm[split * nq + i] = row.m;
    row_ps[split * nq + i] = scale_ok(s) ? row.s : std::numeric_limits<float>::quiet_NaN();
  }
}

template <typename T, bool SYM>
__global__ void __launch_bounds__(kThreads)
tile_grad_kernel(const T* __restrict__ q, int64_t nq, const T* __restrict__ k, int64_t nk,
                 int64_t d, const float* __restrict__ scale, int64_t i0, int64_t c,
                 int64_t offset, bool vec, const float* __restrict__ rlse,
                 const float* __restrict__ rcoef, const float* __restrict__ dcoef,
                 const float* __restrict__ c2, const float* __restrict__ ccoef,
                 const float* __restrict__ gscale, T* __restrict__ gbuf, int64_t ld_g,
                 float* __restrict__ ds_part, int64_t ld_ds) {
  __shared__ Smem<T> sm;
  const int64_t rb = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = i0 + rb * kBM, rows_end = i0 + c, n_ct = ceil_div(nk, kBN);
  int64_t t0, t1;
  split_range(n_ct, split, splits, t0, t1);
  const float s = scale_ok(scale[0]) ? scale[0] : std::numeric_limits<float>::quiet_NaN();
  const float sg = gscale ? s * gscale[0] : s;
  const int t = threadIdx.x, rr = t >> 2, cq = (t & 3) * 16;
  const int64_t i = r0 + rr;
  const bool row_ok = i < rows_end;
  const float r = row_ok ? rlse[i] : 0.f;
  const float rc = row_ok ? rcoef[i] : 0.f, dc = row_ok ? dcoef[i] : 0.f;
  float ds = 0.f;
  for (int64_t ct = t0; ct < t1; ++ct) {
    const int64_t c0 = ct * kBN;
    dot_tile(q, rows_end, k, nk, d, r0, c0, vec, sm);
    if (row_ok) {
      alignas(16) T out[16];
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const int64_t j = c0 + cq + e;
        float g = 0.f;
        if (j < nk) {
          const float w = sm.s[rr * kLdS + cq + e];
          const float x = mul_rn(w, s);
          g = rc * exp_diff(x, r);
          if constexpr (SYM) g += ccoef[j] * exp_diff(x, c2[j]);  // c2: column LSEs (natural)
          if (j == i + offset) g -= dc;
          ds += g * w;
        }
        out[e] = static_cast<T>(sg * g);
      }
      T* dst = gbuf + (i - i0) * ld_g + c0 + cq;
      if (vec && c0 + cq + 16 <= nk) {
        reinterpret_cast<uint4*>(dst)[0] = reinterpret_cast<const uint4*>(out)[0];
        reinterpret_cast<uint4*>(dst)[1] = reinterpret_cast<const uint4*>(out)[1];
      } else {
        for (int e = 0; e < 16 && c0 + cq + e < nk; ++e) dst[e] = out[e];
      }
    }
  }
  ds += __shfl_xor_sync(0xffffffffu, ds, 1);
  ds += __shfl_xor_sync(0xffffffffu, ds, 2);
  if ((t & 3) == 0 && row_ok) ds_part[split * ld_ds + (i - i0)] = ds;
}

// 16-byte staging and stores need d % 8 == 0 (q, k rows) and 16-byte aligned bases.
bool vec_ok(const at::Tensor& q, const at::Tensor& k, int64_t ld) {
  return q.size(1) % 8 == 0 && ld % 8 == 0 && semcomp::cuda::aligned16(q.const_data_ptr()) &&
         semcomp::cuda::aligned16(k.const_data_ptr());
}

template <typename F>
void dispatch_half(const at::Tensor& q, F&& f) {
  if (q.scalar_type() == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    TORCH_CHECK(q.scalar_type() == at::kHalf, "semcomp tile: bf16 or fp16 only, got ", q.scalar_type());
    f(c10::Half{});
  }
}

}  // namespace

void launch_fwd(const at::Tensor& q, const at::Tensor& k, const float* scale, int64_t offset,
                bool sym, int64_t splits, int64_t i0, int64_t c, at::Tensor& row_pm,
                at::Tensor& row_ps, at::Tensor& col_pm, at::Tensor& col_ps, at::Tensor& diag) {
  const int64_t nq = q.size(0), nk = k.size(0), d = q.size(1);
  TORCH_CHECK(d > 0, "semcomp tile: d = 0 (the caller routes it to the gemm path)");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const dim3 grid(static_cast<unsigned>(ceil_div(c, kBM)), static_cast<unsigned>(splits));
  const bool vec = vec_ok(q, k, d);
  dispatch_half(q, [&](auto tag) {
    using T = decltype(tag);
    const T* qp = reinterpret_cast<const T*>(q.const_data_ptr());
    const T* kp = reinterpret_cast<const T*>(k.const_data_ptr());
    float* cpm = sym ? col_pm.data_ptr<float>() : nullptr;
    float* cps = sym ? col_ps.data_ptr<float>() : nullptr;
    if (sym) {
      tile_fwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(
          qp, nq, kp, nk, d, scale, i0, c, offset, vec, row_pm.data_ptr<float>(),
          row_ps.data_ptr<float>(), cpm, cps, diag.data_ptr<float>());
    } else {
      tile_fwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(
          qp, nq, kp, nk, d, scale, i0, c, offset, vec, row_pm.data_ptr<float>(),
          row_ps.data_ptr<float>(), cpm, cps, diag.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_grad(const at::Tensor& q, const at::Tensor& k, const float* scale, int64_t i0,
                 int64_t c, int64_t offset, bool sym, int64_t splits, const float* rlse,
                 const float* rcoef, const float* dcoef, const float* c2, const float* ccoef,
                 const float* gscale, at::Tensor& gbuf, at::Tensor& ds_part) {
  const int64_t nk = k.size(0), d = q.size(1);
  TORCH_CHECK(d > 0, "semcomp tile: d = 0 (the caller routes it to the gemm path)");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const dim3 grid(static_cast<unsigned>(ceil_div(c, kBM)), static_cast<unsigned>(splits));
  const int64_t ld_g = gbuf.stride(0);
  const bool vec = vec_ok(q, k, d) && ld_g % 8 == 0 && semcomp::cuda::aligned16(gbuf.data_ptr());
  dispatch_half(q, [&](auto tag) {
    using T = decltype(tag);
    const T* qp = reinterpret_cast<const T*>(q.const_data_ptr());
    const T* kp = reinterpret_cast<const T*>(k.const_data_ptr());
    T* gp = reinterpret_cast<T*>(gbuf.data_ptr());
    if (sym) {
      tile_grad_kernel<T, true><<<grid, kThreads, 0, stream>>>(
          qp, q.size(0), kp, nk, d, scale, i0, c, offset, vec, rlse, rcoef, dcoef, c2, ccoef,
          gscale, gp, ld_g, ds_part.data_ptr<float>(), ds_part.stride(0));
    } else {
      tile_grad_kernel<T, false><<<grid, kThreads, 0, stream>>>(
          qp, q.size(0), kp, nk, d, scale, i0, c, offset, vec, rlse, rcoef, dcoef, c2, ccoef,
          gscale, gp, ld_g, ds_part.data_ptr<float>(), ds_part.stride(0));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int64_t device_sms(const at::Tensor& like) {
  return semcomp::cuda::multiprocessor_count(like.device().index());
}

}  // namespace semcomp::tile
