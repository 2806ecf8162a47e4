// Fused sigmoid (SigLIP) loss on the CPU (math in siglip.h): the Na x Nb logit matrix is never
// built. Rows of a are processed in chunks of C rows; a C x Nb workspace holds one block of raw
// dot products a_c b^T (a BLAS GEMM through at::mm); one fused loop per row turns it into the
// row's loss and, for gradients, the block G in place, which two more GEMMs turn into da and db.
// Extra memory: the C x Nb workspace plus O(N) per-row partials.
//
// Three entry points share the driver:
//   sigmoid_fwd      per-row losses                                  (1 GEMM per chunk)
//   sigmoid_bwd      gradients for per-row upstream gradients g_i,
//                    recomputing the logits chunk by chunk           (3 GEMMs per chunk)
//   sigmoid_fwd_bwd  the summed loss (0-d) and its gradients in one
//                    pass (g_i = 1; da, db in the accumulation dtype) (3 GEMMs per chunk)
//
// Thread mapping: GEMMs use ATen's BLAS threads; the row loops run one row per task under
// at::parallel_for. Per-row partials (loss, d scale, d bias) are summed in fixed order in
// double at the end: results do not depend on the thread count.
// fp16/bf16 inputs are converted to fp32 once (accumulation in fp32); fp64 stays fp64.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_math.h"
#include "common/impl_choice.h"
#include "siglip/siglip.h"

