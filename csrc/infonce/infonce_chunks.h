// Row chunking of the CUDA InfoNCE paths: how many rows of q one pass handles, and how many
// bytes the forward keeps besides its inputs and outputs. Plain arithmetic (no CUDA, no ATen),
// so tests compile and check it on a machine without a GPU (tests/test_cuda_chunks.py).
#pragma once

#include <algorithm>
#include <cstdint>

// Workspace budgets. Overridable at compile time only so that the CPU emulator can force tiny
// chunks at small N (several chunks, chunk boundaries, the merges between them).
#ifndef SEMCOMP_INFONCE_BUDGET_BYTES
#define SEMCOMP_INFONCE_BUDGET_BYTES (int64_t{128} << 20)
#endif
#ifndef SEMCOMP_TILE_COL_BUDGET_BYTES
#define SEMCOMP_TILE_COL_BUDGET_BYTES (int64_t{128} << 20)
#endif

namespace semcomp::chunks {

// gemm path: the W block (and, mixed, the G block) of one chunk of rows.
constexpr int64_t kGemmBudgetBytes = SEMCOMP_INFONCE_BUDGET_BYTES;
// tile forward: the per-(row block, column) column partials of one chunk of rows.
constexpr int64_t kTileColBudgetBytes = SEMCOMP_TILE_COL_BUDGET_BYTES;
constexpr int64_t kTileRows = 64;  // rows of a tile (tile::kBM)
constexpr int64_t kTileCols = 64;  // columns of a tile (tile::kBN)

constexpr int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// gemm path, bytes per element of a chunk's C x nk block: W in the accumulation dtype plus,
// when the GEMMs run mixed (bf16/fp16 operands, fp32 output), the G block in the input dtype
// (fp32/fp64 write G in place over W). The forward needs only W but is chunked with the
// backward's figure: both passes then split the rows at the same boundaries, every W block
// has the same shape and operands in both, cuBLAS runs the same algorithm on it, and the
// backward sees the forward's logits S bit for bit.
constexpr int64_t gemm_bytes_per_logit(int64_t acc_bytes, int64_t in_bytes, bool mixed) {
  return acc_bytes + (mixed ? in_bytes : 0);
}

// Rows per chunk: the requested size, or the largest multiple of 64 whose block fits in
// `budget`, clamped to [64, 8192]; never more than `rows`.
constexpr int64_t chunk_rows(int64_t requested, int64_t rows, int64_t cols, int64_t bytes_per_elem,
                             int64_t budget = kGemmBudgetBytes) {
  if (requested > 0) return std::min(requested, rows);
  int64_t c = budget / (std::max<int64_t>(cols, 1) * bytes_per_elem);
  c = std::clamp<int64_t>(c / 64 * 64, 64, 8192);
  return std::min(c, rows);
}

// Column splits for `row_blocks` row blocks over `col_tiles` column tiles: enough CTAs to fill
// the GPU about twice (`sms` multiprocessors), at most one per column tile (grid.y <= 65535).
constexpr int64_t tile_splits(int64_t row_blocks, int64_t col_tiles, int64_t sms) {
  const int64_t want = div_up(2 * sms, std::max<int64_t>(row_blocks, 1));
  return std::clamp<int64_t>(want, 1, std::clamp<int64_t>(col_tiles, 1, 65535));
}

// Tile forward, symmetric form: rows per chunk so that the chunk's column partials (max, sum
// in fp32 for every (row block, column): 8 bytes x nk per block of 64 rows) fit the budget;
// at least one row block. The rectangular form keeps no column partials: one chunk.
constexpr int64_t tile_fwd_chunk_rows(int64_t nq, int64_t nk, bool sym,
                                      int64_t budget = kTileColBudgetBytes) {
  if (!sym) return std::max<int64_t>(nq, 1);
  const int64_t blocks = std::max<int64_t>(1, budget / (8 * std::max<int64_t>(nk, 1)));
  return std::max<int64_t>(1, std::min(nq, blocks * kTileRows));
}

// Bytes the tile forward allocates besides q, k and its outputs (loss, row and column LSEs):
// the chunk's column partials, the row partials (max, sum per split and row), the positive
// logits, and the running column states (max, sum per column).
constexpr int64_t tile_fwd_extra_bytes(int64_t nq, int64_t nk, bool sym, int64_t sms,
                                       int64_t budget = kTileColBudgetBytes) {
  const int64_t c = tile_fwd_chunk_rows(nq, nk, sym, budget);
  const int64_t row_blocks = div_up(c, kTileRows);
  const int64_t splits = tile_splits(row_blocks, div_up(nk, kTileCols), sms);
  const int64_t col_partials = sym ? 8 * row_blocks * nk : 0;
  const int64_t row_partials = 8 * splits * nq;
  const int64_t col_states = sym ? 8 * nk : 0;
  return col_partials + row_partials + 4 * nq + col_states;
}

}  // namespace semcomp::chunks
