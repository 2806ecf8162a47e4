// Stable sorts of int64 keys on the device and the "column CSR" built from them. Declared
// here, compiled once in column_csr.cu: that unit alone instantiates cub's radix sort (which
// costs every unit that includes it tens of seconds of nvcc time per architecture).
//
// column CSR: a column index (K entries in [0, dim)) -> for each column d the list of c with
// index[c] == d, in increasing c (the radix sort is stable). column_csr_scatter_kernel
// (cuda_utils.cuh) then turns the scatter over duplicates into a fixed-order gather.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <utility>

namespace semcomp::cuda {

// offsets[g] = first position p with sorted[p] >= g, for g in [0, num_keys] (on `stream`).
void launch_lower_bounds(const int64_t* sorted, int64_t n, int64_t num_keys, int64_t* offsets,
                         cudaStream_t stream);

// Stable sort of keys (int64 in [0, num_keys), validated by the caller) with their
// positions: returns (sorted_keys, perm) with keys[perm[p]] == sorted_keys[p].
std::pair<at::Tensor, at::Tensor> stable_sort_by_key(const at::Tensor& keys, int64_t num_keys,
                                                     cudaStream_t stream);

// (offsets (dim + 1), src (K)) for a validated int64 column index; see above.
std::pair<at::Tensor, at::Tensor> column_csr(const at::Tensor& index, int64_t dim,
                                             cudaStream_t stream);

}  // namespace semcomp::cuda