namespace semcomp {
namespace {

using cpu::fast_exp;

// log1p(e) for e in [0, 1], vectorisable: u = 1 + e rounded, log(u) from u = 2^k m with
// m in [1/sqrt2, sqrt2] and the series log m = 2 atanh(t), t = (m - 1)/(m + 1), |t| <= 0.172
// (5 terms: relative error < 1e-8); the rounding of 1 + e is added back as (e - (u - 1)) / u.
inline float log1p_unit(float e) {
  const float u = 1.0f + e;
  const bool big = u > 1.41421356f;
  const float m = big ? 0.5f * u : u;
  const float k = big ? 0.693147180559945f : 0.0f;
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  float p = 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  return k + 2.0f * t * p + (e - (u - 1.0f)) / u;
}
inline double log1p_unit(double e) { return std::log1p(e); }

struct RowSums {
  double loss, ds, db;
};

// One row: w[j] = <a_i, b_j> (raw dot products), z = s w + t. Returns sum_j softplus(z_ij)
// (LOSS) and, with GRAD, overwrites w[j] by g sigmoid(z_ij) and returns its sums weighted by
// w (d scale) and unweighted (d bias). Every pair is a negative here: the caller leaves the
// positive out and computes it with positive_pair().
// softplus(z) = max(z, 0) + log1p(e), sigmoid(z) = (z >= 0 ? 1 : e) / (1 + e), e = exp(-|z|):
// no overflow for any finite z; a NaN propagates through e into every output.
template <bool LOSS, bool GRAD, typename T>
inline __attribute__((always_inline)) RowSums row_body(T* w, int64_t n, T s, T t, T g) {
  T l = 0, ds = 0, db = 0;
#pragma omp simd reduction(+ : l, ds, db)
  for (int64_t j = 0; j < n; ++j) {
    const T x = w[j];
    const T z = s * x + t;
    const T e = fast_exp(-std::fabs(z));
    if constexpr (LOSS) l += (z > T(0) ? z : T(0)) + log1p_unit(e);
    if constexpr (GRAD) {
      const T r = T(1) / (T(1) + e);
      const T gj = g * (z >= T(0) ? r : e * r);
      ds += gj * x;
      db += gj;
      w[j] = gj;
    }
  }
  return {static_cast<double>(l), static_cast<double>(ds), static_cast<double>(db)};
}

SEMCOMP_CLONES RowSums row_loss(float* w, int64_t n, float s, float t) {
  return row_body<true, false>(w, n, s, t, 0.0f);
}
SEMCOMP_CLONES RowSums row_grad(float* w, int64_t n, float s, float t, float g) {
  return row_body<false, true>(w, n, s, t, g);
}
SEMCOMP_CLONES RowSums row_both(float* w, int64_t n, float s, float t, float g) {
  return row_body<true, true>(w, n, s, t, g);
}
RowSums row_loss(double* w, int64_t n, double s, double t) {
  return row_body<true, false>(w, n, s, t, 0.0);
}
RowSums row_grad(double* w, int64_t n, double s, double t, double g) {
  return row_body<false, true>(w, n, s, t, g);
}
RowSums row_both(double* w, int64_t n, double s, double t, double g) {
  return row_body<true, true>(w, n, s, t, g);
}

template <bool LOSS, bool GRAD, typename T>
RowSums row_dispatch(T* w, int64_t n, T s, T t, T g) {
  if (n <= 0) return {0, 0, 0};
  if constexpr (LOSS && GRAD) return row_both(w, n, s, t, g);
  else if constexpr (GRAD) return row_grad(w, n, s, t, g);
  else return row_loss(w, n, s, t);
}

// The positive pair, computed on its own (never as softplus(z) - z, which cancels for a
// confident positive): loss softplus(-z), G = -g sigmoid(-z).
template <bool LOSS, bool GRAD, typename T>
RowSums positive_pair(T* w, T s, T t, T g) {
  const T x = *w;
  const T z = s * x + t;
  const T e = std::exp(-std::fabs(z));
  RowSums r{0, 0, 0};
  if (LOSS) r.loss = static_cast<double>((z < T(0) ? -z : T(0)) + log1p_unit(e));
  if (GRAD) {
    const T gj = -g * ((z <= T(0) ? T(1) : e) / (T(1) + e));
    r.ds = static_cast<double>(gj * x);
    r.db = static_cast<double>(gj);
    *w = gj;
  }
  return r;
}

// ---- driver ---------------------------------------------------------------------------

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_acc(const at::Tensor& x) { return x.to(acc_type(x.scalar_type())).contiguous(); }

double read_param(const char* op, const char* name, const at::Tensor& x) {
  const double v = x.to(at::kDouble).reshape({}).item<double>();
  TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
  return v;
}

struct Outputs {
  at::Tensor loss, total, ga, gb, gs, gt;
};

// LOSS: per-row losses and their sum. GRAD: gradients for upstream g_i (grad_rows), or
// g_i = 1 when grad_rows is undefined. KEEP_ACC: da, db stay in the accumulation dtype (the
// one-pass op's gradients are scaled by the upstream gradient later, then rounded once).
template <bool LOSS, bool GRAD, typename T, bool KEEP_ACC = false>
Outputs run(const char* op, const at::Tensor& a_in, const at::Tensor& b_in,
            const at::Tensor& logit_scale, const at::Tensor& logit_bias,
            const at::Tensor& grad_rows, bool negative_only, int64_t chunk) {
  const at::Tensor a = as_acc(a_in), b = as_acc(b_in);
  const T s = static_cast<T>(read_param(op, "logit_scale", logit_scale));
  const T t = static_cast<T>(read_param(op, "logit_bias", logit_bias));
  const int64_t na = a.size(0), nb = b.size(0);
  const auto opts = a.options();
  at::Tensor g_rows;
  if (GRAD && grad_rows.defined()) g_rows = grad_rows.to(opts).contiguous();
  const T* gp = g_rows.defined() ? g_rows.data_ptr<T>() : nullptr;

  const int64_t C = cpu::gemm_chunk_rows(chunk, na, nb);
  at::Tensor ws = at::empty({C, nb}, opts);
  std::vector<RowSums> rows(na);
  Outputs out;
  if (GRAD) {
    out.ga = at::empty_like(a);
    out.gb = at::zeros_like(b);
  }
  for (int64_t i0 = 0; i0 < na; i0 += C) {
    const int64_t c = std::min(C, na - i0);
    at::Tensor block = ws.narrow(0, 0, c);
    at::addmm_out(block, block, a.narrow(0, i0, c), b.t(), /*beta=*/0, /*alpha=*/1);
    T* w = block.data_ptr<T>();
    at::parallel_for(0, c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t rr = lo; rr < hi; ++rr) {
        const int64_t i = i0 + rr;
        T* row = w + rr * nb;
        const T g = gp ? gp[i] : T(1);
        if (negative_only) {
          rows[i] = row_dispatch<LOSS, GRAD>(row, nb, s, t, g);
        } else {  // negatives left and right of the positive at column i
          const RowSums l = row_dispatch<LOSS, GRAD>(row, i, s, t, g);
          const RowSums p = positive_pair<LOSS, GRAD>(row + i, s, t, g);
          const RowSums r = row_dispatch<LOSS, GRAD>(row + i + 1, nb - i - 1, s, t, g);
          rows[i] = {l.loss + p.loss + r.loss, l.ds + p.ds + r.ds, l.db + p.db + r.db};
        }
      }
    });
    if (GRAD) {
      at::Tensor ga_block = out.ga.narrow(0, i0, c);
      at::addmm_out(ga_block, ga_block, block, b, /*beta=*/0, /*alpha=*/s);
      out.gb.addmm_(block.t(), a.narrow(0, i0, c), /*beta=*/1, /*alpha=*/s);
    }
  }
  if (LOSS) {
    out.loss = at::empty({na}, opts);
    T* l = out.loss.data_ptr<T>();
    double total = 0;
    for (int64_t i = 0; i < na; ++i) {
      l[i] = static_cast<T>(rows[i].loss);
      total += rows[i].loss;
    }
    out.total = at::full({}, total, opts);
  }
  if (GRAD) {
    double ds = 0, db = 0;
    for (int64_t i = 0; i < na; ++i) {
      ds += rows[i].ds;
      db += rows[i].db;
    }
    if (!KEEP_ACC) {
      out.ga = out.ga.to(a_in.scalar_type());
      out.gb = out.gb.to(b_in.scalar_type());
    }
    out.gs = at::full(logit_scale.sizes(), ds, logit_scale.options());
    out.gt = at::full(logit_bias.sizes(), db, logit_bias.options());
  }
  return out;
}

