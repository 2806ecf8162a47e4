// Emulator check of the shared tensor-core epilogues at the Hopper wgmma geometry. A development
// aid for the CPU CUDA emulator (shared/tools/cuda-emu), not part of the project's build.
//
// The wgmma kernels (csrc/infonce/infonce_wgmma_cuda.cu, csrc/siglip/siglip_wgmma_cuda.cu) run
// the epilogues of kernel 1 (mma_epi::InfoNCEFwd / InfoNCEGrad, siglip_epi::Epilogue) at
// <BM = 128, BN = 128, SLOTS_M = 8, SLOTS_N = 1, MI = 1, NJ = 16> over 256 consumer threads
// (common/wgmma_mainloop.cuh: consumer_frag, consumer_bar); the emulator cannot run wgmma, so
// this file's test kernels stand in for the mainloop: each CTA (row block x column split) walks
// its split's column tiles (mma_loop::split_range), fills every thread's accumulators
// float[MI][NJ][4] (m16n8 C layout, mma_frag::Frag) from a precomputed fp32 dot matrix W
// (rows x columns, row-major), zero where the real mainloop's loads zero-fill (rows past the
// rows in play, columns past the end), and calls the epilogue as the kernels do (tile per column
// tile, finish once, __syncthreads as the barrier over the 256 threads). GEO selects the
// geometry: 0 the wgmma one (warp w: rows 16 w .., all 128 columns, slot (w, 0)), 1 kernel 1's
// (4 x 2 warps of 2 x 8 fragments, mma_frag::grid_frag). The host sides are the project's own:
// infonce_lse.cuh's FwdPartials (split partials, column merges per pass, finish), the
// backward's s*G block and row shares per chunk (infonce_tc_host.cuh), the SigLIP driver's
// part (parts, splits, C) summed over splits in order (siglip_driver.cuh), with explicit pass,
// chunk and split counts so that tests can pick several column tiles per CTA.
//
// Ops (TORCH_LIBRARY semcomp_epi_check, CPU tensors; W fp32 contiguous):
//   infonce_fwd(W, scale, offset, sym, geo, pass_blocks, splits) -> [loss, rlse(, clse)]
//   infonce_grad(W, scale, gscale, rlse, rcoef, dcoef, clse, ccoef, offset, sym, bf16, geo,
//                chunk, splits) -> [s*G block (nq x nk, bf16/fp16; times gscale if > 0),
//                ds rows (nq: sum_j G_ij W_ij)]
//   siglip(W, scale, bias, grad_rows, gscale, negative_only, loss, grad, bf16, geo, chunk,
//          splits) -> [rows (parts x na: loss; ds, dt), s*G block (na x nb) or empty]
// Build and run: tools/emu/test_epilogue_geometry_emu.py (copies csrc, adds this file as
// csrc/epi_check/epilogue_geometry_check.cu, builds with build.sh -DEMU_FIBERS).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cuda_utils.cuh"
#include "common/mma_frag.cuh"
#include "common/mma_mainloop.cuh"  // split_range
#include "infonce/infonce_lse.cuh"
#include "infonce/infonce_mma_epilogue.cuh"
#include "siglip/siglip_mma_epilogue.cuh"

