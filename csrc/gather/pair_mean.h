// Row-aligned mean over M modalities with the RFS column gather fused into the read, and a
// per-row all-finite flag over every column of every modality (the pairs mode of offline
// compression reads each row once):
//   out[i, c]  = (((zs[0][i, f[c]] + zs[1][i, f[c]]) + ...) + zs[M-1][i, f[c]]) / M
//   finite[i]  = every zs[m][i, j], j in [0, D), is finite
// in the accumulation dtype (fp32; fp64 for fp64 inputs), summed in modality order and then
// divided by M: the same rounding as gathering, adding in place and dividing, on every backend.
#pragma once

#include <c10/util/Optional.h>

#include "common/checks.h"

namespace semcomp {

inline void check_pair_mean_args(const char* op, at::TensorList zs, const c10::optional<at::Tensor>& features) {
  TORCH_CHECK_VALUE(!zs.empty(), op, ": zs must hold at least one (N, D) tensor");
  for (size_t m = 0; m < zs.size(); ++m) {
    const std::string name = "zs[" + std::to_string(m) + "]";
    check_matrix(op, name.c_str(), zs[m]);
    TORCH_CHECK_VALUE(zs[m].sizes() == zs[0].sizes() && zs[m].scalar_type() == zs[0].scalar_type() &&
                          zs[m].device() == zs[0].device(),
                      op, ": ", name, " must match zs[0] in shape, dtype and device, got ", zs[m].sizes(), " ",
                      zs[m].scalar_type(), " ", zs[m].device(), " vs ", zs[0].sizes(), " ", zs[0].scalar_type(), " ",
                      zs[0].device());
  }
  if (features.has_value()) check_index_vector(op, "features", *features, zs[0]);
}

}  // namespace semcomp
