// Column gather (random feature selection) on the CPU: out[i, c] = x[i, index[c]].
// One task per range of rows; strided (non-contiguous) x is read in place, no copy.
// Backward scatters into zeros, accumulating duplicate indices in fp32 within a row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_index.h"
#include "gather/gather.h"

namespace semcomp {
namespace {

at::Tensor gather_columns_cpu(const at::Tensor& x, const at::Tensor& index) {
  constexpr const char* op = "gather_columns";
  check_gather_args(op, x, index);
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor idx = cpu::checked_index(op, "index", index, d);
  const int64_t k = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  at::Tensor out = at::empty({n, k}, x.options());
  const int64_t sr = x.stride(0), sc = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* row = xp + i * sr;
        scalar_t* dst = o + i * k;
        if (sc == 1) {
_Pragma("omp simd")
          for (int64_t c = 0; c < k; ++c) dst[c] = row[ip[c]];
        } else {
_Pragma("omp simd")
          for (int64_t c = 0; c < k; ++c) dst[c] = row[ip[c] * sc];
        }
      }
    });
  });
  return out;
}

at::Tensor gather_columns_bwd_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t dim) {
  constexpr const char* op = "gather_columns_bwd";
  check_gather_args(op, grad, index);
  TORCH_CHECK_VALUE(dim >= 0, op, ": dim must be >= 0, got ", dim);
  TORCH_CHECK_VALUE(grad.size(1) == index.size(0), op, ": grad must have one column per index entry (",
              index.size(0), "), got ", grad.size(1));
  const int64_t n = grad.size(0), k = grad.size(1);
  const at::Tensor idx = cpu::checked_index(op, "index", index, dim);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const at::Tensor gr = grad.contiguous();
  at::Tensor dx = at::zeros({n, dim}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), op, [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = gr.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(dim, 1)), [&](int64_t lo, int64_t hi) {
      std::vector<A> acc(dim);
      for (int64_t i = lo; i < hi; ++i) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t c = 0; c < k; ++c) acc[ip[c]] += static_cast<A>(gp[i * k + c]);
        for (int64_t c = 0; c < dim; ++c) dp[i * dim + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CPU, m) {
  m.impl("gather_columns", &gather_columns_cpu);
  m.impl("gather_columns_bwd", &gather_columns_bwd_cpu);
}

}  // namespace semcomp
