// The host side of SigLIP's tensor-core implementations (the "mma" kernels of
// siglip_mma_cuda.cu and the "wgmma" kernels of siglip_wgmma_cuda.cu), written once: each
// passes a chunk launcher that runs its kernel (the sigmoid epilogue of siglip_mma_epilogue.cuh
// on its own mainloop) over the rows of one chunk. Per chunk of C rows of a:
//
//   the kernel                       row shares (loss; d scale, d bias) per column split into
//                                    part (parts, splits, C), and with the gradient s*G in the
//                                    input dtype (fp16: times the power-of-two pre-scale
//                                    pow2_prescale of |s| max|g|) into gbuf (C x Nb)
//   rows = sum over splits           in split order (at::sum over the split dimension)
//   da_c = (sG) b                    cuBLAS, fp32 out (mm.dtype_out)
//   db += (sG)^T a_c                 cuBLAS into an fp32 buffer (addmm_fp32_accumulate)
//
// then the row sums in order, 1/p for fp16 (exact), the outputs in the callers' dtypes.
// The chunks and splits do not depend on LOSS / GRAD, so the forward alone gives the losses of
// the forward + backward bit for bit. A non-finite scale or bias is the kernels' business
// (siglip_epi::poison_params: NaN outputs, no host sync).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.cuh"    // SEMCOMP_MM_OUT_DTYPE, pow2_prescale, addmm_fp32_accumulate
#include "common/mma_mainloop.cuh"  // kBM, kBN, pick_blocks, pick_splits
#include "infonce/infonce.h"        // infonce_dk_accumulate_mode(): how torch takes an fp32 bias
#include "siglip/siglip_mma.h"      // Outputs
#include "siglip/siglip_mma_epilogue.cuh"  // siglip_epi::Params

namespace semcomp::siglip_drv {

#if SEMCOMP_MM_OUT_DTYPE
// Rows per chunk: the requested size (at most na), or whole 128-row blocks whose s*G block fits
// the budget of pick_blocks. Column splits per chunk: pick_splits over 128-column tiles. Both
// kernels use 128 x 128 CTA tiles (static_asserts in their files).
struct Plan {
  int64_t C, splits;
};
inline Plan plan(int64_t na, int64_t nb, int64_t chunk, int64_t element_size, int device) {
  using namespace semcomp::mma_loop;
  const int64_t n_rb = semcomp::cuda::ceil_div(na, kBM), n_ct = semcomp::cuda::ceil_div(nb, kBN);
  const int64_t C = chunk > 0 ? std::min(chunk, na)
                              : std::min(na, pick_blocks(0, n_rb, kBM * nb * element_size) * kBM);
  return {C, pick_splits(semcomp::cuda::ceil_div(C, kBM), n_ct, semcomp::cuda::multiprocessor_count(device))};
}

// As siglip_mma::run for LOSS / GRAD (a, b bf16/fp16 with the same d; the callers check).
// launch(a, b, sp, tp, gsp, p, c, stream) runs the chunk's kernel: rows [p.i0, p.rows_end) of
// the contiguous a (c of them) against all of the contiguous b, grid (ceil(c / 128), p.splits);
// sp, tp: the fp32 scale and bias on the device, gsp: the fp16 pre-scale or nullptr; p: every
// field but s, t, sg (the kernel's, from sp, tp, gsp).
template <bool LOSS, bool GRAD, typename Launch>
siglip_mma::Outputs run_chunks(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& logit_scale,
                               const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
                               int64_t chunk, bool keep_acc, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a_in.device().index()).stream();
  const auto opts = a_in.options().dtype(at::kFloat);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor s = logit_scale.to(opts).reshape({1}).contiguous();
  const at::Tensor t = logit_bias.to(opts).reshape({1}).contiguous();
  const int64_t na = a.size(0), nb = b.size(0), d = a.size(1);
  at::Tensor g;
  if (GRAD && grad_rows.defined()) g = grad_rows.to(opts).contiguous();
  // fp16: |s*G_ij| <= |s| max|g_i| (sigmoid < 1) bounds the stored block (as siglip_cuda.cu)
  const bool prescale = GRAD && a.scalar_type() == at::kHalf;
  at::Tensor gscale;
  if (prescale) gscale = semcomp::cuda::pow2_prescale(g.defined() ? s.abs().mul(g.abs().amax()) : s.abs());

  // The same chunks and splits with and without GRAD: the same losses.
  const Plan pl = plan(na, nb, chunk, a.element_size(), a.device().index());
  const int64_t C = pl.C, splits = pl.splits;
  constexpr int kParts = (LOSS ? 1 : 0) + (GRAD ? 2 : 0);  // loss; ds, dt (the epilogue's order)
  at::Tensor part = at::empty({kParts, splits, C}, opts);
  at::Tensor rows = at::empty({kParts, na}, opts);
  at::Tensor gbuf, scratch;  // scratch: only for the addmm_fp32_accumulate fallback
  siglip_mma::Outputs out;
  if (GRAD) {
    gbuf = at::empty({C, nb}, a.options());
    out.ga = at::empty({na, d}, opts);
    out.gb = at::zeros({nb, d}, opts);
  }
  siglip_epi::Params p{};
  p.grad_rows = g.defined() ? g.const_data_ptr<float>() : nullptr;
  p.positive = !negative_only;
  p.nb = nb;
  p.gbuf = GRAD ? static_cast<uint16_t*>(gbuf.data_ptr()) : nullptr;
  p.ld_g = nb;
  p.pair_store = nb % 2 == 0;  // gbuf from at::empty: 4-byte aligned rows when nb is even
  p.part = part.data_ptr<float>();
  p.splits = splits;
  p.ld_part = C;
  const float* gsp = prescale ? gscale.const_data_ptr<float>() : nullptr;
  for (int64_t i0 = 0; i0 < na; i0 += C) {
    const int64_t c = std::min(C, na - i0);
    p.i0 = i0;
    p.rows_end = i0 + c;
    launch(a, b, s.const_data_ptr<float>(), t.const_data_ptr<float>(), gsp, static_cast<const siglip_epi::Params&>(p),
           c, stream);
    rows.narrow(1, i0, c).copy_(at::sum(part.narrow(2, 0, c), 1));  // splits in order
    if (GRAD) {
      const at::Tensor gblk = gbuf.narrow(0, 0, c), ac = a.narrow(0, i0, c);
      at::Tensor ga_blk = out.ga.narrow(0, i0, c);
      at::mm_out(ga_blk, gblk, b, at::kFloat);  // da_c = (sG) b, fp32
      semcomp::cuda::addmm_fp32_accumulate(out.gb, gblk.t(), ac, scratch,  // db += (sG)^T a_c
                                           infonce_dk_accumulate_mode());
    }
  }
  if (LOSS) {
    out.loss = rows.select(0, 0);
    out.total = out.loss.sum();
  }
  if (GRAD) {
    if (prescale) {
      const at::Tensor inv = gscale.reciprocal();  // exact: a power of two
      out.ga.mul_(inv);
      out.gb.mul_(inv);
    }
    if (!keep_acc) {
      out.ga = out.ga.to(a_in.scalar_type());
      out.gb = out.gb.to(b_in.scalar_type());
    }
    const int q = LOSS ? 1 : 0;
    out.gs = rows.select(0, q).sum().reshape(logit_scale.sizes()).to(logit_scale.scalar_type());
    out.gt = rows.select(0, q + 1).sum().reshape(logit_bias.sizes()).to(logit_bias.scalar_type());
  }
  return out;
}
#endif

}  // namespace semcomp::siglip_drv
