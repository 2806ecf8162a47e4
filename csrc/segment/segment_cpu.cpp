// Segment mean (centroids) on the CPU.
//
// One pass over ids validates the range, counts rows per group and detects whether ids are
// sorted. Sorted ids are already CSR: group g owns rows [offset[g], offset[g+1]). Unsorted
// ids get a stable counting sort (O(N), no comparison sort) into the same CSR form. Then one
// task per group sums its rows into fp32 (fp64 for double) accumulators and writes the mean:
// no atomics, each output row written by exactly one thread, results independent of the
// thread count. With `features`, only the kept columns are read and written (fused RFS).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_index.h"
#include "segment/segment.h"

namespace semcomp {
namespace {

constexpr int64_t kPrefetch = 4;  // rows ahead to prefetch on the permuted (unsorted) path

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

std::tuple<at::Tensor, at::Tensor> segment_mean_cpu(const at::Tensor& x, const at::Tensor& ids,
                                                    int64_t num_groups,
                                                    const std::optional<at::Tensor>& features) {
  constexpr const char* op = "segment_mean";
  check_segment_args(op, x, ids, num_groups, features);
  const int64_t n = x.size(0), d = x.size(1), g_count = num_groups;
  const at::Tensor id = cpu::checked_index(op, "ids", ids, num_groups);
  at::Tensor feat;
  if (features.has_value()) feat = cpu::checked_index(op, "features", *features, d);
  const int64_t k = features.has_value() ? feat.numel() : d;
  const int64_t* idp = id.data_ptr<int64_t>();
  const int64_t* fp = features.has_value() ? feat.data_ptr<int64_t>() : nullptr;

  at::Tensor counts = at::zeros({g_count}, x.options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  bool sorted = true;
  for (int64_t i = 0; i < n; ++i) {
    ++cnt[idp[i]];
    sorted &= (i == 0 || idp[i - 1] <= idp[i]);
  }
  std::vector<int64_t> offset(g_count + 1, 0);
  for (int64_t g = 0; g < g_count; ++g) offset[g + 1] = offset[g] + cnt[g];
  std::vector<int64_t> perm;  // empty when ids are sorted: row = position
  if (!sorted) {
    perm.resize(n);
    std::vector<int64_t> next(offset.begin(), offset.end() - 1);
    for (int64_t i = 0; i < n; ++i) perm[next[idp[i]]++] = i;
  }

  at::Tensor out = at::empty({g_count, k}, x.options());
  const int64_t sr = x.stride(0), sc = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "segment_mean", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    // Each task takes a contiguous range of groups; grain keeps tasks >= ~32k elements.
    const int64_t avg = std::max<int64_t>(1, (n / g_count) * k);
    const int64_t grain = std::max<int64_t>(1, 32768 / avg);
    at::parallel_for(0, g_count, grain, [&](int64_t lo, int64_t hi) {
      std::vector<A> acc(k);
      for (int64_t g = lo; g < hi; ++g) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t p = offset[g]; p < offset[g + 1]; ++p) {
          const scalar_t* row = xp + (perm.empty() ? p : perm[p]) * sr;
          // Unsorted ids visit rows in permuted order, which the hardware prefetcher cannot
          // follow: fetch the row kPrefetch positions ahead.
          if (!perm.empty() && p + kPrefetch < offset[g + 1]) {
            const char* ahead = reinterpret_cast<const char*>(xp + perm[p + kPrefetch] * sr);
            for (int64_t b = 0; b < k * sc * int64_t(sizeof(scalar_t)); b += 64) __builtin_prefetch(ahead + b);
          }
          A* a = acc.data();
          if (fp) {
_Pragma("omp simd")
            for (int64_t c = 0; c < k; ++c) a[c] += static_cast<A>(row[fp[c] * sc]);
          } else if (sc == 1) {
_Pragma("omp simd")
            for (int64_t c = 0; c < k; ++c) a[c] += static_cast<A>(row[c]);
          } else {
_Pragma("omp simd")
            for (int64_t c = 0; c < k; ++c) a[c] += static_cast<A>(row[c * sc]);
          }
        }
        const int64_t m = offset[g + 1] - offset[g];
        const A inv = m > 0 ? A(1) / static_cast<A>(m) : A(0);  // empty group -> zero row
        scalar_t* dst = op_ + g * k;
_Pragma("omp simd")
        for (int64_t c = 0; c < k; ++c) dst[c] = static_cast<scalar_t>(acc[c] * inv);
      }
    });
  });
  return {out, counts};
}

// dx_i = grad_{ids_i} / count_{ids_i} on the kept columns, 0 elsewhere. One task per row
// range; duplicate feature ids accumulate within the row, so no two threads share a value.
at::Tensor segment_mean_bwd_cpu(const at::Tensor& grad, const at::Tensor& ids,
                                const at::Tensor& counts, int64_t dim,
                                const std::optional<at::Tensor>& features) {
  constexpr const char* op = "segment_mean_bwd";
  check_segment_bwd_args(op, grad, ids, counts, dim, features);
  const int64_t n = ids.size(0), g_count = grad.size(0), k = grad.size(1);
  const at::Tensor id = cpu::checked_index(op, "ids", ids, g_count);
  at::Tensor feat;
  if (features.has_value()) feat = cpu::checked_index(op, "features", *features, dim);
  const int64_t* idp = id.data_ptr<int64_t>();
  const int64_t* fp = features.has_value() ? feat.data_ptr<int64_t>() : nullptr;
  const at::Tensor cnt_t = counts.contiguous();
  const int64_t* cnt = cnt_t.data_ptr<int64_t>();
  const at::Tensor gr = grad.contiguous();
  at::Tensor dx = fp ? at::zeros({n, dim}, grad.options()) : at::empty({n, dim}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "segment_mean_bwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = gr.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)), [&](int64_t lo, int64_t hi) {
      std::vector<A> acc(fp ? dim : 0);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t g = idp[i];
        TORCH_CHECK_VALUE(cnt[g] > 0, op, ": counts[", g, "] = ", cnt[g], " but row ", i, " has that id");
        const A inv = A(1) / static_cast<A>(cnt[g]);
        const scalar_t* src = gp + g * k;
        scalar_t* dst = dp + i * dim;
        if (fp) {
          std::fill(acc.begin(), acc.end(), A(0));
          for (int64_t c = 0; c < k; ++c) acc[fp[c]] += static_cast<A>(src[c]);
_Pragma("omp simd")
          for (int64_t c = 0; c < dim; ++c) dst[c] = static_cast<scalar_t>(acc[c] * inv);
        } else {
_Pragma("omp simd")
          for (int64_t c = 0; c < k; ++c) dst[c] = static_cast<scalar_t>(static_cast<A>(src[c]) * inv);
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CPU, m) {
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("segment_mean_bwd", &segment_mean_bwd_cpu);
}

}  // namespace semcomp
