// Fused sigmoid (SigLIP) loss: argument checks shared by the CPU and CUDA front ends.
//
// a: Na x D, b: Nb x D, s = logit_scale, t = logit_bias (one-element tensors):
//   z_ij = s <a_i, b_j> + t,   y_ij = +1 if j == i (positive pair) else -1
//   loss_i = sum_j softplus(-y_ij z_ij)              (= -log sigmoid(y_ij z_ij))
//          = sum_j softplus(z_ij) - [positive] z_ii  (softplus(-z) = softplus(z) - z)
// negative_only: every pair is a negative (blocks against another rank's b; Nb may differ).
// Otherwise Na == Nb and the diagonal holds the positives.
// Backward with per-row upstream gradients g_i:
//   G_ij = g_i (sigmoid(z_ij) - [j == i, positive])
//   da = s G b,  db = s G^T a,  ds = sum_ij G_ij <a_i, b_j>,  dt = sum_ij G_ij
// Neither z nor G is ever materialised beyond one chunk of rows. Every input check raises
// TORCH_CHECK_VALUE (ValueError in Python).
#pragma once

#include "common/checks.h"

namespace semcomp {

// A one-element floating tensor (shape [] or [1]) on like's device.
inline void check_scalar_param(const char* op, const char* name, const at::Tensor& x,
                               const at::Tensor& like) {
  TORCH_CHECK_VALUE(x.numel() == 1 && x.dim() <= 1, op, ": ", name,
              " must be a one-element tensor of shape [] or [1], got shape ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating, got ",
              x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", x.device());
}

inline void check_sigmoid_args(const char* op, const at::Tensor& a, const at::Tensor& b,
                               const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                               bool negative_only) {
  check_matrix(op, "a", a);
  check_matrix(op, "b", b);
  check_same_device_dtype(op, "a", a, "b", b);
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), op,
              ": a and b must have the same feature dimension D, got ", a.size(1), " and ",
              b.size(1));
  TORCH_CHECK_VALUE(a.size(0) > 0, op, ": empty batch: a has 0 rows");
  TORCH_CHECK_VALUE(b.size(0) > 0, op, ": empty batch: b has 0 rows");
  if (!negative_only) {
    TORCH_CHECK_VALUE(a.size(0) == b.size(0), op,
                ": a and b must have the same number of rows N (row i of a pairs with row i of "
                "b) unless negative_only=True, got ", a.size(0), " and ", b.size(0));
  }
  check_scalar_param(op, "logit_scale", logit_scale, a);
  check_scalar_param(op, "logit_bias", logit_bias, a);
}

}  // namespace semcomp