namespace semcomp_epi_check {

using semcomp::cuda::ceil_div;
using semcomp::infonce_lse::FwdPartials;
using semcomp::infonce_lse::scale_ok;
using semcomp::mma_frag::Frag;

constexpr int kBM = 128, kBN = 128, kThreads = 256;

// Geometry GEO: warps, fragments per warp.
template <int GEO> struct Geo;
template <> struct Geo<0> { static constexpr int SM = 8, SN = 1, MI = 1, NJ = 16; };  // wgmma consumers
template <> struct Geo<1> { static constexpr int SM = 4, SN = 2, MI = 2, NJ = 8; };   // kernel 1

template <int GEO>
__device__ __forceinline__ Frag<Geo<GEO>::MI, Geo<GEO>::NJ> make_frag() {
  using G = Geo<GEO>;
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  if constexpr (GEO == 0) {
    // wgmma_loop::consumer_frag(): warp w holds rows [16 w, 16 w + 16), all columns, slot (w, 0)
    return Frag<1, G::NJ>{16 * warp, 0, warp, 0, lane >> 2, lane & 3};
  } else {
    return semcomp::mma_frag::grid_frag<G::MI, G::NJ>(warp, lane, G::SM);
  }
}

// The dot tile at rows r0 .., columns c0 .. as the mainloop leaves it: W where the row is below
// rows_lim and the column below nk, 0 where the loads zero-fill.
template <int MI, int NJ>
__device__ __forceinline__ void fill(float (&acc)[MI][NJ][4], const Frag<MI, NJ>& f, const float* W,
                                     int64_t ldw, int64_t rows_lim, int64_t nk, int64_t r0, int64_t c0) {
  for (int mi = 0; mi < MI; ++mi)
    for (int nj = 0; nj < NJ; ++nj)
      for (int e = 0; e < 4; ++e) {
        const int64_t i = r0 + f.row(mi, e >> 1), j = c0 + f.col(nj, e & 1);
        acc[mi][nj][e] = (i < rows_lim && j < nk) ? W[i * ldw + j] : 0.f;
      }
}

__device__ __forceinline__ void bar() { __syncthreads(); }

// ---- InfoNCE forward ----------------------------------------------------------------------------

// grid (row blocks of this pass, splits), as wgmma_fwd_kernel / mma_fwd_kernel.
template <int GEO, bool SYM>
__global__ void __launch_bounds__(256)
infonce_fwd_kernel(const float* __restrict__ W, int64_t nq, int64_t nk, const float* __restrict__ scale,
                   int64_t offset, int64_t rb0, float* row_pm, float* row_ps, float* col_pm, float* col_ps,
                   float* diag) {
  using G = Geo<GEO>;
  using Epi = semcomp::mma_epi::InfoNCEFwd<kBM, kBN, G::SM, G::SN, G::MI, G::NJ, SYM>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* scratch = reinterpret_cast<float*>(smem_raw);
  const int64_t rbl = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = (rb0 + rbl) * kBM;
  int64_t t0, t1;
  semcomp::mma_loop::split_range(ceil_div(nk, kBN), split, splits, t0, t1);
  const auto f = make_frag<GEO>();
  Epi epi(f, r0, nq, nk, scale[0], offset, scratch, int(threadIdx.x), SYM ? col_pm + rbl * nk : nullptr,
          SYM ? col_ps + rbl * nk : nullptr, diag);
  for (int64_t ct = t0; ct < t1; ++ct) {
    float acc[G::MI][G::NJ][4];
    fill(acc, f, W, nk, nq, nk, r0, ct * kBN);
    epi.tile(ct, acc, bar);
  }
  epi.finish(row_pm + split * nq, row_ps + split * nq, bar);
}

template <int GEO, bool SYM>
std::vector<at::Tensor> fwd_impl(const at::Tensor& W, double scale, int64_t offset, int64_t pass_blocks,
                                 int64_t splits) {
  using Epi = semcomp::mma_epi::InfoNCEFwd<kBM, kBN, Geo<GEO>::SM, Geo<GEO>::SN, Geo<GEO>::MI, Geo<GEO>::NJ, SYM>;
  static_assert(Epi::kThreads == kThreads);
  const int64_t nq = W.size(0), nk = W.size(1);
  const auto opts = W.options();
  const at::Tensor s = at::full({1}, scale, opts);
  const int64_t n_rb = ceil_div(nq, kBM);
  const int64_t pass = SYM ? std::clamp<int64_t>(pass_blocks, 1, n_rb) : n_rb;
  FwdPartials p(splits, nq, pass, nk, SYM, opts);
  const float nan = std::numeric_limits<float>::quiet_NaN();  // unwritten partials show as NaN
  p.rpm.fill_(nan);
  p.rps.fill_(nan);
  p.diag.fill_(nan);
  if constexpr (SYM) {
    p.cpm.fill_(nan);
    p.cps.fill_(nan);
  }
  const cudaStream_t stream = nullptr;
  for (int64_t rb0 = 0; rb0 < n_rb; rb0 += pass) {
    const int64_t nb = std::min(pass, n_rb - rb0);
    const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(splits));
    const size_t smem = Epi::kScratchFloats * sizeof(float);
    infonce_fwd_kernel<GEO, SYM><<<grid, kThreads, smem, stream>>>(
        W.const_data_ptr<float>(), nq, nk, s.const_data_ptr<float>(), offset, rb0, p.rpm.data_ptr<float>(),
        p.rps.data_ptr<float>(), SYM ? p.cpm.data_ptr<float>() : nullptr, SYM ? p.cps.data_ptr<float>() : nullptr,
        p.diag.data_ptr<float>());
    if constexpr (SYM) p.merge_columns(nb, stream);
  }
  return p.template finish<SYM>(s.const_data_ptr<float>(), stream);
}

