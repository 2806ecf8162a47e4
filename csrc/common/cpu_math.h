// Scalar math used by the CPU kernels' inner loops, written so that GCC vectorises the loops
// that call it (no libm calls, no branches, fixed-width lane accumulators).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace semcomp::cpu {

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
