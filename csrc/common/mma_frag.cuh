// Where a thread's tensor-core accumulators sit in a CTA tile, for epilogues shared by the
// mma.sync kernels (common/mma_mainloop.cuh) and the wgmma kernels (sm_90a).
//
// A warp holds MI x NJ accumulator fragments in the m16n8 C/D layout of mma.sync (the same
// layout a wgmma m64nNk16 accumulator has for each of its four warps: 16 rows each, the N
// columns as N/8 fragments): element e = 2h + b of fragment (mi, nj) of lane (g = lane / 4,
// t = lane % 4) is row row0 + 16 mi + g + 8 h, column col0 + 8 nj + 2 t + b of the CTA tile.
// slot_m / slot_n number the warps along rows / columns (SLOTS_M x SLOTS_N warps in all), the
// order in which cross-warp partials are merged (fixed: results do not depend on timing).
#pragma once

namespace semcomp::mma_frag {

template <int MI_, int NJ_>
struct Frag {
  static constexpr int MI = MI_, NJ = NJ_;
  int row0, col0;      // the warp's first row and column in the CTA tile
  int slot_m, slot_n;  // the warp's place in the CTA's warp grid
  int g, t;            // lane / 4, lane % 4

  __device__ __forceinline__ int row(int mi, int h) const { return row0 + 16 * mi + g + 8 * h; }
  __device__ __forceinline__ int col(int nj, int b) const { return col0 + 8 * nj + 2 * t + b; }
};

// The thread's Frag when a CTA's warps form a slots_m x slots_n grid of wm x wn tiles, warp w
// at (w % slots_m, w / slots_m) (the mma.sync kernels' arrangement).
template <int MI, int NJ>
__device__ __forceinline__ Frag<MI, NJ> grid_frag(int warp, int lane, int slots_m) {
  const int sm = warp % slots_m, sn = warp / slots_m;
  return Frag<MI, NJ>{sm * 16 * MI, sn * 8 * NJ, sm, sn, lane >> 2, lane & 3};
}

}  // namespace semcomp::mma_frag