std::vector<at::Tensor> infonce_fwd(const at::Tensor& W, double scale, int64_t offset, bool sym, int64_t geo,
                                    int64_t pass_blocks, int64_t splits) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat && W.is_contiguous(), "W: contiguous fp32 matrix");
  TORCH_CHECK(geo == 0 || geo == 1, "geo must be 0 or 1, got ", geo);
  TORCH_CHECK(splits >= 1 && splits <= ceil_div(W.size(1), kBN), "splits: 1 .. column tiles, got ", splits);
  TORCH_CHECK(!sym || (W.size(0) == W.size(1) && offset == 0), "sym: square W, offset 0");
  TORCH_CHECK(offset >= 0 && W.size(0) + offset <= W.size(1), "offset: rows + offset <= columns");
  if (geo == 0) return sym ? fwd_impl<0, true>(W, scale, offset, pass_blocks, splits)
                           : fwd_impl<0, false>(W, scale, offset, pass_blocks, splits);
  return sym ? fwd_impl<1, true>(W, scale, offset, pass_blocks, splits)
             : fwd_impl<1, false>(W, scale, offset, pass_blocks, splits);
}

// ---- InfoNCE backward -----------------------------------------------------------------------------

struct GradArgs {
  int64_t nk, i0, c, offset;
  const float *W, *scale, *rlse, *rcoef, *dcoef, *clse, *ccoef, *gscale;
  uint16_t* gbuf;
  int64_t ld_g;
  bool pair_store;
  float* ds_part;
  int64_t ld_ds;
};

// grid (row blocks of rows [i0, i0 + c), splits), as wgmma_grad_kernel / mma_grad_kernel.
template <typename T, int GEO, bool SYM>
__global__ void __launch_bounds__(256) infonce_grad_kernel(const GradArgs a) {
  using G = Geo<GEO>;
  using Epi = semcomp::mma_epi::InfoNCEGrad<T, kBM, kBN, G::SM, G::SN, G::MI, G::NJ, SYM>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* scratch = reinterpret_cast<float*>(smem_raw);
  const int64_t split = blockIdx.y;
  const int64_t r0 = a.i0 + int64_t(blockIdx.x) * kBM, rows_end = a.i0 + a.c;
  int64_t t0, t1;
  semcomp::mma_loop::split_range(ceil_div(a.nk, kBN), split, gridDim.y, t0, t1);
  const float s = scale_ok(a.scale[0]) ? a.scale[0] : std::numeric_limits<float>::quiet_NaN();
  const float sg = a.gscale ? s * a.gscale[0] : s;
  const auto f = make_frag<GEO>();
  Epi epi(f, r0, a.i0, rows_end, a.nk, a.offset, s, sg, a.rlse, a.rcoef, a.dcoef, a.clse, a.ccoef, a.gbuf,
          a.ld_g, a.pair_store, scratch);
  for (int64_t ct = t0; ct < t1; ++ct) {
    float acc[G::MI][G::NJ][4];
    fill(acc, f, a.W, a.nk, rows_end, a.nk, r0, ct * kBN);
    epi.tile(ct, acc);
  }
  epi.finish(a.ds_part + split * a.ld_ds, bar);
}

