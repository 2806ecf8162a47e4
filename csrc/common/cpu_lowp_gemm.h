// bf16/fp16 GEMMs with fp32 products and fp32 outputs on the CPU, and the fp32 -> bf16/fp16
// narrowing loops that feed them.
//
// ATen has no CPU kernel for mm.dtype/addmm.dtype (an fp32 result from bf16 inputs), and a
// bf16 at::mm rounds every product to bf16 (~3 significant digits: |S| ~ 14 gives an error of
// ~0.03 in a logit). The MKL that torch's x86 builds link statically exports
// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32: low-precision inputs, fp32 accumulation,
// fp32 C with alpha/beta (AMX or AVX512-BF16 kernels; ~1.3-1.8 TFLOP/s on 2 Sapphire Rapids
// cores against ~0.2 for fp32). They are looked up at run time in the loaded libtorch_cpu, so a
// torch build without them (aarch64, a non-MKL BLAS) loads and takes the fp32 path. The CPU
// must also have a native unit for the type (otherwise MKL emulates it, slower than fp32).
#pragma once

#include <ATen/core/Tensor.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace semcomp::cpu {

// cblas_gemm_{bf16bf16,f16f16}f32 with LP64 integers, row-major (layout 101), transposes
// 111 (no) / 112 (yes): C = alpha op(A) op(B) + beta C, A and B as raw 16-bit values.
using LowpGemmFn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const void* a, int lda, const void* b, int ldb, float beta, float* c,
                            int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

namespace detail {
inline void* torch_cpu_symbol(const char* name) {
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* sym = lib != nullptr ? dlsym(lib, name) : nullptr;
  if (lib != nullptr) dlclose(lib);  // only drops the reference RTLD_NOLOAD added
  return sym;
}

inline bool cpu_has_unit(at::ScalarType t) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (t == at::kBFloat16) return __builtin_cpu_supports("avx512bf16");
  if (t == at::kHalf) return __builtin_cpu_supports("avx512fp16");
#endif
  (void)t;
  return false;
}

inline LowpGemmFn resolve(at::ScalarType t) {
  if (!cpu_has_unit(t)) return nullptr;
  return reinterpret_cast<LowpGemmFn>(
      torch_cpu_symbol(t == at::kBFloat16 ? "cblas_gemm_bf16bf16f32" : "cblas_gemm_f16f16f32"));
}
}  // namespace detail

// The fp32-output GEMM for bf16 or fp16 inputs, or nullptr (any other dtype, no such GEMM in
// this torch, no native unit on this CPU, or SEMCOMP_CPU_LOWP_GEMM=0 in the environment:
// tests compare both paths). Resolved once per dtype; the variable is read on every call.
inline LowpGemmFn lowp_gemm(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return nullptr;
  const char* env = std::getenv("SEMCOMP_CPU_LOWP_GEMM");
  if (env != nullptr && std::strcmp(env, "0") == 0) return nullptr;
  static const LowpGemmFn bf16 = detail::resolve(at::kBFloat16);
  static const LowpGemmFn f16 = detail::resolve(at::kHalf);
  return t == at::kBFloat16 ? bf16 : f16;
}

// Whether a GEMM of these extents fits the LP64 integer arguments.
inline bool fits_lp64(std::initializer_list<int64_t> extents) {
  for (int64_t e : extents)
    if (e > std::numeric_limits<int>::max()) return false;
  return true;
}

// fp32 -> bf16 bits, round to nearest even; a NaN stays a quiet NaN (without the select,
// a NaN whose payload sits in the low bits would round to Inf). Branch-free: loops vectorise.
inline uint16_t to_bf16_bits(float x) {
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return x != x ? uint16_t{0x7fc0} : static_cast<uint16_t>(r);
}

}  // namespace semcomp::cpu
