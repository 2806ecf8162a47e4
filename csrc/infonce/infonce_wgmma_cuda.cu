// InfoNCE "wgmma" kernels (see infonce_wgmma.h): the mma implementation's logit passes
// (infonce_mma_cuda.cu) with a Hopper mainloop for sm_90a (H100/H200): TMA loads into
// 128-byte-swizzled shared stages, an mbarrier pipeline between a producer warpgroup and two
// consumer warpgroups, and wgmma.mma_async (both operands from shared memory), on the
// CUTLASS/CuTe headers of the pinned nvidia-cutlass package (header-only). The epilogues are
// kernel 1's (infonce/infonce_mma_epilogue.cuh), as are the host drivers' partial states,
// splits and fixed-order merges (infonce/infonce_lse.cuh).
//
// The mainloop is common/wgmma_mainloop.cuh (shared with SigLIP's wgmma kernels,
// siglip/siglip_wgmma_cuda.cu; its header comment has the CTA, pipeline and shared layout):
// CTAs of 384 threads, a TMA producer warpgroup and two wgmma consumer warpgroups, 128 x 128
// dot tiles handed to the epilogue as float[1][16][4] in the m16n8 layout, which is kernel 1's
// epilogue geometry <128, 128, 8 x 1 warps, MI = 1, NJ = 16> on a named barrier over the 256
// consumer threads. Built only with the CuTe headers and for sm_90a (SEMCOMP_WGMMA_KERNELS, the
// kernel bodies under __CUDA_ARCH_FEAT_SM90_ALL; other device passes trap), stubs in the host
// emulator and without the headers, where available() is false.
//
// Numerics: as kernel 1 (logit x = mul_rn(dot, s) in fp32, the epilogues are the same code).
// The forward and the backward run the same mainloop function (same TMA boxes, same wgmma
// sequence over the same D steps, each dot tile at the same 128-row block: the backward's
// row chunks are rounded up to multiples of 128), so the backward recomputes the forward's
// dot bit for bit. The wgmma dot itself differs from kernel 1's mma.sync dot in the last bits
// (a different summation order inside the tensor cores).
//
// Left for the GPU measurements to justify: overlapping one consumer warpgroup's epilogue with
// the other's wgmma (FA3's ping-pong; here both consumers run the epilogue together and the
// tensor cores wait), keeping the q block resident across column tiles when 128 x d fits,
// TMA stores of the backward's s*G tile, and 2-CTA clusters multicasting the k slices.
//
// Not yet run on a GPU: benchmarks/wgmma_check.py compares it with kernel 1 and an fp64
// reference on ragged shapes and times it.
#include <ATen/core/Tensor.h>

#include "common/wgmma_mainloop.cuh"  // defines SEMCOMP_WGMMA_KERNELS
#include "infonce/infonce_wgmma.h"

#if SEMCOMP_WGMMA_KERNELS
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "common/cuda_utils.cuh"  // also SEMCOMP_MM_OUT_DTYPE
#include "common/mma_mainloop.cuh"  // host helpers (pick_splits, pick_blocks) and split_range
#include "infonce/infonce.h"
#include "infonce/infonce_lse.cuh"
#include "infonce/infonce_mma_epilogue.cuh"
#include "infonce/infonce_tc_host.cuh"
#endif