template <typename T, int GEO, bool SYM>
void grad_launch(const GradArgs& a, int64_t splits) {
  using Epi = semcomp::mma_epi::InfoNCEGrad<T, kBM, kBN, Geo<GEO>::SM, Geo<GEO>::SN, Geo<GEO>::MI, Geo<GEO>::NJ, SYM>;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.c, kBM)), static_cast<unsigned>(splits));
  const size_t smem = std::max<int>(Epi::kScratchFloats, 1) * sizeof(float);
  infonce_grad_kernel<T, GEO, SYM><<<grid, kThreads, smem>>>(a);
}

std::vector<at::Tensor> infonce_grad(const at::Tensor& W, double scale, double gscale, const at::Tensor& rlse,
                                     const at::Tensor& rcoef, const at::Tensor& dcoef, const at::Tensor& clse,
                                     const at::Tensor& ccoef, int64_t offset, bool sym, bool bf16, int64_t geo,
                                     int64_t chunk, int64_t splits) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat && W.is_contiguous(), "W: contiguous fp32 matrix");
  TORCH_CHECK(geo == 0 || geo == 1, "geo must be 0 or 1, got ", geo);
  const int64_t nq = W.size(0), nk = W.size(1);
  TORCH_CHECK(splits >= 1 && splits <= ceil_div(nk, kBN), "splits: 1 .. column tiles, got ", splits);
  TORCH_CHECK(chunk >= 1, "chunk must be positive, got ", chunk);
  TORCH_CHECK(!sym || (nq == nk && offset == 0), "sym: square W, offset 0");
  const auto opts = W.options();
  const at::Tensor s = at::full({1}, scale, opts);
  const at::Tensor gs = at::full({1}, gscale, opts);
  const int64_t C = std::min(chunk, nq);
  const auto dt = bf16 ? at::kBFloat16 : at::kHalf;
  at::Tensor gbuf = at::empty({C, nk}, opts.dtype(dt));
  at::Tensor ds_part = at::empty({splits, C}, opts);
  at::Tensor g_all = at::empty({nq, nk}, opts.dtype(dt));
  at::Tensor ds_rows = at::empty({nq}, opts);
  GradArgs a{nk, 0, 0, offset, W.const_data_ptr<float>(), s.const_data_ptr<float>(), rlse.const_data_ptr<float>(),
             rcoef.const_data_ptr<float>(), dcoef.const_data_ptr<float>(),
             sym ? clse.const_data_ptr<float>() : nullptr, sym ? ccoef.const_data_ptr<float>() : nullptr,
             gscale > 0 ? gs.const_data_ptr<float>() : nullptr, static_cast<uint16_t*>(gbuf.data_ptr()), nk,
             nk % 2 == 0, ds_part.data_ptr<float>(), C};
  for (int64_t i0 = 0; i0 < nq; i0 += C) {
    const int64_t c = std::min(C, nq - i0);
    a.i0 = i0;
    a.c = c;
    gbuf.view(at::kShort).fill_(-1);  // 0xFFFF (NaN): an element the epilogue does not write shows
    ds_part.fill_(std::numeric_limits<float>::quiet_NaN());  // as NaN where the reference has none
    auto go = [&](auto tag) {
      using T = decltype(tag);
      if (geo == 0) sym ? grad_launch<T, 0, true>(a, splits) : grad_launch<T, 0, false>(a, splits);
      else sym ? grad_launch<T, 1, true>(a, splits) : grad_launch<T, 1, false>(a, splits);
    };
    if (bf16) go(c10::BFloat16{});
    else go(c10::Half{});
    ds_rows.narrow(0, i0, c).copy_(at::sum(ds_part.narrow(1, 0, c), 0));  // splits in order
    g_all.narrow(0, i0, c).copy_(gbuf.narrow(0, 0, c));
  }
  return {g_all, ds_rows};
}

