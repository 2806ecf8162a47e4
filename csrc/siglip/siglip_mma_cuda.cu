// SigLIP "mma" implementation (siglip_mma.h): the logit dots of a chunk of rows of a against all
// of b on the tensor cores (common/mma_mainloop.cuh: cp.async stages, ldmatrix, mma.sync
// m16n8k16; sm_80 and newer), consumed in registers by the sigmoid epilogue of
// siglip_mma_epilogue.cuh. Same contract as siglip_cuda.cu's gemm path for bf16/fp16:
//
//   * z = mul_rn(s, w) + t on fp32 dots w; loss_i, and with the gradient the row shares of
//     d scale (sum_j G_ij w_ij) and d bias (sum_j G_ij), all in fp32;
//   * s*G rounded once to the input dtype into a (chunk x Nb) block, fp16 times the
//     power-of-two pre-scale of pow2_prescale (bound |s| max|g|), then da_c = (sG) b in fp32
//     and db += (sG)^T a_c in an fp32 buffer on cuBLAS (mm.dtype_out / addmm_fp32_accumulate),
//     both multiplied by 1/p (exact) for fp16;
//   * a non-finite scale or bias poisons every output with NaN (no host sync, no raise);
//   * fixed-order reductions, no float atomics: per row, each thread's columns in tile order,
//     the quad, the two column warps of the CTA in order (the epilogue's finish()), then the
//     column splits in index order (at::sum over the split dimension), then the rows in order.
//     Results are reproducible for a given (Na, Nb, chunk) and device (the splits follow the
//     multiprocessor count).
//   * the host side (chunks, the s*G block, the cuBLAS products) is siglip_driver.cuh, shared
//     with the wgmma kernels (siglip_wgmma_cuda.cu); this file passes its chunk launcher.
//
// Launch shape: grid (row blocks of 128 rows of the chunk, column splits), 256 threads, the
// mainloop's 48 KiB of stages plus the epilogue's scratch (1 KiB for the forward, 3 KiB with the
// gradient) of dynamic shared memory; at most 128 registers a thread (kMinBlocks), two CTAs
// per SM.
// The forward alone runs the same chunks and splits as the forward + backward (only the
// s*G block and the two GEMMs are left out), so both give bit-identical losses.
//
// Emulator route (development aid, not part of the Python API): under the host emulator
// (shared/tools/cuda-emu, EMU_HAVE_TORCH) this unit also registers
// torch.ops.semcomp_siglip_mma_emu.run, which calls run() directly; tools/emu/
// test_siglip_mma_emu.py drives it. GPU builds do not compile it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "common/cuda_utils.cuh"  // SEMCOMP_MM_OUT_DTYPE, pow2_prescale, addmm_fp32_accumulate
#include "common/mma_frag.cuh"
#include "common/mma_mainloop.cuh"
#include "infonce/infonce.h"  // infonce_dk_accumulate_mode(): how torch takes an fp32 bias
#include "siglip/siglip_driver.cuh"
#include "siglip/siglip_mma.h"
#include "siglip/siglip_mma_epilogue.cuh"

#if defined(EMU_HAVE_TORCH)
#include <torch/library.h>
#endif

