// Segment mean (centroids) on CUDA.
//
// Forward:
//   1. One scan kernel over ids records the first out-of-range position and the first
//      position where ids decrease (sortedness); another records the first bad feature.
//      One host sync reads the three slots and raises the CPU backend's messages.
//   2. Sorted ids are already CSR. Unsorted ids are stably sorted with
//      cub::DeviceRadixSort::SortPairs over only the bits needed for num_groups, giving the
//      permutation `perm`; group g then owns positions [off[g], off[g+1]) of the sorted order.
//      off[] comes from one binary search per group (no atomics, no histogram).
//   3. One block per group (grid-stride over groups, blockIdx.y over column tiles):
//      threadIdx.x walks vectors of V columns (16-byte loads when x is row-contiguous and no
//      feature selection; scalar gathers otherwise, which fuses the RFS column selection into
//      the read), threadIdx.y walks the group's rows with stride blockDim.y. The blockDim.y
//      partial sums are combined in shared memory in a fixed order, so results do not depend
//      on scheduling. fp32 accumulators (fp64 for double); empty groups write zero rows.
//
// Backward: dx_i = grad[ids_i] / counts[ids_i] on the kept columns, as a gather over the
// column CSR of `features` (duplicates accumulate in a fixed order, no atomics). The kernel
// skips and records bad ids / zero counts; one sync at the end raises.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "common/column_csr.cuh"
#include "common/cuda_utils.cuh"
#include "segment/segment.h"

namespace semcomp {
namespace {

using namespace semcomp::cuda;

// Slot 0: first id outside [0, G); slot 1: first i with ids[i-1] > ids[i].
__global__ void scan_ids_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t g_count,
                                unsigned long long* status) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = ids[i];
    if (v < 0 || v >= g_count) atomicMin(status, static_cast<unsigned long long>(i));
    if (i > 0 && ids[i - 1] > v) atomicMin(status + 1, static_cast<unsigned long long>(i));
  }
}

template <typename T, int V>
__global__ void segment_mean_kernel(const T* __restrict__ x, int64_t sr, int64_t sc,
                                    const int64_t* __restrict__ perm,
                                    const int64_t* __restrict__ feat, int64_t k,
                                    const int64_t* __restrict__ off, int64_t g_count,
                                    int64_t splits, acc_t<T>* __restrict__ part,
                                    T* __restrict__ out, int64_t* __restrict__ counts) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);  // [blockDim.y - 1][blockDim.x * V]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + tx) * V;  // this thread's columns
  const bool active = c0 < k;
  for (int64_t u = blockIdx.x; u < g_count * splits; u += gridDim.x) {
    // unit u = (group g, split sp): rows [b, e) of the group's [gb, ge)
    const int64_t g = u / splits, sp = u % splits;
    const int64_t gb = off[g], ge = off[g + 1];
    const int64_t b = gb + (ge - gb) * sp / splits, e = gb + (ge - gb) * (sp + 1) / splits;
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = A(0);
    if (active) {
      for (int64_t p = b + ty; p < e; p += blockDim.y) {
        const T* src = x + (perm ? perm[p] : p) * sr;
        if constexpr (V > 1) {  // row-contiguous, all columns, 16-byte aligned
          const Vec<T, V> val = *reinterpret_cast<const Vec<T, V>*>(src + c0);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += static_cast<A>(val.v[v]);
        } else {
          acc[0] += static_cast<A>(src[(feat ? feat[c0] : c0) * sc]);
        }
      }
    }
    if (blockDim.y > 1) {  // fixed-order combination of the row lanes
      if (ty > 0) {
#pragma unroll
        for (int v = 0; v < V; ++v) red[((ty - 1) * blockDim.x + tx) * V + v] = acc[v];
      }
      __syncthreads();
      if (ty == 0) {
        for (int t = 1; t < int(blockDim.y); ++t) {
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += red[((t - 1) * blockDim.x + tx) * V + v];
        }
      }
      __syncthreads();  // red[] is reused by the next group
    }
    if (splits > 1) {  // fp32 partial sums, combined in split order by segment_combine_kernel
      if (ty == 0 && active) {
#pragma unroll
        for (int v = 0; v < V; ++v) part[u * k + c0 + v] = acc[v];
      }
    } else if (ty == 0 && active) {
      const A inv = e > b ? A(1) / static_cast<A>(e - b) : A(0);  // empty group -> zeros
      T* dst = out + g * k + c0;
      if constexpr (V > 1) {
        Vec<T, V> o;
#pragma unroll
        for (int v = 0; v < V; ++v) o.v[v] = static_cast<T>(acc[v] * inv);
        *reinterpret_cast<Vec<T, V>*>(dst) = o;
      } else {
        dst[0] = static_cast<T>(acc[0] * inv);
      }
    }
    if (blockIdx.y == 0 && tx == 0 && ty == 0 && sp == 0) counts[g] = ge - gb;
  }
}