namespace semcomp::wgmma {

#if SEMCOMP_WGMMA_KERNELS
namespace {

using semcomp::cuda::ceil_div;
using semcomp::infonce_lse::FwdPartials;
using semcomp::infonce_lse::scale_ok;
using namespace semcomp::wgmma_loop;  // the mainloop, its constants and host helpers

template <bool SYM>
using FwdEpiT = semcomp::mma_epi::InfoNCEFwd<kBM, kBN, 8, 1, 1, kNJ, SYM>;
template <typename T, bool SYM>
using GradEpiT = semcomp::mma_epi::InfoNCEGrad<T, kBM, kBN, 8, 1, 1, kNJ, SYM>;
constexpr int kScratchFloats =
    std::max(FwdEpiT<true>::kScratchFloats, GradEpiT<c10::BFloat16, true>::kScratchFloats);
static_assert(FwdEpiT<true>::kThreads == kEpiThreads, "the epilogue runs on the consumer warps");
constexpr int kSmemBytes = smem_bytes<kScratchFloats>;
static_assert(kSmemBytes <= 227 * 1024, "sm_90 shared memory per block");

struct FwdArgs {
  int64_t nq, nk, d, offset, rb0;
  const float* scale;
  float *row_pm, *row_ps, *col_pm, *col_ps, *diag;  // as mma_fwd_kernel
};

// grid (row blocks of this pass, splits); rb0: first row block of the pass.
template <bool BF16, bool SYM>
__global__ void __launch_bounds__(kThreads, 1)
wgmma_fwd_kernel(const __grid_constant__ CUtensorMap qmap, const __grid_constant__ CUtensorMap kmap,
                 const FwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  auto& sm = smem_ref<kScratchFloats>();
  Pipeline pipe = make_pipeline(sm);
  __syncthreads();  // barriers initialised
  const int64_t rbl = blockIdx.x, split = blockIdx.y;
  Walk w{(a.rb0 + rbl) * kBM, 0, 0, static_cast<int>(ceil_div(a.d, kBK))};
  semcomp::mma_loop::split_range(ceil_div(a.nk, kBN), split, gridDim.y, w.t0, w.t1);
  if (producer_role(pipe, sm, &qmap, &kmap, w)) return;
  const float s = a.scale[0];
  FwdEpiT<SYM> epi(consumer_frag(), w.r0, a.nq, a.nk, s, a.offset, sm.scratch, int(threadIdx.x) - 128,
                   SYM ? a.col_pm + rbl * a.nk : nullptr, SYM ? a.col_ps + rbl * a.nk : nullptr, a.diag);
  consume<BF16>(pipe, sm, w, [&](int64_t ct, float (&acc)[1][kNJ][4]) { epi.tile(ct, acc, consumer_bar); });
  epi.finish(a.row_pm + split * a.nq, a.row_ps + split * a.nq, consumer_bar);
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_90a only (available() checks the device and the build)
#endif
}

struct GradArgs {
  int64_t nk, d, i0, c, offset;
  const float *scale, *rlse, *rcoef, *dcoef, *clse, *ccoef, *gscale;
  uint16_t* gbuf;
  int64_t ld_g;
  bool pair_store;
  float* ds_part;
  int64_t ld_ds;
};

// grid (row blocks of rows [i0, i0 + c), splits); i0 is a multiple of kBM (the forward's row
// blocks). gbuf: row i - i0, column j at gbuf[(i - i0) * ld_g + j]; ds_part: (splits, ld_ds).
template <typename T, bool BF16, bool SYM>
__global__ void __launch_bounds__(kThreads, 1)
wgmma_grad_kernel(const __grid_constant__ CUtensorMap qmap, const __grid_constant__ CUtensorMap kmap,
                  const GradArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  auto& sm = smem_ref<kScratchFloats>();
  Pipeline pipe = make_pipeline(sm);
  __syncthreads();
  const int64_t split = blockIdx.y;
  Walk w{a.i0 + int64_t(blockIdx.x) * kBM, 0, 0, static_cast<int>(ceil_div(a.d, kBK))};
  semcomp::mma_loop::split_range(ceil_div(a.nk, kBN), split, gridDim.y, w.t0, w.t1);
  if (producer_role(pipe, sm, &qmap, &kmap, w)) return;
  const float s = scale_ok(a.scale[0]) ? a.scale[0] : std::numeric_limits<float>::quiet_NaN();
  const float sg = a.gscale ? s * a.gscale[0] : s;
  GradEpiT<T, SYM> epi(consumer_frag(), w.r0, a.i0, a.i0 + a.c, a.nk, a.offset, s, sg, a.rlse,
                       a.rcoef, a.dcoef, a.clse, a.ccoef, a.gbuf, a.ld_g, a.pair_store, sm.scratch);
  consume<BF16>(pipe, sm, w, [&](int64_t ct, float (&acc)[1][kNJ][4]) { epi.tile(ct, acc); });
  epi.finish(a.ds_part + split * a.ld_ds, consumer_bar);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// ---- host -------------------------------------------------------------------------------------

// Rows per backward chunk: `chunk` rounded up to whole kBM-row blocks (the forward's row blocks,
// so every dot tile is recomputed as the forward computed it), at most nq; auto_rows (a
// multiple of kBM) when chunk <= 0.
constexpr int64_t bwd_chunk_rows(int64_t chunk, int64_t nq, int64_t auto_rows) {
  const int64_t want = chunk <= 0 ? auto_rows : chunk >= nq ? nq : (chunk + kBM - 1) / kBM * kBM;
  return want < nq ? want : nq;
}
static_assert(bwd_chunk_rows(50, 1000, 0) == 128 && bwd_chunk_rows(128, 1000, 0) == 128 &&
              bwd_chunk_rows(129, 1000, 0) == 256 && bwd_chunk_rows(999, 1000, 0) == 1000 &&
              bwd_chunk_rows(int64_t(1) << 62, 1000, 0) == 1000 && bwd_chunk_rows(0, 1000, 384) == 384 &&
              bwd_chunk_rows(0, 300, 384) == 300 && bwd_chunk_rows(1, 1, 128) == 1);

template <bool SYM>
std::vector<at::Tensor> fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s,
                                 int64_t offset, int64_t chunk) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t nq = q.size(0), nk = k.size(0), d = q.size(1);
  const float* sp = s.const_data_ptr<float>();
  const CUtensorMap qm = tma_map(q, "infonce wgmma", "q"), km = tma_map(k, "infonce wgmma", "k");
  return infonce_tc::forward<SYM>(q, k, s, chunk, kBN, [&](const infonce_tc::Pass& ps, FwdPartials& p) {
    const FwdArgs a{nq, nk, d, offset, ps.rb0, sp, p.rpm.data_ptr<float>(), p.rps.data_ptr<float>(),
                    SYM ? p.cpm.data_ptr<float>() : nullptr, SYM ? p.cps.data_ptr<float>() : nullptr,
                    p.diag.data_ptr<float>()};
    const dim3 grid(static_cast<unsigned>(ps.nb), static_cast<unsigned>(ps.splits));
    auto launch = [&](auto kernel) {
      allow_smem(kernel, kSmemBytes);
      kernel<<<grid, kThreads, kSmemBytes, stream>>>(qm, km, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (q.scalar_type() == at::kBFloat16) launch(&wgmma_fwd_kernel<true, SYM>);
    else launch(&wgmma_fwd_kernel<false, SYM>);
  });
}

#if SEMCOMP_MM_OUT_DTYPE
template <bool SYM>
std::vector<at::Tensor> bwd_impl(const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& logit_scale, const at::Tensor& s,
                                 const at::Tensor& rlse, const at::Tensor& rcoef,
                                 const at::Tensor& dcoef, const at::Tensor& clse,
                                 const at::Tensor& ccoef, int64_t offset, int64_t chunk) {
  using semcomp::mma_loop::pick_blocks;
  using semcomp::mma_loop::pick_splits;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t nq = q.size(0), nk = k.size(0), d = q.size(1);
  const int64_t n_rb = ceil_div(nq, kBM), n_ct = ceil_div(nk, kBN);
  const int64_t C = bwd_chunk_rows(chunk, nq, pick_blocks(0, n_rb, kBM * nk * q.element_size()) * kBM);
  const int64_t splits =
      pick_splits(ceil_div(C, kBM), n_ct, semcomp::cuda::multiprocessor_count(q.device().index()));
  const CUtensorMap qm = tma_map(q, "infonce wgmma", "q"), km = tma_map(k, "infonce wgmma", "k");
  GradArgs a{nk, d, 0, 0, offset, s.const_data_ptr<float>(), rlse.const_data_ptr<float>(),
             rcoef.const_data_ptr<float>(), dcoef.const_data_ptr<float>(),
             SYM ? clse.const_data_ptr<float>() : nullptr, SYM ? ccoef.const_data_ptr<float>() : nullptr,
             nullptr, nullptr, nk, nk % 2 == 0, nullptr, C};
  return infonce_tc::backward<SYM>(q, k, logit_scale, s, rcoef, dcoef, ccoef, C, splits,
                                   [&](const infonce_tc::Chunk& ch) {
    a.i0 = ch.i0;
    a.c = ch.c;
    a.gscale = ch.gscale;
    a.gbuf = ch.gbuf;
    a.ds_part = ch.ds_part;
    const dim3 grid(static_cast<unsigned>(ceil_div(ch.c, kBM)), static_cast<unsigned>(splits));
    auto launch = [&](auto kernel) {
      allow_smem(kernel, kSmemBytes);
      kernel<<<grid, kThreads, kSmemBytes, stream>>>(qm, km, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (q.scalar_type() == at::kBFloat16) launch(&wgmma_grad_kernel<c10::BFloat16, true, SYM>);
    else launch(&wgmma_grad_kernel<c10::Half, false, SYM>);
  });
}
#endif

}  // namespace

bool available(const at::Tensor& q, const at::Tensor& k) { return can_run(q, k); }

std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s,
                            int64_t offset, bool sym, int64_t chunk) {
  TORCH_CHECK(available(q, k), "infonce wgmma: not available for these inputs (see available())");
  return sym ? fwd_impl<true>(q, k, s, offset, chunk) : fwd_impl<false>(q, k, s, offset, chunk);
}

std::vector<at::Tensor> bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& logit_scale,
                            const at::Tensor& s, const at::Tensor& rlse, const at::Tensor& rcoef,
                            const at::Tensor& dcoef, const at::Tensor& clse,
                            const at::Tensor& ccoef, int64_t offset, bool sym, int64_t chunk) {
#if SEMCOMP_MM_OUT_DTYPE
  TORCH_CHECK(available(q, k), "infonce wgmma: not available for these inputs (see available())");
  return sym ? bwd_impl<true>(q, k, logit_scale, s, rlse, rcoef, dcoef, clse, ccoef, offset, chunk)
             : bwd_impl<false>(q, k, logit_scale, s, rlse, rcoef, dcoef, clse, ccoef, offset, chunk);
#else
  TORCH_CHECK(false, "infonce wgmma: needs torch >= 2.8 (mm.dtype_out)");
  return {};
#endif
}

#else  // no CuTe headers, or the host emulator: the dispatcher uses the other paths

bool available(const at::Tensor&, const at::Tensor&) { return false; }

std::vector<at::Tensor> fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                            int64_t) {
  TORCH_CHECK(false, "infonce wgmma: not built (needs the CuTe headers of nvidia-cutlass and sm_90a)");
  return {};
}

std::vector<at::Tensor> bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, bool, int64_t) {
  TORCH_CHECK(false, "infonce wgmma: not built (needs the CuTe headers of nvidia-cutlass and sm_90a)");
  return {};
}

#endif  // SEMCOMP_WGMMA_KERNELS

}  // namespace semcomp::wgmma
