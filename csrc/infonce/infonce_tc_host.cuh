// The host side of the InfoNCE tensor-core kernels (the "mma" and "wgmma" implementations),
// which differ only in their launches.
//
// forward: row blocks of 128 rows in passes whose column partials (8 bytes per row block and
// column) fit the budget, `splits` column splits per pass; the caller's kernel writes a pass's
// row, column and diagonal partials (infonce_lse.cuh's FwdPartials), merged in a fixed order.
//
// backward: per chunk of C rows of q, the caller's kernel recomputes the logits and writes s*G
// (input dtype, times the fp16 pre-scale) into a C x nk block and the row shares of d scale;
// then dq_c = (sG) k and dk += (sG)^T q_c are two cuBLAS products (no atomics). fp16 s*G
// blocks are stored times an exact power of two p (pow2_prescale, as the gemm path: bound =
// s * (max|rc| + max|cc| + max|dc|)); dq is then computed in fp32 and both gradients are
// multiplied by 1/p.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "common/cuda_utils.cuh"     // SEMCOMP_MM_OUT_DTYPE, pow2_prescale, addmm_fp32_accumulate
#include "common/mma_mainloop.cuh"   // pick_blocks, pick_splits (128-row blocks)
#include "infonce/infonce.h"         // infonce_dk_accumulate_mode
#include "infonce/infonce_lse.cuh"   // FwdPartials

namespace semcomp::infonce_tc {

// One forward pass: row blocks [rb0, rb0 + nb) with `splits` column splits.
struct Pass {
  int64_t rb0, nb, splits;
};

// Returns {loss, rlse, clse} when SYM, else {loss, rlse} (fp32), as semcomp::mma::fwd;
// launch(const Pass&, FwdPartials&) runs one pass's kernel on the current stream. bn: the
// kernel's columns per tile (for the split count).
template <bool SYM, typename Launch>
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s, int64_t chunk,
                                int64_t bn, Launch&& launch) {
  using semcomp::mma_loop::kBM;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t nq = q.size(0), nk = k.size(0);
  const int64_t n_rb = semcomp::cuda::ceil_div(nq, int64_t{kBM}), n_ct = semcomp::cuda::ceil_div(nk, bn);
  // column partials of a pass: 2 fp32 per (row block, column)
  const int64_t pass = SYM ? semcomp::mma_loop::pick_blocks(chunk, n_rb, 8 * nk) : n_rb;
  TORCH_CHECK_VALUE(pass <= std::numeric_limits<int>::max(), "infonce: too many rows (", nq, ")");
  const int64_t splits =
      semcomp::mma_loop::pick_splits(pass, n_ct, semcomp::cuda::multiprocessor_count(q.device().index()));
  semcomp::infonce_lse::FwdPartials p(splits, nq, pass, nk, SYM, q.options().dtype(at::kFloat));
  for (int64_t rb0 = 0; rb0 < n_rb; rb0 += pass) {
    const int64_t nb = std::min(pass, n_rb - rb0);
    launch(Pass{rb0, nb, splits}, p);
    if constexpr (SYM) p.merge_columns(nb, stream);
  }
  return p.template finish<SYM>(s.const_data_ptr<float>(), stream);
}

#if SEMCOMP_MM_OUT_DTYPE
// What the kernel of one chunk writes to: rows [i0, i0 + c) of q, s*G row i - i0 at
// gbuf[(i - i0) * nk + j], row shares at ds_part[split * C + (i - i0)].
struct Chunk {
  int64_t i0, c;
  const float* gscale;  // the fp16 pre-scale p (device), or nullptr
  uint16_t* gbuf;
  float* ds_part;
};

// The backward from the coefficient form of infonce.h with chunks of C rows and `splits`
// column splits per chunk; launch(const Chunk&) runs the chunk's kernel on the current stream.
// Returns {dq, dk, d(logit_scale)} in q's, k's and logit_scale's dtypes.
template <bool SYM, typename Launch>
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& logit_scale,
                                 const at::Tensor& s, const at::Tensor& rcoef, const at::Tensor& dcoef,
                                 const at::Tensor& ccoef, int64_t C, int64_t splits, Launch&& launch) {
  const int64_t nq = q.size(0), nk = k.size(0), d = q.size(1);
  const auto opts = q.options().dtype(at::kFloat);
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
  for (int64_t i0 = 0; i0 < nq; i0 += C) {
    const int64_t c = std::min(C, nq - i0);
    launch(Chunk{i0, c, prescale ? gscale.const_data_ptr<float>() : nullptr,
                 static_cast<uint16_t*>(gbuf.data_ptr()), ds_part.data_ptr<float>()});
    ds_rows.narrow(0, i0, c).copy_(at::sum(ds_part.narrow(1, 0, c), 0));  // splits in order
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

}  // namespace semcomp::infonce_tc
