// Scalar math used by the CPU kernels' inner loops, written so that GCC vectorises the loops
// that call it (no libm calls, no branches, fixed-width lane accumulators).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Kernels whose inner loops should use the widest vector unit the running CPU has: GCC builds
// an AVX-512, an AVX2 and a baseline clone and picks one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SEMCOMP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEMCOMP_CLONES
#endif

namespace semcomp::cpu {

// Rows per chunk of the chunked logit GEMMs (InfoNCE, sigmoid): `requested` when > 0, else
// ~4M workspace elements (16 MB in fp32), at most 1024 rows: large GEMM blocks (fewer, bigger
// BLAS calls measured ~10% faster than 1M at N=8192; for the sigmoid backward 512 rows at
// N=8192 beat 256, as the db GEMM's K is the chunk height), still a small constant next to the
// N x N logits. The bf16/fp16 InfoNCE GEMMs (2-4x faster than fp32) ask for twice that
// (budget_log2 = 23, max_rows = 2048): the gradient GEMMs, whose K is the chunk height, were
// measured ~30% faster at 4096 rows than at 1024 (N = 4096, D = 512).
inline int64_t gemm_chunk_rows(int64_t requested, int64_t rows, int64_t cols, int budget_log2 = 22,
                               int64_t max_rows = 1024) {
  if (requested > 0) return requested < rows ? requested : rows;
  int64_t c = (int64_t{1} << budget_log2) / (cols > 1 ? cols : 1);
  c = (c < 16 ? 16 : (c > max_rows ? max_rows : c)) / 16 * 16;
  return c < rows ? c : rows;
}

// exp(x) for float to ~2 ulp, written so a loop of it vectorises (no calls, no branches):
// range reduction x = k ln2 + r, |r| <= ln2/2, a degree-6 minimax polynomial for e^r, and 2^k
// built in the exponent bits. k = round(x log2 e) by the 1.5 * 2^23 magic-number trick.
// Arguments are clamped to the normal range (results below ~1e-38 flush to that value,
// irrelevant next to the 1 every log-sum-exp contains). NaN propagates.
inline float fast_exp(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float fk = (xc * 1.44269504088896341f + kMagic) - kMagic;
  float r = xc - fk * 0.693359375f;  // ln2 split: a high part exact in float ...
  r = r - fk * -2.12194440e-4f;      // ... and the low remainder
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_k = __builtin_bit_cast(float, (static_cast<int32_t>(fk) + 127) << 23);  // C++17-safe
  const float y = p * two_k;
  return x != x ? x : y;
}

inline double fast_exp(double x) { return std::exp(x); }

// max that propagates NaN (std::max drops a NaN in its second argument). Bitwise `|`, not
// `||`: short-circuit evaluation is control flow, which stops GCC vectorising the loop.
template <typename T>
inline T nan_max(T a, T b) {
  return ((a != a) | (a > b)) ? a : b;
}

}  // namespace semcomp::cpu
