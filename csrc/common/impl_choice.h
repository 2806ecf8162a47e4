// The ops' `impl` argument (schemas in registration.cpp): which CUDA implementation computes
// the logits of InfoNCE (infonce_*) and SigLIP (sigmoid_*) for one call.
//
//   0             the default: InfoNCE follows the process-wide setting
//                 (semcomp_ext.set_infonce_cuda_impl, infonce_cuda_impl()), SigLIP runs gemm;
//                 an implementation that cannot take the inputs falls back to gemm
//   1 gemm, 2 tile, 3 mma, 4 wgmma
//                 exactly that implementation: a ValueError naming it and the reason when it
//                 cannot run these inputs (a CPU tensor, fp32/fp64, a device or build without it)
//   -1 .. -4      that implementation where it can run these inputs, else gemm (a preference:
//                 what the Python API passes after resolving "auto" from the measured table,
//                 semcomp_ext/kernel_choice.py)
//
// The CPU kernels have one implementation: they run it for 0 and every preference, and reject
// an exact request (1..4) with a ValueError. The choice never changes the math (infonce.h,
// siglip.h); the backward must get the forward's impl so that it recomputes the same logits
// (semcomp_ext/_ops.py saves it).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>

namespace semcomp {

enum CudaImpl : int { kImplDefault = 0, kImplGemm = 1, kImplTile = 2, kImplMma = 3, kImplWgmma = 4 };
constexpr int kImplCount = 5;

inline const char* impl_name(int impl) {
  static const char* const names[kImplCount] = {"auto", "gemm", "tile", "mma", "wgmma"};
  const int i = std::abs(impl);
  return i < kImplCount ? names[i] : "?";
}

// impl in [-4, 4].
inline void check_impl_range(const char* op, int64_t impl) {
  TORCH_CHECK_VALUE(impl > -kImplCount && impl < kImplCount, op,
                    ": impl must be 0 (default), 1 gemm, 2 tile, 3 mma, 4 wgmma, or minus one of "
                    "them (a preference), got ", impl);
}

// The CPU kernels: 0 and preferences run the CPU implementation; an exact request is refused.
inline void check_cpu_impl(const char* op, int64_t impl) {
  check_impl_range(op, impl);
  TORCH_CHECK_VALUE(impl <= 0, op, ": impl=", impl, " (", impl_name(static_cast<int>(impl)),
                    ") is a CUDA implementation; CPU tensors take impl=0 or a preference "
                    "(-1..-4), which run the CPU kernels' one implementation");
}

}  // namespace semcomp
