// InfoNCE "mma" implementation for bf16/fp16 inputs on sm_80 and newer (infonce_mma_cuda.cu):
// FlashAttention-2 style logit passes. Each CTA owns a block of rows of q and a range of
// column tiles of k; the dot-product tile is computed on the tensor cores (cp.async
// multi-stage pipeline, ldmatrix, mma.sync.m16n8k16, fp32 accumulators) and consumed in
// registers, so the logits never reach memory.
//
//   forward   row (max, sum) states online in registers per column split, column (max, sum)
//             partials per row block, S_i,i+offset; merged in a fixed order (deterministic)
//   backward  the same mainloop recomputes S bit for bit; s*G (times the fp16 pre-scale) is
//             written in the input dtype per chunk of rows, then dq = (sG) k and
//             dk += (sG)^T q_c are two cuBLAS products (no B x D atomics)
//
// The math is infonce.h's. Selected by the ops' impl argument 3 (exact) or -3 (preferred), or the
// process-wide setting "mma" (csrc/common/impl_choice.h, infonce_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace semcomp::mma {

// True when q (bf16/fp16, d > 0, on a CUDA device) can run these kernels: compute capability >= 8.0
// and a torch with the mixed-dtype GEMM overloads (mm.dtype_out, torch >= 2.8).
bool available(const at::Tensor& q);

// q (nq x d), k (nk x d): contiguous, same dtype (bf16 or fp16), one device; s: fp32 (1,) on
// the device (the logit scale; a non-positive or non-finite one poisons the LSEs with NaN).
// chunk: rows of q per column-partial pass (0: automatic; the partials of one pass take
// 8 bytes per row block of 128 rows and column). Returns {loss, rlse, clse} when sym, else
// {loss, rlse}; fp32, natural units.
std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s,
                            int64_t offset, bool sym, int64_t chunk);

// Backward from the coefficient form of infonce.h. rlse, rcoef, dcoef: fp32 (nq); clse,
// ccoef: fp32 (nk), only when sym. s: fp32 (1,) device copy of logit_scale. chunk: rows of q
// per s*G block (0: automatic). Returns {dq, dk, d(logit_scale)} in q's, k's and
// logit_scale's dtypes.
std::vector<at::Tensor> bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& logit_scale,
                            const at::Tensor& s, const at::Tensor& rlse, const at::Tensor& rcoef,
                            const at::Tensor& dcoef, const at::Tensor& clse,
                            const at::Tensor& ccoef, int64_t offset, bool sym, int64_t chunk);

}  // namespace semcomp::mma
