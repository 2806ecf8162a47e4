// Column gather (RFS): argument checks shared by every backend.
#pragma once

#include "common/checks.h"

namespace semcomp {

inline void check_gather_args(const char* op, const at::Tensor& x, const at::Tensor& index) {
  check_matrix(op, "x", x);
  check_index_vector(op, "index", index, x);
}

}  // namespace semcomp
