// Fused InfoNCE on the CPU: the N x N logit matrix is never built. Rows of q are processed in
// chunks of C rows; a C x Nk fp32 workspace holds one block of logits S_c = s q_c k^T (a BLAS
// GEMM with alpha = s), and fused loops turn it into row log-sum-exps, online column
// log-sum-exps (symmetric form) and, in the backward, the gradient block G in place, which two
// more GEMMs turn into dq and dk. Extra memory: C x Nk workspace + O(N) statistics.
//
// Precision: fp64 inputs run in fp64, everything else accumulates in fp32. bf16/fp16 inputs
// use the low-precision GEMMs of common/cpu_lowp_gemm.h where the CPU has a unit for them:
// S_c in fp32 from the 16-bit inputs (fp32 products and sums), and G rounded to the input
// dtype (scaled by a power of two into fp16's range) for the dq/dk GEMMs, which again
// accumulate and write fp32. Without such a unit the inputs are widened to fp32 first.
//
// Forward and backward obtain S from the same call (dots_block, same GEMM, same arguments)
// and the loops never multiply by s again, so the backward sees the forward's logits bit for
// bit: the compiler cannot fuse a scale multiply into a later subtraction (an FMA) in one pass
// and not in the other. That is what makes exp(S_ii - r_i) exactly 1 when a row has a single
// column (N = 1: loss and every gradient exactly zero).
//
// Thread mapping: GEMMs use ATen's BLAS threads; the row loops run one row per task under
// at::parallel_for; the column statistics run one block of kColBlock columns per task, so no
// two threads ever write the same value (deterministic, no atomics).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <limits>
#include <vector>

#include "common/cpu_lowp_gemm.h"
#include "common/cpu_math.h"
#include "common/impl_choice.h"
#include "infonce/infonce.h"

