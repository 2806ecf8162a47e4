// The tensor-core mainloop shared by the "mma" kernels of InfoNCE (infonce/infonce_mma_cuda.cu)
// and SigLIP (siglip/siglip_mma_cuda.cu): FlashAttention-2 style dot-product tiles of q rows
// against k rows on the common/ptx.cuh wrappers (cp.async, ldmatrix, mma.sync.m16n8k16; sm_80
// and newer), consumed in registers by the caller's epilogue.
//
// Tiling. A CTA (256 threads, 8 warps as 4 along rows x 2 along columns) owns kBM = 128 rows
// of q and the column tiles [t0, t1) of its split (kBN = 128 columns each); each warp holds a
// 32 x 64 accumulator tile (2 x 8 m16n8 fragments, 64 fp32 registers per thread). D is walked
// in steps of kBK = 32 through a kStages-deep cp.async pipeline whose step sequence runs over
// (column tile, D step) without draining between column tiles. Operand rows past nq / nk and
// D chunks past d are zero-filled (cp.async src_bytes = 0), so every size works; d % 8 != 0
// or a misaligned base uses plain loads into the same shared layout (VEC = false).
//
// Shared layout. A stage holds the q slice (128 rows x 32 elements) then the k slice, each row
// 64 bytes = 4 chunks of 16 bytes; chunk c of row r is stored at chunk position
// c ^ ((r >> 1) & 3). An ldmatrix phase reads 8 consecutive rows of one logical chunk: the
// (r & 1, (r >> 1) & 3) pairs of those rows are all different, so the 8 16-byte reads fall in
// 8 different 16-byte bank groups (no conflicts); the cp.async writes of a warp cover 512
// contiguous bytes.
//
// The dot of element (i, j) is accumulated by the same mma sequence over the same D steps in
// every kernel built on tile_loop, so a backward recomputes its forward's dot bit for bit.
//
// Fragment coordinates of accumulator element (mi, nj, e) of a thread: row
// wm*32 + mi*16 + g + 8*(e/2), column wn*64 + nj*8 + 2*t + e%2 (g = lane / 4, t = lane % 4).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/ptx.cuh"