namespace semcomp::siglip_mma {
namespace {

using semcomp::cuda::ceil_div;
using namespace semcomp::mma_loop;
constexpr int kWarpsN = kBN / kWN;  // the mainloop's warps along columns

template <typename T, bool LOSS, bool GRAD>
using Epi = siglip_epi::Epilogue<T, kMI, kNJ, kBM, kBN, kWarpsM, kWarpsN, LOSS, GRAD>;

// Two CTAs per SM (128 registers a thread: ptxas fits every variant without spills on sm_80
// and sm_90; unbounded, the gradient variants take 165-176 and one CTA per SM), so that one
// CTA's sigmoid epilogue (exp, log1p and a division per logit: multi-function-unit bound)
// overlaps the other's mma mainloop. Not yet timed on a GPU against kMinBlocks = 1.
constexpr int kMinBlocks = 2;

template <typename T, bool LOSS, bool GRAD>
constexpr int kSmemBytes = kStageBytes + Epi<T, LOSS, GRAD>::kScratchFloats * 4;

// grid (row blocks of rows [p.i0, p.rows_end), p.splits). scale, bias: one fp32 each on the
// device; gscale: the fp16 pre-scale or nullptr. p.s, p.t, p.sg are set here.
template <typename T, bool VEC, bool LOSS, bool GRAD>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
siglip_mma_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b, int64_t d,
                  const float* __restrict__ scale, const float* __restrict__ bias,
                  const float* __restrict__ gscale, siglip_epi::Params p) {
  constexpr bool kBF16 = std::is_same_v<T, c10::BFloat16>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* stages = reinterpret_cast<uint16_t*>(smem_raw);
  float* scratch = reinterpret_cast<float*>(smem_raw + kStageBytes);
  float s = scale[0], t = bias[0];
  siglip_epi::poison_params(s, t);
  p.s = s;
  p.t = t;
  p.sg = gscale != nullptr ? s * gscale[0] : s;
  const int64_t split = blockIdx.y;
  const int64_t r0 = p.i0 + int64_t(blockIdx.x) * kBM;
  int64_t t0, t1;
  split_range(ceil_div(p.nb, kBN), split, p.splits, t0, t1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const auto f = mma_frag::grid_frag<kMI, kNJ>(warp, lane, kWarpsM);
  Epi<T, LOSS, GRAD> epi;
  epi.begin(p, f, r0);
  tile_loop<kBF16, VEC>(a, p.rows_end, b, p.nb, d, r0, t0, t1, stages,
                        [&](int64_t ct, float (&acc)[kMI][kNJ][4]) { epi.tile(p, f, ct * kBN, acc); });
  epi.finish(p, f, split, scratch, [] { __syncthreads(); }, static_cast<int>(threadIdx.x), kThreads);
}

#if SEMCOMP_MM_OUT_DTYPE
template <bool LOSS, bool GRAD>
void launch(const at::Tensor& a, const at::Tensor& b, bool vec, const float* sp, const float* tp,
            const float* gsp, const siglip_epi::Params& p, int64_t c, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(c, kBM)), static_cast<unsigned>(p.splits));
  const auto* ap = static_cast<const uint16_t*>(a.const_data_ptr());
  const auto* bp = static_cast<const uint16_t*>(b.const_data_ptr());
  const int64_t d = a.size(1);
  dispatch(a, vec, [&](auto bf16, auto vtag) {
    constexpr bool V = decltype(vtag)::value;
    using T = std::conditional_t<decltype(bf16)::value, c10::BFloat16, c10::Half>;
    constexpr int smem = kSmemBytes<T, LOSS, GRAD>;
    allow_smem(&siglip_mma_kernel<T, V, LOSS, GRAD>, smem);
    siglip_mma_kernel<T, V, LOSS, GRAD><<<grid, kThreads, smem, stream>>>(ap, bp, d, sp, tp, gsp, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The host driver (chunks, the s*G block, the cuBLAS products, the fp16 pre-scale) is
// siglip_driver.cuh's, shared with the wgmma kernels; this file passes its chunk launcher.
template <bool LOSS, bool GRAD>
Outputs run_impl(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& logit_scale,
                 const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
                 int64_t chunk, bool keep_acc) {
  static_assert(Epi<c10::Half, LOSS, GRAD>::kParts == (LOSS ? 1 : 0) + (GRAD ? 2 : 0),
                "the driver's row-share layout");
  return siglip_drv::run_chunks<LOSS, GRAD>(
      a_in, b_in, logit_scale, logit_bias, grad_rows, negative_only, chunk, keep_acc,
      [](const at::Tensor& a, const at::Tensor& b, const float* sp, const float* tp, const float* gsp,
         const siglip_epi::Params& p, int64_t c, cudaStream_t stream) {
        launch<LOSS, GRAD>(a, b, vec_ok(a, b), sp, tp, gsp, p, c, stream);
      });
}
#endif

}  // namespace

bool available(const at::Tensor& a) {
  if (!SEMCOMP_MM_OUT_DTYPE) return false;
  if (a.scalar_type() != at::kBFloat16 && a.scalar_type() != at::kHalf) return false;
  if (a.dim() != 2 || a.size(1) == 0) return false;  // d = 0: every dot 0, the gemm path
#if defined(EMU_HAVE_TORCH)  // the host emulator (shared/tools/cuda-emu) runs the sm_80 code
#if defined(EMU_CUDA_ARCH)
  return EMU_CUDA_ARCH >= 800;
#else
  return false;
#endif
#else
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.device().index()));
  return major >= 8;
#endif
}

Outputs run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
            const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
            bool loss, bool grad, int64_t chunk, bool keep_acc) {
  TORCH_CHECK(available(a), "siglip mma: not available for ", a.scalar_type(), " inputs of shape ",
              a.sizes(), " on this device");
  TORCH_CHECK(b.scalar_type() == a.scalar_type() && b.size(1) == a.size(1),
              "siglip mma: b must match a's dtype and feature dimension");
#if SEMCOMP_MM_OUT_DTYPE
  if (loss && grad)
    return run_impl<true, true>(a, b, logit_scale, logit_bias, grad_rows, negative_only, chunk, keep_acc);
  if (grad)
    return run_impl<false, true>(a, b, logit_scale, logit_bias, grad_rows, negative_only, chunk, keep_acc);
  TORCH_CHECK(loss, "siglip mma: neither the loss nor the gradient asked for");
  return run_impl<true, false>(a, b, logit_scale, logit_bias, grad_rows, negative_only, chunk, keep_acc);
#else
  TORCH_CHECK(false, "siglip mma: needs torch >= 2.8 (mm.dtype_out)");
  return {};
#endif
}

}  // namespace semcomp::siglip_mma

#if defined(EMU_HAVE_TORCH)
// The emulator's route to run() (see the top of this file): [loss, total] when loss, then
// [ga, gb, gs, gt] when grad.
namespace {
std::vector<at::Tensor> siglip_mma_emu_run(const at::Tensor& a, const at::Tensor& b,
                                           const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                                           const std::optional<at::Tensor>& grad_rows, bool negative_only,
                                           bool loss, bool grad, int64_t chunk, bool keep_acc) {
  const auto o = semcomp::siglip_mma::run(a, b, logit_scale, logit_bias, grad_rows.value_or(at::Tensor()),
                                          negative_only, loss, grad, chunk, keep_acc);
  std::vector<at::Tensor> v;
  if (loss) v.insert(v.end(), {o.loss, o.total});
  if (grad) v.insert(v.end(), {o.ga, o.gb, o.gs, o.gt});
  return v;
}
}  // namespace
TORCH_LIBRARY(semcomp_siglip_mma_emu, m) {
  m.def("run(Tensor a, Tensor b, Tensor logit_scale, Tensor logit_bias, Tensor? grad_rows, "
        "bool negative_only, bool loss, bool grad, int chunk, bool keep_acc) -> Tensor[]",
        &siglip_mma_emu_run);
}
#endif