namespace semcomp {
namespace {

using cpu::fast_exp;
using cpu::nan_max;

constexpr int64_t kColBlock = 256;  // columns per task in the column statistics

// ---- fused loops (bodies are templates; float gets per-ISA clones) ---------------------
// Written as `omp simd` loops over a row with explicit reductions and a branch-free exp, so
// GCC vectorises them in every clone (-fopenmp enables the pragma; no -ffast-math needed).

// log-sum-exp over j of the logits w[j]. A NaN is skipped by the max but reaches the sum, so
// the result is NaN.
template <typename T>
inline __attribute__((always_inline)) T row_lse_body(const T* w, int64_t n) {
  T m = std::numeric_limits<T>::lowest();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = w[j] > m ? w[j] : m;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += fast_exp(w[j] - m);
  return m + std::log(sum);
}

// Online update of column statistics (running max cm, running sum cs of exp(S - cm)) over
// rows [0, rows) of a row-major block of logits with leading dimension ld, for columns
// [j0, j1). Rows outer, columns inner: each pass streams the block once.
template <typename T>
inline __attribute__((always_inline)) void col_update_body(const T* w, int64_t rows, int64_t ld,
                                                           int64_t j0, int64_t j1, T* cm,
                                                           T* cs) {
  const int64_t n = j1 - j0;
  T bm[kColBlock];
  T nm[kColBlock];
  for (int64_t j = 0; j < n; ++j) bm[j] = std::numeric_limits<T>::lowest();
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = w + r * ld + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) bm[j] = nan_max(bm[j], row[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    nm[j] = nan_max(cm[j0 + j], bm[j]);
    cs[j0 + j] *= fast_exp(cm[j0 + j] - nm[j]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = w + r * ld + j0;
    T* sum = cs + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sum[j] += fast_exp(row[j] - nm[j]);
  }
  for (int64_t j = 0; j < n; ++j) cm[j0 + j] = nm[j];
}

// Turns the logits w[j] = S_ij into G_ij in place (the diagonal term is applied by the
// caller) and returns sum_j G_ij S_ij, s times this row's share of d(logit_scale).
template <bool SYM, typename T>
inline __attribute__((always_inline)) T grad_row_body(T* w, int64_t n, T r_i, T rc_i,
                                                      const T* c, const T* cc) {
  T ds = 0;
#pragma omp simd reduction(+ : ds)
  for (int64_t j = 0; j < n; ++j) {
    const T x = w[j];
    T g = rc_i * fast_exp(x - r_i);
    if constexpr (SYM) g += cc[j] * fast_exp(x - c[j]);
    ds += g * x;
    w[j] = g;
  }
  return ds;
}

SEMCOMP_CLONES float row_lse(const float* w, int64_t n) { return row_lse_body(w, n); }
double row_lse(const double* w, int64_t n) { return row_lse_body(w, n); }
SEMCOMP_CLONES void col_update(const float* w, int64_t rows, int64_t ld, int64_t j0, int64_t j1,
                               float* cm, float* cs) {
  col_update_body(w, rows, ld, j0, j1, cm, cs);
}
void col_update(const double* w, int64_t rows, int64_t ld, int64_t j0, int64_t j1, double* cm,
                double* cs) {
  col_update_body(w, rows, ld, j0, j1, cm, cs);
}
SEMCOMP_CLONES float grad_row_sym(float* w, int64_t n, float r, float rc, const float* c,
                                  const float* cc) {
  return grad_row_body<true>(w, n, r, rc, c, cc);
}
double grad_row_sym(double* w, int64_t n, double r, double rc, const double* c,
                    const double* cc) {
  return grad_row_body<true>(w, n, r, rc, c, cc);
}
SEMCOMP_CLONES float grad_row_rect(float* w, int64_t n, float r, float rc) {
  return grad_row_body<false>(w, n, r, rc, static_cast<const float*>(nullptr),
                              static_cast<const float*>(nullptr));
}
double grad_row_rect(double* w, int64_t n, double r, double rc) {
  return grad_row_body<false>(w, n, r, rc, static_cast<const double*>(nullptr),
                              static_cast<const double*>(nullptr));
}

// One row of G, times `scale` (a power of two: exact), rounded to bf16 / fp16 bits for the
// low-precision dq/dk GEMMs.
SEMCOMP_CLONES void narrow_row_bf16(const float* w, int64_t n, float scale, uint16_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = cpu::to_bf16_bits(w[j] * scale);
}
SEMCOMP_CLONES void narrow_row_f16(const float* w, int64_t n, float scale, uint16_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = c10::detail::fp16_ieee_from_fp32_value(w[j] * scale);
}

// ---- drivers ------------------------------------------------------------------------

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_acc(const at::Tensor& x) { return x.to(acc_type(x.scalar_type())).contiguous(); }

double read_scale(const char* op, const at::Tensor& logit_scale) {
  const double s = logit_scale.to(at::kDouble).reshape({}).item<double>();
  check_scale_value(op, s);
  return s;
}

// The GEMM operands: q and k either in their own 16-bit dtype for the low-precision GEMMs
// (lowp set) or widened to the accumulation dtype; `acc` is the dtype of S, G and the
// statistics. bf16 (aten_bf16): dq comes from ATen's bf16 GEMM (oneDNN, AMX; 2-3x faster than
// MKL's fp32-output GEMM on 2 Sapphire Rapids cores), which accumulates in fp32 and rounds
// once to bf16, dq's own dtype: the same result as an fp32 dq rounded at the end. S keeps its
// fp32 output (rounding S to bf16 would put bf16's error into every logit), and dk, a sum over
// the chunks, its fp32 accumulation.
struct Operands {
  at::Tensor q, k;
  cpu::LowpGemmFn lowp = nullptr;
  bool aten_bf16 = false;
  at::TensorOptions acc;
  int64_t chunk_rows = 0;  // rows per chunk: the same in forward and backward (same S)
};

Operands operands(const at::Tensor& q_in, const at::Tensor& k_in, int64_t chunk) {
  Operands o;
  const int64_t nq = q_in.size(0), nk = k_in.size(0);
  const int64_t C = cpu::gemm_chunk_rows(chunk, nq, nk, 23, 2048);
  // D = 0 (or no rows) stays on the widened path: BLAS refuses leading dimensions < 1.
  if (q_in.size(1) > 0 && nq > 0 && nk > 0 && cpu::fits_lp64({nq, nk, q_in.size(1), C * nk}))
    o.lowp = cpu::lowp_gemm(q_in.scalar_type());
  o.chunk_rows = o.lowp != nullptr ? C : cpu::gemm_chunk_rows(chunk, nq, nk);
  if (o.lowp != nullptr) {
    o.q = q_in.contiguous();
    o.k = k_in.contiguous();
    o.aten_bf16 = q_in.scalar_type() == at::kBFloat16;
  } else {
    o.q = as_acc(q_in);
    o.k = as_acc(k_in);
  }
  o.acc = q_in.options().dtype(acc_type(q_in.scalar_type()));
  return o;
}

// Logits S = s <q_i, k_j> of rows [i0, i0 + c) of q with all of k into the first c rows of
// ws. The only place S is computed: forward and backward call it with the same arguments.
at::Tensor dots_block(const Operands& o, int64_t i0, int64_t c, double s, at::Tensor& ws) {
  at::Tensor block = ws.narrow(0, 0, c);
  if (o.lowp != nullptr) {
    const int d = static_cast<int>(o.q.size(1)), nk = static_cast<int>(o.k.size(0));
    const auto* qp = static_cast<const uint16_t*>(o.q.data_ptr()) + i0 * d;
    o.lowp(cpu::kRowMajor, cpu::kNoTrans, cpu::kTrans, static_cast<int>(c), nk, d,
           static_cast<float>(s), qp, d, o.k.data_ptr(), d, 0.0f, block.data_ptr<float>(), nk);
  } else {
    at::addmm_out(block, block, o.q.narrow(0, i0, c), o.k.t(), /*beta=*/0, /*alpha=*/s);
  }
  return block;
}

// Returns (loss, row_lse, col_lse); col_lse is empty for the rectangular form.
template <bool SYM, typename T>
std::vector<at::Tensor> fwd_impl(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                                 const at::Tensor& logit_scale, int64_t offset, int64_t chunk) {
  const Operands o = operands(q_in, k_in, chunk);
  const T s = static_cast<T>(read_scale(op, logit_scale));
  const int64_t nq = q_in.size(0), nk = k_in.size(0);
  const int64_t C = o.chunk_rows;
  const auto opts = o.acc;
  at::Tensor ws = at::empty({C, nk}, opts);
  at::Tensor loss = at::empty({nq}, opts), rlse = at::empty({nq}, opts);
  at::Tensor diag = at::empty({nq}, opts);
  at::Tensor cmax, csum;
  if constexpr (SYM) {
    cmax = at::full({nk}, std::numeric_limits<T>::lowest(), opts);
    csum = at::zeros({nk}, opts);
  }
  T* r = rlse.data_ptr<T>();
  T* d = diag.data_ptr<T>();
  for (int64_t i0 = 0; i0 < nq; i0 += C) {
    const int64_t c = std::min(C, nq - i0);
    const T* w = dots_block(o, i0, c, static_cast<double>(s), ws).data_ptr<T>();
    at::parallel_for(0, c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t rr = lo; rr < hi; ++rr) {
        r[i0 + rr] = row_lse(w + rr * nk, nk);
        d[i0 + rr] = w[rr * nk + i0 + rr + offset];
      }
    });
    if constexpr (SYM) {
      T* cm = cmax.data_ptr<T>();
      T* cs = csum.data_ptr<T>();
      const int64_t nblocks = (nk + kColBlock - 1) / kColBlock;
      at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t bi = lo; bi < hi; ++bi)
          col_update(w, c, nk, bi * kColBlock, std::min(nk, (bi + 1) * kColBlock), cm, cs);
      });
    }
  }
  T* l = loss.data_ptr<T>();
  if constexpr (SYM) {
    at::Tensor clse = at::empty({nk}, opts);
    T* cl = clse.data_ptr<T>();
    const T* cm = cmax.data_ptr<T>();
    const T* cs = csum.data_ptr<T>();
    for (int64_t j = 0; j < nk; ++j) cl[j] = cm[j] + std::log(cs[j]);
    for (int64_t i = 0; i < nq; ++i) l[i] = T(0.5) * (r[i] + cl[i]) - d[i];
    return {loss, rlse, clse};
  } else {
    for (int64_t i = 0; i < nq; ++i) l[i] = r[i] - d[i];
    return {loss, rlse};
  }
}

