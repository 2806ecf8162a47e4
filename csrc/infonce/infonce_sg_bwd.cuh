// The host side of the InfoNCE backward for kernels that write s*G blocks (the "mma" and
// "wgmma" implementations): per chunk of C rows of q, the caller's kernel recomputes the logits
// and writes s*G (input dtype, times the fp16 pre-scale) into a C x nk block and the row shares
// of d scale; then dq_c = (sG) k and dk += (sG)^T q_c are two cuBLAS products (no atomics).
//
// fp16 s*G blocks are stored times an exact power of two p (pow2_prescale, as the gemm path:
// bound = s * (max|rc| + max|cc| + max|dc|)); dq is then computed in fp32 and both gradients
// are multiplied by 1/p.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/cuda_utils.cuh"  // SEMCOMP_MM_OUT_DTYPE, pow2_prescale, addmm_fp32_accumulate
#include "infonce/infonce.h"      // infonce_dk_accumulate_mode

namespace semcomp::infonce_sg {

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

}  // namespace semcomp::infonce_sg
