// SigLIP "wgmma" implementation for bf16/fp16 inputs on sm_90a (H100/H200;
// siglip_wgmma_cuda.cu): the logit dots of a chunk of rows of a against all of b on the Hopper
// mainloop InfoNCE's wgmma kernels use (common/wgmma_mainloop.cuh: TMA loads, an mbarrier
// pipeline between a producer and two consumer warpgroups, wgmma.mma_async), consumed in
// registers by the sigmoid epilogue of the mma implementation (siglip/siglip_mma_epilogue.cuh)
// under the host driver of siglip/siglip_driver.cuh. Same arguments, results and guarantees as
// semcomp::siglip_mma (the dots differ from mma.sync's in the last bits).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "siglip/siglip_mma.h"  // Outputs

namespace semcomp::siglip_wgmma {

// True when (a, b) can run these kernels: the rules of InfoNCE's wgmma::available() (a build
// with the CuTe headers and sm_90a code, compute capability 9.0, torch >= 2.8; a and b CUDA,
// contiguous, both bf16 or both fp16, d % 8 == 0, 16-byte aligned bases, 1 <= rows < 2^31).
// False in the host emulator (it cannot run wgmma/TMA/mbarrier). run() raises otherwise.
bool available(const at::Tensor& a, const at::Tensor& b);

// As siglip_mma::run.
siglip_mma::Outputs run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
                        const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
                        bool loss, bool grad, int64_t chunk, bool keep_acc);

}  // namespace semcomp::siglip_wgmma