// Power of two that brings the largest |G_ij| into [1, 2) for the 16-bit copy of G (fp16
// keeps ~11 bits only between 6e-5 and 65504; G_ij can be ~1/N^2). |G_ij| <= |row_coef_i| +
// |col_coef_j| + |diag_coef_i| because exp(S_ij - r_i) and exp(S_ij - c_j) are <= 1.
float g_scale(const at::Tensor& rcoef, const at::Tensor& ccoef, const at::Tensor& dcoef) {
  double bound = rcoef.abs().max().item<double>() + dcoef.abs().max().item<double>();
  if (ccoef.defined()) bound += ccoef.abs().max().item<double>();
  if (!(bound > 0) || !std::isfinite(bound)) return 1.0f;
  const int e = std::max(-100, std::min(100, std::ilogb(bound)));
  return std::ldexp(1.0f, -e);
}

// dq_c = s G_c k and dk += s G_c^T q_c for one chunk of rows [i0, i0 + c); G_c (fp32, in ws)
// holds the diagonal term already. The low-precision path reads G's 16-bit copy gb (scaled
// by gscale, undone in alpha); dq and dk accumulate in fp32 either way (dq rounded once to
// bf16 on the aten_bf16 path, where gq is bf16).
void grad_gemms(const Operands& o, int64_t i0, int64_t c, double s, const at::Tensor& block,
                const at::Tensor& gb, float gscale, at::Tensor& gq, at::Tensor& gk) {
  if (o.lowp != nullptr) {
    const int d = static_cast<int>(o.q.size(1)), nk = static_cast<int>(o.k.size(0));
    const float alpha = static_cast<float>(s / gscale);
    const auto* qp = static_cast<const uint16_t*>(o.q.data_ptr()) + i0 * d;
    if (o.aten_bf16) {
      at::Tensor gq_block = gq.narrow(0, i0, c);
      at::addmm_out(gq_block, gq_block, gb.narrow(0, 0, c), o.k, /*beta=*/0, /*alpha=*/alpha);
    } else {
      o.lowp(cpu::kRowMajor, cpu::kNoTrans, cpu::kNoTrans, static_cast<int>(c), d, nk, alpha,
             gb.data_ptr(), nk, o.k.data_ptr(), d, 0.0f, gq.data_ptr<float>() + i0 * d, d);
    }
    o.lowp(cpu::kRowMajor, cpu::kTrans, cpu::kNoTrans, nk, d, static_cast<int>(c), alpha,
           gb.data_ptr(), nk, qp, d, 1.0f, gk.data_ptr<float>(), d);
    return;
  }
  at::Tensor gq_block = gq.narrow(0, i0, c);
  at::addmm_out(gq_block, gq_block, block, o.k, /*beta=*/0, /*alpha=*/s);
  gk.addmm_(block.t(), o.q.narrow(0, i0, c), /*beta=*/1, /*alpha=*/s);
}

