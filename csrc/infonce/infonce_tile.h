// Tile-fused InfoNCE kernels for bf16/fp16 inputs (CUDA): the logit tile S = s * q_i k_j^T is
// computed on the tensor cores into shared memory and consumed there, so the N x N logits
// never reach device memory (the "gemm" implementation writes them in fp32 through cuBLAS
// and reads them back). Two kernels share the tiling:
//
//   forward  per (row block of a chunk, column split): online row (max, sum) partials over
//            the split's columns, per (row block, column) column partials, S_i,i+offset
//   grad     per (row block of a chunk, column split): s*G (times an optional pre-scale) in
//            the input dtype for the two backward GEMMs, and per-split ds row shares
//
// Partials are merged by the caller in a fixed order (no atomics: deterministic).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "infonce/infonce_chunks.h"

namespace semcomp::tile {

constexpr int64_t kBM = chunks::kTileRows;  // rows of a tile (64)
constexpr int64_t kBN = chunks::kTileCols;  // columns of a tile (64)

// Column splits for `row_blocks` row blocks over `col_tiles` column tiles (chunks::tile_splits).
inline int64_t pick_splits(int64_t row_blocks, int64_t col_tiles, int64_t sms) {
  return chunks::tile_splits(row_blocks, col_tiles, sms);
}

// Multiprocessor count of like's device (cached).
int64_t device_sms(const at::Tensor& like);

// Rows [i0, i0 + c) of q (nq x d) against all of k (nk x d): contiguous bf16 or fp16 on one
// device, d > 0; scale: fp32 (1,) device. row_pm/row_ps: fp32 (splits, nq), columns
// [i0, i0 + c) written; col_pm/col_ps: fp32 (>= ceil(c/kBM), nk), row block b of the chunk in
// row b, written only when sym; diag: fp32 (nq) gets S_i,i+offset (base e, scaled) for the
// chunk's rows.
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const float* scale, int64_t offset,
                bool sym, int64_t splits, int64_t i0, int64_t c, at::Tensor& row_pm,
                at::Tensor& row_ps, at::Tensor& col_pm, at::Tensor& col_ps, at::Tensor& diag);

// Rows [i0, i0 + c) of q against all of k (d > 0). rlse, rcoef, dcoef: fp32 (nq); c2 (column LSEs,
// natural units, as the forward wrote them) and ccoef: fp32 (nk), only when sym; gscale: fp32 (1,) or nullptr.
// gbuf: (>= c) x nk in q's dtype, row-major; ds_part: fp32 (splits, >= c), row shares of
// d(logit_scale) per split.
void launch_grad(const at::Tensor& q, const at::Tensor& k, const float* scale, int64_t i0,
                 int64_t c, int64_t offset, bool sym, int64_t splits, const float* rlse,
                 const float* rcoef, const float* dcoef, const float* c2, const float* ccoef,
                 const float* gscale, at::Tensor& gbuf, at::Tensor& ds_part);

}  // namespace semcomp::tile
