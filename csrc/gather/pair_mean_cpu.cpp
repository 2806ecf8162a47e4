// Fused pair mean + column gather + finite flags on the CPU (see pair_mean.h). One task per
// range of rows; within a row, the finiteness pass brings the row into L1 and the gather reads
// it from there. Finite test: x - x is +0 for every finite x and NaN for +-Inf and NaN, so a
// row is finite iff the sum of (x - x) over it is 0 (no overflow is possible).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/cpu_index.h"
#include "gather/pair_mean.h"

namespace semcomp {
namespace {

std::tuple<at::Tensor, at::Tensor> pair_mean_cpu(at::TensorList zs, const c10::optional<at::Tensor>& features) {
  constexpr const char* op = "pair_mean";
  check_pair_mean_args(op, zs, features);
  const int64_t m_count = static_cast<int64_t>(zs.size());
  const int64_t n = zs[0].size(0), d = zs[0].size(1);
  at::Tensor idx;
  if (features.has_value()) idx = cpu::checked_index(op, "features", *features, d);
  const bool gather = idx.defined();
  const int64_t k = gather ? idx.numel() : d;
  const int64_t* ip = gather ? idx.data_ptr<int64_t>() : nullptr;
  const at::ScalarType acc_type = zs[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({n, k}, zs[0].options().dtype(acc_type));
  at::Tensor finite = at::empty({n}, zs[0].options().dtype(at::kBool));
  if (n == 0) return {out, finite};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zs[0].scalar_type(), op, [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<const scalar_t*> base(m_count);
    std::vector<int64_t> sr(m_count), sc(m_count);
    bool unit = true;
    for (int64_t m = 0; m < m_count; ++m) {
      base[m] = zs[m].const_data_ptr<scalar_t>();
      sr[m] = zs[m].stride(0);
      sc[m] = zs[m].stride(1);
      unit = unit && sc[m] == 1;
    }
    A* o = out.data_ptr<A>();
    bool* fl = finite.data_ptr<bool>();
    const A denom = static_cast<A>(m_count);
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d * m_count, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        A* dst = o + i * k;
        A bad = 0;
        for (int64_t m = 0; m < m_count; ++m) {
          const scalar_t* row = base[m] + i * sr[m];
          if (unit) {
_Pragma("omp simd reduction(+:bad)")
            for (int64_t j = 0; j < d; ++j) {
              const A v = static_cast<A>(row[j]);
              bad += v - v;
            }
            if (m == 0) {
              if (gather) {
_Pragma("omp simd")
                for (int64_t c = 0; c < k; ++c) dst[c] = static_cast<A>(row[ip[c]]);
              } else {
_Pragma("omp simd")
                for (int64_t c = 0; c < k; ++c) dst[c] = static_cast<A>(row[c]);
              }
            } else if (gather) {
_Pragma("omp simd")
              for (int64_t c = 0; c < k; ++c) dst[c] += static_cast<A>(row[ip[c]]);
            } else {
_Pragma("omp simd")
              for (int64_t c = 0; c < k; ++c) dst[c] += static_cast<A>(row[c]);
            }
          } else {  // strided columns: read in place
            const int64_t s = sc[m];
            for (int64_t j = 0; j < d; ++j) {
              const A v = static_cast<A>(row[j * s]);
              bad += v - v;
            }
            for (int64_t c = 0; c < k; ++c) {
              const A v = static_cast<A>(row[(gather ? ip[c] : c) * s]);
              dst[c] = m == 0 ? v : dst[c] + v;
            }
          }
        }
        if (m_count > 1) {
_Pragma("omp simd")
          for (int64_t c = 0; c < k; ++c) dst[c] = dst[c] / denom;
        }
        fl[i] = bad == A(0);
      }
    });
  });
  return {out, finite};
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CPU, m) {
  m.impl("pair_mean", &pair_mean_cpu);
}

}  // namespace semcomp