// ---- SigLIP --------------------------------------------------------------------------------------

template <typename T, int GEO, bool LOSS, bool GRAD>
__global__ void __launch_bounds__(256)
siglip_kernel(const float* __restrict__ W, const float* __restrict__ scale, const float* __restrict__ bias,
              const float* __restrict__ gscale, semcomp::siglip_epi::Params p) {
  using G = Geo<GEO>;
  using Epi = semcomp::siglip_epi::Epilogue<T, G::MI, G::NJ, kBM, kBN, G::SM, G::SN, LOSS, GRAD>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* scratch = reinterpret_cast<float*>(smem_raw);
  float s = scale[0], t = bias[0];
  semcomp::siglip_epi::poison_params(s, t);
  p.s = s;
  p.t = t;
  p.sg = gscale != nullptr ? s * gscale[0] : s;
  const int64_t split = blockIdx.y;
  const int64_t r0 = p.i0 + int64_t(blockIdx.x) * kBM;
  int64_t t0, t1;
  semcomp::mma_loop::split_range(ceil_div(p.nb, kBN), split, p.splits, t0, t1);
  const auto f = make_frag<GEO>();
  Epi epi;
  epi.begin(p, f, r0);
  for (int64_t ct = t0; ct < t1; ++ct) {
    float acc[G::MI][G::NJ][4];
    fill(acc, f, W, p.nb, p.rows_end, p.nb, r0, ct * kBN);
    epi.tile(p, f, ct * kBN, acc);
  }
  epi.finish(p, f, split, scratch, [] { __syncthreads(); }, int(threadIdx.x), kThreads);
}

template <typename T, int GEO, bool LOSS, bool GRAD>
void siglip_launch(const float* W, const float* sp, const float* tp, const float* gsp,
                   const semcomp::siglip_epi::Params& p, int64_t c) {
  using Epi = semcomp::siglip_epi::Epilogue<T, Geo<GEO>::MI, Geo<GEO>::NJ, kBM, kBN, Geo<GEO>::SM, Geo<GEO>::SN,
                                            LOSS, GRAD>;
  const dim3 grid(static_cast<unsigned>(ceil_div(c, kBM)), static_cast<unsigned>(p.splits));
  siglip_kernel<T, GEO, LOSS, GRAD><<<grid, kThreads, Epi::kScratchFloats * sizeof(float)>>>(W, sp, tp, gsp, p);
}

template <typename T, int GEO>
void siglip_dispatch(bool loss, bool grad, const float* W, const float* sp, const float* tp, const float* gsp,
                     const semcomp::siglip_epi::Params& p, int64_t c) {
  if (loss && grad) siglip_launch<T, GEO, true, true>(W, sp, tp, gsp, p, c);
  else if (grad) siglip_launch<T, GEO, false, true>(W, sp, tp, gsp, p, c);
  else siglip_launch<T, GEO, true, false>(W, sp, tp, gsp, p, c);
}

