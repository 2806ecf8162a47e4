// SigLIP "mma" implementation for bf16/fp16 inputs on sm_80 and newer (siglip_mma_cuda.cu):
// the logits z = s <a_i, b_j> + t are computed per tile on the tensor cores by the mainloop
// InfoNCE's mma kernels use (common/mma_mainloop.cuh) and consumed in registers by a sigmoid
// epilogue (siglip/siglip_mma_epilogue.cuh): row losses, and for the backward s*G in the
// input dtype per chunk of rows for the two cuBLAS products, with row shares of d scale and
// d bias. The math is siglip.h's.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace semcomp::siglip_mma {

// True when a (and b) can run these kernels: bf16/fp16, d > 0, compute capability >= 8.0,
// torch >= 2.8 (mm.dtype_out).
bool available(const at::Tensor& a);

struct Outputs {
  at::Tensor loss, total, ga, gb, gs, gt;
};

// As siglip_cuda.cu's run<LOSS, GRAD, T>: loss (Na,) fp32 and total (0-d) when loss; with
// grad: ga, gb (fp32 when keep_acc, else the inputs' dtypes), gs, gt (logit_scale's and
// logit_bias's dtypes). grad_rows: fp32-convertible (Na,) upstream gradients, or undefined
// for ones. chunk: rows of a per s*G block (0: automatic).
Outputs run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
            const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
            bool loss, bool grad, int64_t chunk, bool keep_acc);

}  // namespace semcomp::siglip_mma