// out[g, c] = (sum over splits of part[g, sp, c], in split order) / count_g.
template <typename T>
__global__ void segment_combine_kernel(const acc_t<T>* __restrict__ part, int64_t splits,
                                       const int64_t* __restrict__ off, int64_t g_count,
                                       int64_t k, T* __restrict__ out) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < g_count * k;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = idx / k, c = idx % k, len = off[g + 1] - off[g];
    A acc = A(0);
    for (int64_t sp = 0; sp < splits; ++sp) acc += part[(g * splits + sp) * k + c];
    const A inv = len > 0 ? A(1) / static_cast<A>(len) : A(0);
    out[idx] = static_cast<T>(acc * inv);
  }
}

int pow2_floor(int64_t v) {
  int p = 1;
  while (int64_t{p} * 2 <= v && p < 1024) p *= 2;
  return p;
}

// Checks ids against [0, num_groups) and features against [0, d) with the op's one host sync;
// returns whether the ids were already sorted (false under graph capture, where the host
// cannot know: sorting is then always done, correct either way).
bool check_ids_and_features(const char* op, const at::Tensor& id, int64_t g_count,
                            const at::Tensor& feat, int64_t d, const at::Tensor& like,
                            cudaStream_t stream) {
  const int64_t n = id.numel();
  at::Tensor status = new_status(3, like);
  auto* st = reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>());
  if (n > 0) {
    scan_ids_kernel<<<std::min<int64_t>(ceil_div(n, 256), 4096), 256, 0, stream>>>(
        id.const_data_ptr<int64_t>(), n, g_count, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (feat.defined()) launch_index_scan(feat, d, status, 2, stream);
  const at::Tensor host = finish_status(status, 1u | 4u, stream);  // the one host sync
  raise_if_bad(op, "ids", host, 0, id, g_count);
  if (feat.defined()) raise_if_bad(op, "features", host, 2, feat, d);
  return host.defined() && host.const_data_ptr<int64_t>()[1] == std::numeric_limits<int64_t>::max();
}

// The group CSR: (perm, off) with group g owning sorted positions [off[g], off[g+1]); perm is
// undefined when the ids were sorted already (positions are then rows).
std::pair<at::Tensor, at::Tensor> group_csr(const at::Tensor& id, int64_t g_count, bool sorted,
                                            cudaStream_t stream) {
  at::Tensor sorted_ids = id, perm;
  if (!sorted) std::tie(sorted_ids, perm) = stable_sort_by_key(id, g_count, stream);
  at::Tensor off = at::empty({g_count + 1}, id.options());
  launch_lower_bounds(sorted_ids.const_data_ptr<int64_t>(), id.numel(), g_count,
                      off.data_ptr<int64_t>(), stream);
  return {perm, off};
}

// out (g_count x k) and counts from x's rows in the order of the group CSR (see
// segment_mean_kernel for the thread layout and the split of long groups).
void launch_segment_mean(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& off,
                         const at::Tensor& feat, int64_t g_count, at::Tensor& out,
                         at::Tensor& counts, cudaStream_t stream) {
  constexpr const char* op = "segment_mean";  // AT_DISPATCH needs a constant name
  const int64_t n = x.size(0), d = x.size(1), k = out.size(1);
  const bool has_feat = feat.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    constexpr int VW = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool vec = !has_feat && x.stride(1) == 1 && d % VW == 0 && x.stride(0) % VW == 0 &&
                     aligned16(xp) && aligned16(out.data_ptr());
    const int V = vec ? VW : 1;
    const int64_t col_threads = std::max<int64_t>(1, ceil_div(k, V));
    // threadIdx.x over column vectors (a multiple of 32, <= 256); threadIdx.y over rows,
    // about the average group size so small groups do not leave lanes idle.
    const int tx = static_cast<int>(std::min<int64_t>(ceil_div(col_threads, 32) * 32, 256));
    const int64_t col_tiles = ceil_div(col_threads, tx);
    TORCH_CHECK_VALUE(col_tiles <= kMaxGridY, op, ": too many columns (", k, ")");
    // Few, long groups (10 classes over 10^6 rows) would leave most multiprocessors idle with
    // one block per group: each group is then split into `splits` row ranges (>= ~256 rows
    // each) whose fp32 partial sums are combined in a fixed order (deterministic for a given
    // GPU model; no atomics).
    const int64_t units_wanted = 2 * multiprocessor_count(x.device().index());
    const int64_t splits =
        g_count * col_tiles >= units_wanted
            ? 1
            : std::clamp<int64_t>(std::min(ceil_div(units_wanted, g_count * col_tiles),
                                           ceil_div(n, g_count * 256)),
                                  1, 1024);
    const int ty = std::min(256 / tx, pow2_floor(std::max<int64_t>(1, n / (g_count * splits))));
    const dim3 block(tx, ty);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(g_count * splits, kMaxGridX)),
                    static_cast<unsigned>(col_tiles));
    const size_t smem = size_t(ty - 1) * tx * V * sizeof(A);
    const int64_t* pp = perm.defined() ? perm.const_data_ptr<int64_t>() : nullptr;
    const int64_t* fp = has_feat ? feat.const_data_ptr<int64_t>() : nullptr;
    at::Tensor part;
    if (splits > 1)
      part = at::empty({g_count * splits, k}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    A* partp = splits > 1 ? part.data_ptr<A>() : nullptr;
    if (vec) {
      segment_mean_kernel<scalar_t, VW><<<grid, block, smem, stream>>>(
          xp, x.stride(0), x.stride(1), pp, fp, k, off.const_data_ptr<int64_t>(), g_count,
          splits, partp, out.data_ptr<scalar_t>(), counts.data_ptr<int64_t>());
    } else {
      segment_mean_kernel<scalar_t, 1><<<grid, block, smem, stream>>>(
          xp, x.stride(0), x.stride(1), pp, fp, k, off.const_data_ptr<int64_t>(), g_count,
          splits, partp, out.data_ptr<scalar_t>(), counts.data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const int64_t total = g_count * k;
      segment_combine_kernel<scalar_t><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 65536)),
                                         256, 0, stream>>>(part.const_data_ptr<A>(), splits,
                                                           off.const_data_ptr<int64_t>(), g_count,
                                                           k, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor> segment_mean_cuda(const at::Tensor& x, const at::Tensor& ids,
                                                     int64_t num_groups,
                                                     const std::optional<at::Tensor>& features) {
  constexpr const char* op = "segment_mean";
  check_segment_args(op, x, ids, num_groups, features);
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t g_count = num_groups;
  const int64_t k = features.has_value() ? features->size(0) : x.size(1);
  const at::Tensor id = ids.to(at::kLong).contiguous();
  at::Tensor feat;
  if (features.has_value()) feat = features->to(at::kLong).contiguous();
  const bool sorted = check_ids_and_features(op, id, g_count, feat, x.size(1), x, stream);
  const auto [perm, off] = group_csr(id, g_count, sorted, stream);
  at::Tensor out = at::empty({g_count, k}, x.options());
  at::Tensor counts = at::empty({g_count}, x.options().dtype(at::kLong));
  launch_segment_mean(x, perm, off, feat, g_count, out, counts, stream);
  return {out, counts};
}

at::Tensor segment_mean_bwd_cuda(const at::Tensor& grad, const at::Tensor& ids,
                                 const at::Tensor& counts, int64_t dim,
                                 const std::optional<at::Tensor>& features) {
  constexpr const char* op = "segment_mean_bwd";
  check_segment_bwd_args(op, grad, ids, counts, dim, features);
  TORCH_CHECK_VALUE(counts.device() == grad.device(), op, ": counts must be on ", grad.device(),
              ", got ", counts.device());
  c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.device().index()).stream();
  const int64_t n = ids.size(0), g_count = grad.size(0), k = grad.size(1);
  const bool has_feat = features.has_value();
  at::Tensor feat;
  if (has_feat) feat = features->to(at::kLong).contiguous();
  const at::Tensor id = ids.to(at::kLong).contiguous();
  if (n == 0 || dim == 0 || k == 0) {  // nothing to scatter, but bad ids / features still raise
    at::Tensor status = new_status(3, grad);
    if (has_feat) launch_index_scan(feat, dim, status, 2, stream);
    launch_index_scan(id, g_count, status, 0, stream);
    const at::Tensor host = finish_status(status, 1u | 4u, stream);
    if (has_feat) raise_if_bad(op, "features", host, 2, feat, dim);
    raise_if_bad(op, "ids", host, 0, id, g_count);
    return at::zeros({n, dim}, grad.options());
  }
  const at::Tensor cnt = counts.contiguous();
  const at::Tensor gr = grad.contiguous();
  at::Tensor status = new_status(3, grad);  // [bad id row, zero-count row, bad feature]
  at::Tensor off, src;
  if (has_feat) {
    launch_index_scan(feat, dim, status, 2, stream);
    std::tie(off, src) = column_csr(feat, dim, stream);
  }
  at::Tensor dx = at::empty({n, dim}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), op, [&] {
    const int threads = 256;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(dim, threads), 1024)),
                    static_cast<unsigned>(std::min<int64_t>(n, kMaxGridY)));
    column_csr_scatter_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        gr.const_data_ptr<scalar_t>(), k, g_count, id.const_data_ptr<int64_t>(),
        cnt.const_data_ptr<int64_t>(), has_feat ? off.const_data_ptr<int64_t>() : nullptr,
        has_feat ? src.const_data_ptr<int64_t>() : nullptr, dx.data_ptr<scalar_t>(), n, dim,
        reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor host = finish_status(status, 1u | 2u | 4u, stream);  // the one host sync
  if (has_feat) raise_if_bad(op, "features", host, 2, feat, dim);
  raise_if_bad(op, "ids", host, 0, id, g_count);
  const int64_t zero_row =
      host.defined() ? host.const_data_ptr<int64_t>()[1] : std::numeric_limits<int64_t>::max();
  if (zero_row != std::numeric_limits<int64_t>::max()) {
    const int64_t g = id[zero_row].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": counts[", g, "] = ", cnt[g].item<int64_t>(), " but row ", zero_row,
                " has that id");
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CUDA, m) {
  m.impl("segment_mean", &segment_mean_cuda);
  m.impl("segment_mean_bwd", &segment_mean_bwd_cuda);
}

}  // namespace semcomp
