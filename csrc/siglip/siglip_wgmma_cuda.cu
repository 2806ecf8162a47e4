// SigLIP "wgmma" kernels (siglip_wgmma.h): the sigmoid loss of the mma implementation
// (siglip_mma_cuda.cu) with the Hopper mainloop of InfoNCE's wgmma kernels, for sm_90a
// (H100/H200). Three shared pieces, no copies:
//
//   * the mainloop, common/wgmma_mainloop.cuh: CTAs of 384 threads, warpgroup 0 the TMA
//     producer, warpgroups 1 and 2 wgmma m64n128k16 consumers, 5 stages of 128-row x 64-element
//     slices of a and b (128B swizzle, TMA zero fill past the ends), 128 x 128 dot tiles in fp32
//     registers;
//   * the epilogue, siglip/siglip_mma_epilogue.cuh (siglip_epi::Epilogue): z = mul_rn(s, w) + t,
//     softplus losses, G, s*G stored in the input dtype, the row shares of d scale and d bias;
//     here at the Hopper geometry MI = 1, NJ = 16, 8 x 1 consumer warps over 256 threads with a
//     named barrier (wgmma_loop::consumer_bar) instead of __syncthreads (the producer warpgroup
//     has left by then);
//   * the host driver, siglip/siglip_driver.cuh: chunks of rows, column splits, the s*G block,
//     the two cuBLAS products, the fp16 pre-scale, fixed-order sums. This file passes it a chunk
//     launcher that encodes the TMA maps of a and b once and launches grid (row blocks of the
//     chunk, splits).
//
// Numerics: as the mma implementation, except the dot w itself (wgmma sums in another order
// than mma.sync: last-bit differences). Every pass (forward, backward, forward + backward) runs
// the same mainloop code over the same chunks and splits, so the loss of the forward alone and
// that of the forward + backward are the same bits, and reruns are bit-identical. A chunk that
// does not start on a multiple of 128 rows is fine: each CTA's 128 rows start at the chunk's
// row i0 + 128 x (block index), TMA reads them wherever they start, and the epilogue drops rows
// past the chunk's end.
//
// Built only with the CuTe headers and for sm_90a (SEMCOMP_WGMMA_KERNELS; the kernel body is
// under __CUDA_ARCH_FEAT_SM90_ALL, other device passes trap); the host emulator (EMU_HAVE_TORCH)
// and builds without the headers get stubs whose available() is false, and siglip_cuda.cu's
// dispatch refuses exact requests there.
//
// Not yet run on a GPU: benchmarks/wgmma_check.py compares it with the mma implementation and
// the fp64 reference (forward, backward, onepass, negative_only with Na != Nb, ragged sizes,
// chunks, bit-identical reruns).
#include <ATen/core/Tensor.h>

#include "common/wgmma_mainloop.cuh"  // defines SEMCOMP_WGMMA_KERNELS
#include "siglip/siglip_wgmma.h"

#if SEMCOMP_WGMMA_KERNELS
#include <c10/cuda/CUDAException.h>

#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/mma_mainloop.cuh"  // split_range
#include "siglip/siglip_driver.cuh"
#include "siglip/siglip_mma_epilogue.cuh"
#endif

