// Index validation on the CPU: one pass that converts to int64 and names the first bad entry.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace semcomp::cpu {

// Returns idx as a contiguous int64 tensor; every entry must lie in [0, bound).
inline at::Tensor checked_index(const char* op, const char* name, const at::Tensor& idx,
                                int64_t bound) {
  at::Tensor out = idx.to(at::kLong).contiguous();
  const int64_t* p = out.data_ptr<int64_t>();
  const int64_t n = out.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < bound, op, ": ", name, "[", i, "] = ", p[i],
                " is out of range [0, ", bound, ")");
  }
  return out;
}

}  // namespace semcomp::cpu
