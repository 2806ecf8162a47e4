// InfoNCE "wgmma" implementation for bf16/fp16 inputs on sm_90a (H100/H200;
// infonce_wgmma_cuda.cu): the mma implementation's passes (infonce_mma.h) with a Hopper
// mainloop, wgmma.mma_async fed by TMA loads through an mbarrier pipeline (producer and
// consumer warpgroups, CUTLASS/CuTe headers), and the same epilogues
// (infonce/infonce_mma_epilogue.cuh). Same arguments, results and guarantees as semcomp::mma.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace semcomp::wgmma {

// True when (q, k) can run these kernels: a build with the CuTe headers (SEMCOMP_HAVE_CUTE)
// whose architecture list has 90a, a device of compute capability 9.0, torch >= 2.8; q and k
// CUDA, contiguous, both bf16 or both fp16, with d % 8 == 0 and 16-byte aligned bases (the TMA
// rules: 16-byte row strides and addresses), 1 <= rows < 2^31 (int32 TMA coordinates).
// False in the host emulator (it cannot run wgmma/TMA/mbarrier). fwd/bwd raise otherwise.
bool available(const at::Tensor& q, const at::Tensor& k);

// As semcomp::mma::fwd and semcomp::mma::bwd. bwd's row chunks are `chunk` rounded up to a
// multiple of 128 rows (the forward's row blocks, so each dot tile is recomputed bit for bit).
std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& s,
                            int64_t offset, bool sym, int64_t chunk);
std::vector<at::Tensor> bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& logit_scale,
                            const at::Tensor& s, const at::Tensor& rlse, const at::Tensor& rcoef,
                            const at::Tensor& dcoef, const at::Tensor& clse,
                            const at::Tensor& ccoef, int64_t offset, bool sym, int64_t chunk);

}  // namespace semcomp::wgmma
