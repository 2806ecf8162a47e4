// Segment mean (centroids): argument checks shared by every backend.
#pragma once

#include <optional>

#include "common/checks.h"

namespace semcomp {

inline void check_segment_args(const char* op, const at::Tensor& x, const at::Tensor& ids,
                               int64_t num_groups, const std::optional<at::Tensor>& features) {
  check_matrix(op, "x", x);
  check_index_vector(op, "ids", ids, x);
  TORCH_CHECK_VALUE(ids.size(0) == x.size(0), op, ": ids must have one entry per row of x (", x.size(0),
              "), got ", ids.size(0));
  TORCH_CHECK_VALUE(num_groups > 0, op, ": num_groups must be >= 1, got ", num_groups);
  if (features.has_value()) check_index_vector(op, "features", *features, x);
}

inline void check_segment_bwd_args(const char* op, const at::Tensor& grad, const at::Tensor& ids,
                                   const at::Tensor& counts, int64_t dim,
                                   const std::optional<at::Tensor>& features) {
  check_matrix(op, "grad", grad);
  check_index_vector(op, "ids", ids, grad);
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == grad.size(0), op,
              ": counts must have shape (", grad.size(0), ",), got ", counts.sizes());
  TORCH_CHECK_VALUE(counts.scalar_type() == at::kLong, op, ": counts must be int64, got ",
              counts.scalar_type());
  TORCH_CHECK_VALUE(dim >= 0, op, ": dim must be >= 0, got ", dim);
  const int64_t k = features.has_value() ? features->size(0) : dim;
  if (features.has_value()) check_index_vector(op, "features", *features, grad);
  TORCH_CHECK_VALUE(grad.size(1) == k, op, ": grad must have ", k, " columns, got ", grad.size(1));
}

}  // namespace semcomp
