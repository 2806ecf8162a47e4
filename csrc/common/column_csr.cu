// Device sorts and the column CSR (declared in column_csr.cuh): the one unit that compiles
// cub's radix sort.
#include "common/column_csr.cuh"

#include <ATen/ops/empty.h>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <limits>

#include "common/cuda_utils.cuh"

namespace semcomp::cuda {
namespace {

template <typename I>
__global__ void lower_bounds_kernel(const I* __restrict__ sorted, int64_t n,
                                    int64_t num_keys, int64_t* __restrict__ offsets) {
  // offsets[g] = first position p with sorted[p] >= g, for g in [0, num_keys].
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g <= num_keys;
       g += int64_t(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted[mid] < g) lo = mid + 1; else hi = mid;
    }
    offsets[g] = lo;
  }
}

template <typename I>
__global__ void iota_kernel(I* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = i;
}

// Number of low bits that hold every key in [0, num_keys): radix passes only over those.
int key_bits(int64_t num_keys) {
  int b = 1;
  while (b < 63 && (int64_t{1} << b) < num_keys) ++b;
  return b;
}

}  // namespace

void launch_lower_bounds(const int64_t* sorted, int64_t n, int64_t num_keys, int64_t* offsets,
                         cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(num_keys + 1, threads), 65536);
  lower_bounds_kernel<<<blocks, threads, 0, stream>>>(sorted, n, num_keys, offsets);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::pair<at::Tensor, at::Tensor> stable_sort_by_key(const at::Tensor& keys, int64_t num_keys,
                                                     cudaStream_t stream) {
  const int64_t n = keys.numel();
  auto opts = keys.options().dtype(at::kLong);
  at::Tensor pos = at::empty({n}, opts), sorted = at::empty({n}, opts), perm = at::empty({n}, opts);
  if (n == 0) return {sorted, perm};
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int>::max(),
              "semcomp: cub radix sort supports at most 2^31-1 items, got ", n);
  iota_kernel<<<std::min<int64_t>(ceil_div(n, 256), 65536), 256, 0, stream>>>(
      pos.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int bits = key_bits(num_keys);
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, keys.const_data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
      pos.const_data_ptr<int64_t>(), perm.data_ptr<int64_t>(), static_cast<int>(n), 0, bits,
      stream));
  // Temporary storage from the caching allocator (stream-ordered, no cudaMalloc per call).
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, keys.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, keys.const_data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
      pos.const_data_ptr<int64_t>(), perm.data_ptr<int64_t>(), static_cast<int>(n), 0, bits,
      stream));
  return {sorted, perm};
}

std::pair<at::Tensor, at::Tensor> column_csr(const at::Tensor& index, int64_t dim,
                                             cudaStream_t stream) {
  auto [sorted, perm] = stable_sort_by_key(index, dim, stream);
  at::Tensor offsets = at::empty({dim + 1}, index.options().dtype(at::kLong));
  launch_lower_bounds(sorted.const_data_ptr<int64_t>(), index.numel(), dim,
                      offsets.data_ptr<int64_t>(), stream);
  return {offsets, perm};
}

}  // namespace semcomp::cuda