namespace semcomp::siglip_wgmma {

#if SEMCOMP_WGMMA_KERNELS
namespace {

using semcomp::cuda::ceil_div;
using namespace semcomp::wgmma_loop;  // the mainloop, its constants and host helpers

template <typename T, bool LOSS, bool GRAD>
using Epi = siglip_epi::Epilogue<T, 1, kNJ, kBM, kBN, 8, 1, LOSS, GRAD>;
constexpr int kScratchFloats = Epi<c10::Half, true, true>::kScratchFloats;  // the largest
constexpr int kSmemBytes = smem_bytes<kScratchFloats>;
static_assert(Epi<c10::Half, true, false>::kScratchFloats <= kScratchFloats &&
              Epi<c10::Half, false, true>::kScratchFloats <= kScratchFloats);
static_assert(kSmemBytes <= 227 * 1024, "sm_90 shared memory per block");
static_assert(kEpiThreads == 8 * 32, "the epilogue's 8 x 1 warps are the consumer warps");
static_assert(kBM == semcomp::mma_loop::kBM && kBN == semcomp::mma_loop::kBN,
              "siglip_driver.cuh plans chunks and splits in 128 x 128 tiles");

// grid (row blocks of rows [p.i0, p.rows_end), p.splits). amap, bmap: the TMA maps of the
// contiguous a and b; scale, bias: one fp32 each on the device; gscale: the fp16 pre-scale or
// nullptr. p.s, p.t, p.sg are set here (as siglip_mma_kernel).
template <typename T, bool LOSS, bool GRAD>
__global__ void __launch_bounds__(kThreads, 1)
siglip_wgmma_kernel(const __grid_constant__ CUtensorMap amap, const __grid_constant__ CUtensorMap bmap,
                    int64_t d, const float* __restrict__ scale, const float* __restrict__ bias,
                    const float* __restrict__ gscale, siglip_epi::Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBF16 = std::is_same_v<T, c10::BFloat16>;
  auto& sm = smem_ref<kScratchFloats>();
  Pipeline pipe = make_pipeline(sm);
  __syncthreads();  // barriers initialised
  const int64_t split = blockIdx.y;
  Walk w{p.i0 + int64_t(blockIdx.x) * kBM, 0, 0, static_cast<int>(ceil_div(d, kBK))};
  semcomp::mma_loop::split_range(ceil_div(p.nb, kBN), split, p.splits, w.t0, w.t1);
  if (producer_role(pipe, sm, &amap, &bmap, w)) return;
  float s = scale[0], t = bias[0];
  siglip_epi::poison_params(s, t);
  p.s = s;
  p.t = t;
  p.sg = gscale != nullptr ? s * gscale[0] : s;
  const auto f = consumer_frag();
  Epi<T, LOSS, GRAD> epi;
  epi.begin(p, f, w.r0);
  consume<kBF16>(pipe, sm, w, [&](int64_t ct, float (&acc)[1][kNJ][4]) { epi.tile(p, f, ct * kBN, acc); });
  epi.finish(p, f, split, sm.scratch, consumer_bar, int(threadIdx.x) - 128, kEpiThreads);
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_90a only (available() checks the device and the build)
#endif
}

#if SEMCOMP_MM_OUT_DTYPE
template <bool LOSS, bool GRAD>
siglip_mma::Outputs run_impl(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& logit_scale,
                             const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
                             int64_t chunk, bool keep_acc) {
  static_assert(Epi<c10::Half, LOSS, GRAD>::kParts == (LOSS ? 1 : 0) + (GRAD ? 2 : 0),
                "the driver's row-share layout");
  CUtensorMap amap, bmap;  // encoded at the first chunk (the driver's contiguous a and b)
  bool have_maps = false;
  return siglip_drv::run_chunks<LOSS, GRAD>(
      a_in, b_in, logit_scale, logit_bias, grad_rows, negative_only, chunk, keep_acc,
      [&](const at::Tensor& a, const at::Tensor& b, const float* sp, const float* tp, const float* gsp,
          const siglip_epi::Params& p, int64_t c, cudaStream_t stream) {
        if (!have_maps) {
          amap = tma_map(a, "siglip wgmma", "a");
          bmap = tma_map(b, "siglip wgmma", "b");
          have_maps = true;
        }
        const dim3 grid(static_cast<unsigned>(ceil_div(c, kBM)), static_cast<unsigned>(p.splits));
        auto launch = [&](auto kernel) {
          allow_smem(kernel, kSmemBytes);
          kernel<<<grid, kThreads, kSmemBytes, stream>>>(amap, bmap, a.size(1), sp, tp, gsp, p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (a.scalar_type() == at::kBFloat16) launch(&siglip_wgmma_kernel<c10::BFloat16, LOSS, GRAD>);
        else launch(&siglip_wgmma_kernel<c10::Half, LOSS, GRAD>);
      });
}
#endif

}  // namespace

bool available(const at::Tensor& a, const at::Tensor& b) { return can_run(a, b); }

siglip_mma::Outputs run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
                        const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
                        bool loss, bool grad, int64_t chunk, bool keep_acc) {
  TORCH_CHECK(available(a, b), "siglip wgmma: not available for ", a.scalar_type(), " inputs of shapes ",
              a.sizes(), " and ", b.sizes(), " on this device and build (see available())");
#if SEMCOMP_MM_OUT_DTYPE
  if (loss && grad)
    return run_impl<true, true>(a, b, logit_scale, logit_bias, grad_rows, negative_only, chunk, keep_acc);
  if (grad)
    return run_impl<false, true>(a, b, logit_scale, logit_bias, grad_rows, negative_only, chunk, keep_acc);
  TORCH_CHECK(loss, "siglip wgmma: neither the loss nor the gradient asked for");
  return run_impl<true, false>(a, b, logit_scale, logit_bias, grad_rows, negative_only, chunk, keep_acc);
#else
  TORCH_CHECK(false, "siglip wgmma: needs torch >= 2.8 (mm.dtype_out)");
  return {};
#endif
}

#else  // no CuTe headers, or the host emulator: the dispatcher uses the other paths

bool available(const at::Tensor&, const at::Tensor&) { return false; }

siglip_mma::Outputs run(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, bool, bool, bool, int64_t, bool) {
  TORCH_CHECK(false, "siglip wgmma: not built (needs the CuTe headers of nvidia-cutlass and sm_90a)");
  return {};
}

#endif  // SEMCOMP_WGMMA_KERNELS

}  // namespace semcomp::siglip_wgmma
