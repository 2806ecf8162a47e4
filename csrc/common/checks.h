// Named argument checks shared by every backend. Each message starts with the op name and
// names the argument and the offending value, e.g.
//   "infonce_fwd: a must be 2-D (N, D), got a 3-D tensor of shape [2, 3, 4]".
// Value checks that need the data (ids in range, logit_scale > 0) live in the kernels,
// which read the data anyway.
// Every check on the caller's input uses TORCH_CHECK_VALUE, which Python sees as ValueError:
// the same exception type the Python API raises for bad shapes, dtypes, devices and values
// (TypeError there is kept for arguments that are not tensors at all). RuntimeError is left
// for failures that are not the caller's input (CUDA errors, allocation).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace semcomp {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// x must be a 2-D floating tensor (float32/float64/bfloat16/float16).
inline void check_matrix(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": ", name, " must be 2-D (N, D), got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
}

inline void check_same_device_dtype(const char* op, const char* name_a, const at::Tensor& a,
                                    const char* name_b, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " and ", name_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// A 1-D integer index tensor (int64 or int32) on the same device as `like`.
inline void check_index_vector(const char* op, const char* name, const at::Tensor& idx,
                               const at::Tensor& like) {
  TORCH_CHECK_VALUE(idx.dim() == 1, op, ": ", name, " must be 1-D, got a ", idx.dim(),
              "-D tensor of shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op, ": ", name,
              " must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", idx.device());
}

// A per-row vector of length n (coefficients, log-sum-exps), floating, same device as `like`.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& v, int64_t n,
                             const at::Tensor& like) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == n, op, ": ", name, " must have shape (", n,
              ",), got ", v.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(v.scalar_type()), op, ": ", name, " must be floating, got ",
              v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", v.device());
}

// logit_scale: a floating tensor with exactly one element (shape [] or [1]).
inline void check_scale(const char* op, const at::Tensor& s, const at::Tensor& like) {
  TORCH_CHECK_VALUE(s.numel() == 1 && s.dim() <= 1, op,
              ": logit_scale must be a one-element tensor of shape [] or [1], got shape ",
              s.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(s.scalar_type()), op, ": logit_scale must be floating, got ",
              s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == like.device(), op, ": logit_scale must be on ", like.device(),
              ", got ", s.device());
}

inline void check_scale_value(const char* op, double s) {
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, op,
              ": logit_scale must be finite and > 0 (it is 1/temperature), got ", s);
}

}  // namespace semcomp