template <bool SYM, typename T>
std::vector<at::Tensor> bwd_impl(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                                 const at::Tensor& logit_scale, const at::Tensor& rlse_in,
                                 const at::Tensor& clse_in, const at::Tensor& rcoef_in,
                                 const at::Tensor& ccoef_in, const at::Tensor& dcoef_in,
                                 int64_t offset, int64_t chunk) {
  const Operands o = operands(q_in, k_in, chunk);
  const T s = static_cast<T>(read_scale(op, logit_scale));
  const int64_t nq = q_in.size(0), nk = k_in.size(0), dim = q_in.size(1);
  const auto opts = o.acc;
  const at::Tensor rlse = rlse_in.to(opts).contiguous(), rcoef = rcoef_in.to(opts).contiguous();
  const at::Tensor dcoef = dcoef_in.to(opts).contiguous();
  at::Tensor clse, ccoef;
  if constexpr (SYM) {
    clse = clse_in.to(opts).contiguous();
    ccoef = ccoef_in.to(opts).contiguous();
  }
  const int64_t C = o.chunk_rows;
  at::Tensor ws = at::empty({C, nk}, opts);
  at::Tensor gq = at::empty({nq, dim}, o.aten_bf16 ? q_in.options() : opts);
  at::Tensor gk = at::zeros({nk, dim}, opts);
  at::Tensor gb;  // G's 16-bit copy (low-precision path)
  float gscale = 1.0f;
  const bool bf16 = q_in.scalar_type() == at::kBFloat16;
  if (o.lowp != nullptr) {
    gb = at::empty({C, nk}, q_in.options());
    gscale = g_scale(rcoef, ccoef, dcoef);
  }
  std::vector<T> ds_rows(nq);
  const T* r = rlse.data_ptr<T>();
  const T* rc = rcoef.data_ptr<T>();
  const T* dc = dcoef.data_ptr<T>();
  for (int64_t i0 = 0; i0 < nq; i0 += C) {
    const int64_t c = std::min(C, nq - i0);
    at::Tensor block = dots_block(o, i0, c, static_cast<double>(s), ws);
    T* w = block.data_ptr<T>();
    at::parallel_for(0, c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t rr = lo; rr < hi; ++rr) {
        const int64_t i = i0 + rr;
        T* row = w + rr * nk;
        const T pos = row[i + offset];  // S_{i, i+offset}, as the forward read it
        T ds;
        if constexpr (SYM) {
          ds = grad_row_sym(row, nk, r[i], rc[i], clse.data_ptr<T>(), ccoef.data_ptr<T>());
        } else {
          ds = grad_row_rect(row, nk, r[i], rc[i]);
        }
        row[i + offset] -= dc[i];
        // sum_j G_ij <q_i, k_j> = (sum_j G_ij S_ij) / s
        ds_rows[i] = (ds - dc[i] * pos) / s;
        if constexpr (std::is_same_v<T, float>) {
          if (gb.defined()) {
            auto* out = static_cast<uint16_t*>(gb.data_ptr()) + rr * nk;
            bf16 ? narrow_row_bf16(row, nk, gscale, out) : narrow_row_f16(row, nk, gscale, out);
          }
        }
      }
    });
    grad_gemms(o, i0, c, static_cast<double>(s), block, gb, gscale, gq, gk);
  }
  T ds = 0;
  for (int64_t i = 0; i < nq; ++i) ds += ds_rows[i];
  at::Tensor gs = at::full(logit_scale.sizes(), static_cast<double>(ds),
                           logit_scale.options());
  return {gq.to(q_in.scalar_type()), gk.to(k_in.scalar_type()), gs};
}