template <bool LOSS, bool GRAD, bool KEEP_ACC = false>
Outputs dispatch(const char* op, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                 const at::Tensor& grad_rows, bool negative_only, int64_t chunk) {
  if (a.scalar_type() == at::kDouble)
    return run<LOSS, GRAD, double, KEEP_ACC>(op, a, b, logit_scale, logit_bias, grad_rows,
                                             negative_only, chunk);
  return run<LOSS, GRAD, float, KEEP_ACC>(op, a, b, logit_scale, logit_bias, grad_rows,
                                          negative_only, chunk);
}

// ---- registered CPU entry points ------------------------------------------------------

at::Tensor sigmoid_fwd_cpu(const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                           bool negative_only, int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "sigmoid_fwd";
  check_sigmoid_args(op, a, b, logit_scale, logit_bias, negative_only);
  check_cpu_impl(op, impl);
  return dispatch<true, false>(op, a, b, logit_scale, logit_bias, at::Tensor(), negative_only,
                               chunk_size)
      .loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_bwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
    int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "sigmoid_bwd";
  check_sigmoid_args(op, a, b, logit_scale, logit_bias, negative_only);
  check_row_vector(op, "grad_rows", grad_rows, a.size(0), a);
  check_cpu_impl(op, impl);
  auto o = dispatch<false, true>(op, a, b, logit_scale, logit_bias, grad_rows, negative_only,
                                 chunk_size);
  return {o.ga, o.gb, o.gs, o.gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_fwd_bwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, bool negative_only, int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "sigmoid_fwd_bwd";
  check_sigmoid_args(op, a, b, logit_scale, logit_bias, negative_only);
  check_cpu_impl(op, impl);
  auto o = dispatch<true, true, true>(op, a, b, logit_scale, logit_bias, at::Tensor(),
                                      negative_only, chunk_size);
  return {o.total, o.ga, o.gb, o.gs, o.gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CPU, m) {
  m.impl("sigmoid_fwd", &sigmoid_fwd_cpu);
  m.impl("sigmoid_bwd", &sigmoid_bwd_cpu);
  m.impl("sigmoid_fwd_bwd", &sigmoid_fwd_bwd_cpu);
}

}  // namespace semcomp