std::vector<at::Tensor> siglip(const at::Tensor& W, double scale, double bias, const std::optional<at::Tensor>& grad_rows,
                               double gscale, bool negative_only, bool loss, bool grad, bool bf16, int64_t geo,
                               int64_t chunk, int64_t splits) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat && W.is_contiguous(), "W: contiguous fp32 matrix");
  TORCH_CHECK(geo == 0 || geo == 1, "geo must be 0 or 1, got ", geo);
  TORCH_CHECK(loss || grad, "neither the loss nor the gradient asked for");
  const int64_t na = W.size(0), nb = W.size(1);
  TORCH_CHECK(splits >= 1 && splits <= ceil_div(nb, kBN), "splits: 1 .. column tiles, got ", splits);
  TORCH_CHECK(chunk >= 1, "chunk must be positive, got ", chunk);
  const auto opts = W.options();
  const at::Tensor s = at::full({1}, scale, opts), t = at::full({1}, bias, opts), gs = at::full({1}, gscale, opts);
  at::Tensor g;
  if (grad && grad_rows.has_value() && grad_rows->defined()) g = grad_rows->to(at::kFloat).contiguous();
  const int64_t C = std::min(chunk, na);
  const int64_t parts = (loss ? 1 : 0) + (grad ? 2 : 0);
  const auto dt = bf16 ? at::kBFloat16 : at::kHalf;
  at::Tensor part = at::empty({parts, splits, C}, opts);
  at::Tensor rows = at::empty({parts, na}, opts);
  at::Tensor gbuf, g_all;
  if (grad) {
    gbuf = at::empty({C, nb}, opts.dtype(dt));
    g_all = at::empty({na, nb}, opts.dtype(dt));
  } else {
    g_all = at::empty({0}, opts.dtype(dt));
  }
  semcomp::siglip_epi::Params p{};
  p.grad_rows = g.defined() ? g.const_data_ptr<float>() : nullptr;
  p.positive = !negative_only;
  p.nb = nb;
  p.gbuf = grad ? static_cast<uint16_t*>(gbuf.data_ptr()) : nullptr;
  p.ld_g = nb;
  p.pair_store = nb % 2 == 0;
  p.part = part.data_ptr<float>();
  p.splits = splits;
  p.ld_part = C;
  const float* gsp = (grad && gscale > 0) ? gs.const_data_ptr<float>() : nullptr;
  for (int64_t i0 = 0; i0 < na; i0 += C) {
    const int64_t c = std::min(C, na - i0);
    p.i0 = i0;
    p.rows_end = i0 + c;
    if (grad) gbuf.view(at::kShort).fill_(-1);  // unwritten elements and row shares: NaN
    part.fill_(std::numeric_limits<float>::quiet_NaN());
    if (bf16) {
      if (geo == 0) siglip_dispatch<c10::BFloat16, 0>(loss, grad, W.const_data_ptr<float>(), s.const_data_ptr<float>(), t.const_data_ptr<float>(), gsp, p, c);
      else siglip_dispatch<c10::BFloat16, 1>(loss, grad, W.const_data_ptr<float>(), s.const_data_ptr<float>(), t.const_data_ptr<float>(), gsp, p, c);
    } else {
      if (geo == 0) siglip_dispatch<c10::Half, 0>(loss, grad, W.const_data_ptr<float>(), s.const_data_ptr<float>(), t.const_data_ptr<float>(), gsp, p, c);
      else siglip_dispatch<c10::Half, 1>(loss, grad, W.const_data_ptr<float>(), s.const_data_ptr<float>(), t.const_data_ptr<float>(), gsp, p, c);
    }
    rows.narrow(1, i0, c).copy_(at::sum(part.narrow(2, 0, c), 1));  // splits in order
    if (grad) g_all.narrow(0, i0, c).copy_(gbuf.narrow(0, 0, c));
  }
  return {rows, g_all};
}

}  // namespace semcomp_epi_check

TORCH_LIBRARY(semcomp_epi_check, m) {
  m.def("infonce_fwd(Tensor W, float scale, int offset, bool sym, int geo, int pass_blocks, int splits) -> Tensor[]",
        &semcomp_epi_check::infonce_fwd);
  m.def("infonce_grad(Tensor W, float scale, float gscale, Tensor rlse, Tensor rcoef, Tensor dcoef, Tensor clse, "
        "Tensor ccoef, int offset, bool sym, bool bf16, int geo, int chunk, int splits) -> Tensor[]",
        &semcomp_epi_check::infonce_grad);
  m.def("siglip(Tensor W, float scale, float bias, Tensor? grad_rows, float gscale, bool negative_only, bool loss, "
        "bool grad, bool bf16, int geo, int chunk, int splits) -> Tensor[]",
        &semcomp_epi_check::siglip);
}