// ---- registered CPU entry points ------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cpu(const at::Tensor& a,
                                                               const at::Tensor& b,
                                                               const at::Tensor& logit_scale,
                                                               int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "infonce_fwd";
  check_infonce_pair(op, a, b, logit_scale, /*symmetric=*/true, 0);
  check_cpu_impl(op, impl);
  auto out = a.scalar_type() == at::kDouble
                 ? fwd_impl<true, double>(op, a, b, logit_scale, 0, chunk_size)
                 : fwd_impl<true, float>(op, a, b, logit_scale, 0, chunk_size);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_coef,
    const at::Tensor& col_coef, const at::Tensor& diag_coef, int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "infonce_bwd";
  check_infonce_bwd(op, a, b, logit_scale, /*symmetric=*/true, 0,
                    {{"row_lse", &row_lse}, {"col_lse", &col_lse}, {"row_coef", &row_coef},
                     {"col_coef", &col_coef}, {"diag_coef", &diag_coef}});
  check_cpu_impl(op, impl);
  auto out = a.scalar_type() == at::kDouble
                 ? bwd_impl<true, double>(op, a, b, logit_scale, row_lse, col_lse, row_coef,
                                          col_coef, diag_coef, 0, chunk_size)
                 : bwd_impl<true, float>(op, a, b, logit_scale, row_lse, col_lse, row_coef,
                                         col_coef, diag_coef, 0, chunk_size);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> infonce_rect_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& logit_scale,
                                                        int64_t offset, int64_t chunk_size,
                                                        int64_t impl) {
  constexpr const char* op = "infonce_rect_fwd";
  check_infonce_pair(op, q, k, logit_scale, /*symmetric=*/false, offset);
  check_cpu_impl(op, impl);
  auto out = q.scalar_type() == at::kDouble
                 ? fwd_impl<false, double>(op, q, k, logit_scale, offset, chunk_size)
                 : fwd_impl<false, float>(op, q, k, logit_scale, offset, chunk_size);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_rect_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& logit_scale,
    const at::Tensor& lse, const at::Tensor& row_coef, const at::Tensor& diag_coef, int64_t offset,
    int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "infonce_rect_bwd";
  check_infonce_bwd(op, q, k, logit_scale, /*symmetric=*/false, offset,
                    {{"lse", &lse}, {"row_coef", &row_coef}, {"diag_coef", &diag_coef}});
  check_cpu_impl(op, impl);
  const at::Tensor none;
  auto out = q.scalar_type() == at::kDouble
                 ? bwd_impl<false, double>(op, q, k, logit_scale, lse, none, row_coef, none,
                                           diag_coef, offset, chunk_size)
                 : bwd_impl<false, float>(op, q, k, logit_scale, lse, none, row_coef, none,
                                          diag_coef, offset, chunk_size);
  return {out[0], out[1], out[2]};
}

}  // namespace

std::vector<std::string> infonce_cpu_lowp_dtypes() {
  std::vector<std::string> out;
  if (cpu::lowp_gemm(at::kBFloat16) != nullptr) out.emplace_back("bfloat16");
  if (cpu::lowp_gemm(at::kHalf) != nullptr) out.emplace_back("float16");
  return out;
}

TORCH_LIBRARY_IMPL(semcomp, CPU, m) {
  m.impl("infonce_fwd", &infonce_fwd_cpu);
  m.impl("infonce_bwd", &infonce_bwd_cpu);
  m.impl("infonce_rect_fwd", &infonce_rect_fwd_cpu);
  m.impl("infonce_rect_bwd", &infonce_rect_bwd_cpu);
}

}  // namespace semcomp
