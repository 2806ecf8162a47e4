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
// Epilogues (infonce/infonce_mma_epilogue.cuh, shared with the wgmma kernels): the forward
// keeps row (max, sum) states in registers per column half and writes per row block column
// partials; splits, row blocks and passes merge in index order in the small kernels of
// infonce_lse.cuh (no atomics). The backward stores s*G (times the fp16 pre-scale) from
// registers in the input dtype per chunk of rows and the row shares of d scale; the host
// multiplies the s*G block by k and q on cuBLAS. (The alternative, dq accumulated in registers
// against k tiles and dk in a second pass over transposed tiles, avoids the s*G round trip
// through memory; it needs the ldmatrix .trans staging of k and q and is left for the GPU
// measurements to justify.)
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
#include "infonce/infonce_mma_epilogue.cuh"
#include "infonce/infonce_tc_host.cuh"

namespace semcomp::mma {
namespace {

using semcomp::cuda::ceil_div;
using semcomp::infonce_lse::FwdPartials;
using semcomp::infonce_lse::scale_ok;
using namespace semcomp::mma_loop;

using FwdEpi = mma_epi::InfoNCEFwd<kBM, kBN, kWarpsM, 2, kMI, kNJ, true>;
template <bool SYM>
using FwdEpiT = mma_epi::InfoNCEFwd<kBM, kBN, kWarpsM, 2, kMI, kNJ, SYM>;
template <typename T, bool SYM>
using GradEpiT = mma_epi::InfoNCEGrad<T, kBM, kBN, kWarpsM, 2, kMI, kNJ, SYM>;
// stages, then the epilogue's fp32 scratch (the forward's is the larger)
constexpr int kSmemBytes = kStageBytes + FwdEpi::kScratchFloats * 4;
static_assert(FwdEpi::kThreads == kThreads, "every thread runs the epilogue");

__device__ __forceinline__ void block_sync() { __syncthreads(); }

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
  float* scratch = reinterpret_cast<float*>(smem_raw + kStageBytes);
  const int64_t rbl = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = (rb0 + rbl) * kBM;
  int64_t t0, t1;
  split_range(ceil_div(nk, kBN), split, splits, t0, t1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  FwdEpiT<SYM> epi(mma_frag::grid_frag<kMI, kNJ>(warp, lane, kWarpsM), r0, nq, nk, scale[0], offset,
                   scratch, threadIdx.x, SYM ? col_pm + rbl * nk : nullptr,
                   SYM ? col_ps + rbl * nk : nullptr, diag);
  tile_loop<BF16, VEC>(q, nq, k, nk, d, r0, t0, t1, stages,
                       [&](int64_t ct, float (&acc)[kMI][kNJ][4]) { epi.tile(ct, acc, block_sync); });
  epi.finish(row_pm + split * nq, row_ps + split * nq, block_sync);
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
  float* scratch = reinterpret_cast<float*>(smem_raw + kStageBytes);
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = i0 + int64_t(blockIdx.x) * kBM, rows_end = i0 + c;
  int64_t t0, t1;
  split_range(ceil_div(nk, kBN), split, splits, t0, t1);
  const float s = scale_ok(scale[0]) ? scale[0] : std::numeric_limits<float>::quiet_NaN();
  const float sg = gscale ? s * gscale[0] : s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  GradEpiT<T, SYM> epi(mma_frag::grid_frag<kMI, kNJ>(warp, lane, kWarpsM), r0, i0, rows_end, nk,
                       offset, s, sg, rlse, rcoef, dcoef, clse, ccoef, gbuf, ld_g, pair_store, scratch);
  tile_loop<BF16, VEC>(q, rows_end, k, nk, d, r0, t0, t1, stages,
                       [&](int64_t ct, float (&acc)[kMI][kNJ][4]) { epi.tile(ct, acc); });
  epi.finish(ds_part + split * ld_ds, block_sync);
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
  const float* sp = s.const_data_ptr<float>();
  return infonce_tc::forward<SYM>(q, k, s, chunk, kBN, [&](const infonce_tc::Pass& ps, FwdPartials& p) {
    launch_fwd<SYM>(q, k, sp, offset, ps.rb0, ps.nb, ps.splits, p.rpm, p.rps, p.cpm, p.cps, p.diag, stream);
  });
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
  const int64_t n_rb = ceil_div(nq, kBM), n_ct = ceil_div(nk, kBN);
  const int64_t C = chunk > 0 ? std::min(chunk, nq)
                              : std::min(nq, pick_blocks(0, n_rb, kBM * nk * q.element_size()) * kBM);
  const int64_t splits =
      pick_splits(ceil_div(C, kBM), n_ct, semcomp::cuda::multiprocessor_count(q.device().index()));
  const float* sp = s.const_data_ptr<float>();
  const float* clp = SYM ? clse.const_data_ptr<float>() : nullptr;
  const float* ccp = SYM ? ccoef.const_data_ptr<float>() : nullptr;
  const bool vec = vec_ok(q, k);
  const bool pair_store = nk % 2 == 0;  // 4-byte stores of column pairs (gbuf from empty: aligned)
  const auto* qp = static_cast<const uint16_t*>(q.const_data_ptr());
  const auto* kp = static_cast<const uint16_t*>(k.const_data_ptr());
  return infonce_tc::backward<SYM>(q, k, logit_scale, s, rcoef, dcoef, ccoef, C, splits,
                                   [&](const infonce_tc::Chunk& ch) {
    const dim3 grid(static_cast<unsigned>(ceil_div(ch.c, kBM)), static_cast<unsigned>(splits));
    dispatch(q, vec, [&](auto bf16, auto vtag) {
      constexpr bool B = decltype(bf16)::value, V = decltype(vtag)::value;
      using T = std::conditional_t<B, c10::BFloat16, c10::Half>;
      allow_smem(&mma_grad_kernel<T, B, SYM, V>, kSmemBytes);
      mma_grad_kernel<T, B, SYM, V><<<grid, kThreads, kSmemBytes, stream>>>(
          qp, kp, nk, d, sp, ch.i0, ch.c, offset, rlse.const_data_ptr<float>(),
          rcoef.const_data_ptr<float>(), dcoef.const_data_ptr<float>(), clp, ccp, ch.gscale, ch.gbuf,
          nk, pair_store, ch.ds_part, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
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