namespace semcomp::mma_loop {

using semcomp::cuda::ceil_div;
using namespace semcomp::ptx;

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 3;
constexpr int kThreads = 256;
constexpr int kWarpsM = 4;          // warps along rows; 2 along columns
constexpr int kWM = kBM / kWarpsM;  // 32 rows per warp
constexpr int kWN = kBN / 2;        // 64 columns per warp
constexpr int kMI = kWM / 16, kNJ = kWN / 8;
constexpr int kStageElems = (kBM + kBN) * kBK;
constexpr int kStageBytes = kStages * kStageElems * 2;  // the pipeline's shared memory
constexpr int64_t kBudgetBytes = 128ll << 20;  // per pass: what a caller keeps per row block
static_assert(kBM == 128 && kBN == 128 && kBK == 32, "load_rows assumes 128 x 32 slices");


// Element offset of chunk `ch` (8 elements) of row `row` in a 32-element-wide slice.
__device__ __forceinline__ int swz(int row, int ch) { return row * kBK + ((ch ^ ((row >> 1) & 3)) << 3); }

// Stages rows [r0, r0 + 128) x D [k0, k0 + 32) of x (rows x d, row-major) into dst: two
// 16-byte chunks per thread, zero outside.
template <bool VEC>
__device__ __forceinline__ void load_rows(const uint16_t* __restrict__ x, int64_t rows, int64_t d,
                                          int64_t r0, int64_t k0, uint16_t* dst) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int c = threadIdx.x + u * kThreads, row = c >> 2, ch = c & 3;
    const int64_t r = r0 + row, gk = k0 + ch * 8;
    uint16_t* sp = dst + swz(row, ch);
    if constexpr (VEC) {  // d % 8 == 0: a chunk is all in or all out
      const bool ok = r < rows && gk < d;
      cp_async_16(sp, ok ? x + r * d + gk : x, ok ? 16 : 0);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t lo = (r < rows && gk + 2 * e < d) ? x[r * d + gk + 2 * e] : 0u;
        const uint32_t hi = (r < rows && gk + 2 * e + 1 < d) ? x[r * d + gk + 2 * e + 1] : 0u;
        w[e] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(sp) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// acc += the warp's 32 x 64 tile of one stage (q slice `as`, k slice `bs`).
template <bool BF16>
__device__ __forceinline__ void mma_stage(const uint16_t* as, const uint16_t* bs, int wm, int wn,
                                          int lane, float (&acc)[kMI][kNJ][4]) {
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    uint32_t a[kMI][4], b[kNJ / 2][4];
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)  // matrices: rows 0-7 / 8-15 (lane % 16), k 0-7 / 8-15 (lane / 16)
      ldmatrix_x4(a[mi], as + swz(wm * kWM + mi * 16 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
    for (int p = 0; p < kNJ / 2; ++p)  // n8 tiles 2p, 2p+1 (lane / 16), k 0-7 / 8-15 ((lane / 8) % 2)
      ldmatrix_x4(b[p], bs + swz(wn * kWN + p * 16 + ((lane >> 4) << 3) + (lane & 7),
                                 2 * kk + ((lane >> 3) & 1)));
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int nj = 0; nj < kNJ; ++nj) {
        const uint32_t bb[2] = {b[nj >> 1][(nj & 1) * 2], b[nj >> 1][(nj & 1) * 2 + 1]};
        if constexpr (BF16) mma_m16n8k16_bf16_f32(acc[mi][nj], a[mi], bb, acc[mi][nj]);
        else mma_m16n8k16_f16_f32(acc[mi][nj], a[mi], bb, acc[mi][nj]);
      }
  }
}

// The mainloop shared by both kernels: for each column tile ct in [t0, t1), the dot tile of q
// rows [r0, r0 + 128) (rows >= q_rows are zero) and k rows [ct * 128, ...) accumulates in
// acc, then epi(ct, acc) consumes it. Every thread calls epi at the same step.
template <bool BF16, bool VEC, typename Epi>
__device__ __forceinline__ void tile_loop(const uint16_t* __restrict__ q, int64_t q_rows,
                                          const uint16_t* __restrict__ k, int64_t nk, int64_t d,
                                          int64_t r0, int64_t t0, int64_t t1, uint16_t* smem,
                                          Epi&& epi) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;
  const int kt = static_cast<int>(ceil_div(d, kBK));
  const int64_t total = (t1 - t0) * kt;
  // the next step to prefetch: (column tile, D step), its stage, and how many remain
  int64_t ld_ct = t0, ld_left = total;
  int ld_ks = 0, ld_stage = 0;
  auto load_next = [&]() {
    if (ld_left > 0) {
      uint16_t* st = smem + ld_stage * kStageElems;
      const int64_t k0 = int64_t(ld_ks) * kBK;
      load_rows<VEC>(q, q_rows, d, r0, k0, st);
      load_rows<VEC>(k, nk, d, ld_ct * kBN, k0, st + kBM * kBK);
      --ld_left;
      if (++ld_ks == kt) {
        ld_ks = 0;
        ++ld_ct;
      }
    }
    ld_stage = ld_stage + 1 == kStages ? 0 : ld_stage + 1;
    cp_async_commit();  // possibly empty: keeps one group per step
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) load_next();
  float acc[kMI][kNJ][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;
  int ks = 0, rd_stage = 0;
  int64_t ct = t0;  // D step, stage and column tile of step `it`
  for (int64_t it = 0; it < total; ++it) {
    cp_async_wait<kStages - 2>();  // this thread's copies of step `it` have landed
    __syncthreads();               // everyone's have, and step it - 1's buffer is free
    load_next();                   // step it + kStages - 1, into step it - 1's buffer
    const uint16_t* st = smem + rd_stage * kStageElems;
    mma_stage<BF16>(st, st + kBM * kBK, wm, wn, lane, acc);
    rd_stage = rd_stage + 1 == kStages ? 0 : rd_stage + 1;
    if (++ks == kt) {
      epi(ct, acc);
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;
      ks = 0;
      ++ct;
    }
  }
  cp_async_wait_all();
}

// Column-tile range [t0, t1) of split `split` out of `splits` over `n_ct` tiles.
__device__ __forceinline__ void split_range(int64_t n_ct, int64_t split, int64_t splits,
                                            int64_t& t0, int64_t& t1) {
  const int64_t base = n_ct / splits, extra = n_ct % splits;
  t0 = split * base + std::min(split, extra);
  t1 = t0 + base + (split < extra ? 1 : 0);
}

// ---- host ----------------------------------------------------------------------------------

// Column splits for `row_blocks` CTAs of rows: enough CTAs to fill the GPU about twice, at
// most one per column tile (grid.y <= 65535).
inline int64_t pick_splits(int64_t row_blocks, int64_t col_tiles, int64_t sms) {
  const int64_t want = ceil_div(2 * sms, std::max<int64_t>(row_blocks, 1));
  return std::clamp<int64_t>(want, 1, std::clamp<int64_t>(col_tiles, 1, 65535));
}

// Row blocks per pass: the requested rows, or as many as fit `bytes_per_block` each in the
// budget.
inline int64_t pick_blocks(int64_t requested_rows, int64_t n_rb, int64_t bytes_per_block) {
  const int64_t want = requested_rows > 0 ? ceil_div(requested_rows, kBM)
                                          : kBudgetBytes / std::max<int64_t>(bytes_per_block, 1);
  return std::clamp<int64_t>(want, 1, n_rb);
}

inline bool vec_ok(const at::Tensor& q, const at::Tensor& k) {
  return q.size(1) % 8 == 0 && semcomp::cuda::aligned16(q.const_data_ptr()) &&
         semcomp::cuda::aligned16(k.const_data_ptr());
}

template <typename K>
void allow_smem(K* kernel, int bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// f(bf16 tag, vec tag): the kernel template arguments from the dtype and alignment.
template <typename F>
void dispatch(const at::Tensor& q, bool vec, F&& f) {
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == at::kHalf, "mma kernels: bf16 or fp16 only, got ", q.scalar_type());
  if (bf16) {
    if (vec) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (vec) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

}  // namespace semcomp::mma_loop
