// Fused InfoNCE on CUDA (see infonce.h for the math). The N x N logit matrix is never built:
// rows of q are processed in chunks of C rows. Per chunk:
//
//   forward   W = q_c k^T            cuBLAS via ATen, fp32 output (fp64 for fp64 inputs)
//             logit_partials_kernel  one read of W: per-tile row partials and, for the
//                                    symmetric form, per-tile column partials (max, sum)
//             row_merge_kernel       row LSE r_i, diagonal S_ii (and the rect loss)
//             col_merge_kernel       folds the chunk's column partials into running
//                                    per-column (max, sum) states
//   finally   sym_finish_kernel      column LSE c_j and loss_i = (r_i + c_i)/2 - S_ii
//
//   backward  W = q_c k^T; grad_kernel writes s*G (G from the coefficient form) and the row
//             share of d(logit_scale) = sum_j G_ij W_ij; then dq_c = (sG) k and
//             dk += (sG)^T q_c (two GEMMs, no B x D atomics); ds = sum of the row shares.
//
// Numerics: every LSE is kept as an online state (max m, sum of exp(S - m)) in natural units,
// each exponential computed as exp2((S - m) log2(e)) (one MUFU.EX2 in fp32), so a logit scale
// of 100 cannot overflow (the running max is subtracted first). The logits S = W s are
// computed by mul_rn (never fused into an FMA) in the forward and the backward alike, and both
// passes split the rows into the same chunks (infonce_chunks.h), so every W block has the same
// shape and operands in both: the backward sees the forward's S bit for bit (one column:
// exp(S - r) is exactly 1, and the loss and all gradients at N = 1 are exactly 0). Partials
// are merged in a fixed order: no float atomics anywhere, results are bit-for-bit
// reproducible for a given chunk size.
// bf16/fp16 inputs: GEMMs read the inputs in their own dtype (tensor cores) and write fp32
// through ATen's out_dtype overloads (torch >= 2.8); the G block is rounded once to the input
// dtype for the two backward GEMMs (as PyTorch's own bf16 autograd would do), dq is written
// in the input dtype by one GEMM, dk is accumulated across chunks in an fp32 buffer
// (addmm.dtype_out, or mm.dtype_out + add_ where torch rejects an fp32 bias). On older
// torch the inputs are upcast to fp32 once (correct, slower, 2 x N x D x 4 extra bytes).
//
// logit_scale stays on the device: kernels read it through a pointer (no host sync). A
// non-positive or non-finite scale cannot raise without a sync, so on CUDA it poisons the
// outputs instead: row/column LSEs, losses and gradients become NaN. The Python API
// validates Python floats, and the CPU backend raises for tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "common/cuda_utils.cuh"  // also SEMCOMP_MM_OUT_DTYPE
#include "common/impl_choice.h"
#include "infonce/infonce.h"
#include "infonce/infonce_chunks.h"
#include "infonce/infonce_tile.h"
#include "infonce/infonce_lse.cuh"
#include "infonce/infonce_mma.h"
#include "infonce/infonce_wgmma.h"

namespace semcomp {
namespace {

using namespace semcomp::cuda;
using semcomp::infonce_lse::col_merge_kernel;
using semcomp::infonce_lse::finish_fwd;
using semcomp::infonce_lse::FwdPartials;
using semcomp::infonce_lse::scale_ok;

constexpr int kThreads = 256;            // 8 warps in every kernel below
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTileRows = 64;        // rows of W per partials tile (8 per warp)

// ---- forward (gemm path) ----------------------------------------------------------------
// Tile = kTileRows rows x 32*V columns of W (V = 16 bytes / sizeof(A) when nk % V == 0).
// Thread mapping: lane l owns columns j0 + l*V .. + V - 1; warp w walks rows w, w + 8, ...
// Row partial: warp max, then warp sum of exp2(x - max), written by lane 0 per row.
// Column partial: each lane keeps an online state per column over its warp's rows; the
// 8 warp states are merged in warp order through shared memory.
template <typename A, int V, bool SYM>
__global__ void __launch_bounds__(kThreads)
logit_partials_kernel(const A* __restrict__ W, int64_t c, int64_t nk, const A* __restrict__ scale,
                A* __restrict__ row_pm, A* __restrict__ row_ps, int64_t n_ct,
                A* __restrict__ col_pm, A* __restrict__ col_ps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ct = blockIdx.x, rt = blockIdx.y;
  const int64_t j0 = ct * 32 * V + lane * V;
  const bool valid = j0 < nk;  // nk % V == 0 when V > 1: a vector is all in or all out
  const A sc = scale[0];
  Lse2<A> col[V];
#pragma unroll
  for (int v = 0; v < V; ++v) col[v] = Lse2<A>::empty();
  for (int64_t rr = warp; rr < kTileRows; rr += kWarps) {
    const int64_t r = rt * kTileRows + rr;
    if (r >= c) break;
    A x[V];
    if (valid) {
      const Vec<A, V> w = *reinterpret_cast<const Vec<A, V>*>(W + r * nk + j0);
#pragma unroll
      for (int v = 0; v < V; ++v) x[v] = mul_rn(w.v[v], sc);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) x[v] = neg_inf<A>();
    }
    A m = x[0];
#pragma unroll
    for (int v = 1; v < V; ++v) m = nan_max(m, x[v]);
    m = warp_max(m);  // finite or NaN: every tile holds at least one valid column
    A e = A(0);
    if (valid) {
#pragma unroll
      for (int v = 0; v < V; ++v) e += exp_diff(x[v], m);
    }
    e = warp_sum(e);
    if (lane == 0) {
      row_pm[r * n_ct + ct] = m;
      row_ps[r * n_ct + ct] = e;
    }
    if constexpr (SYM) {
      if (valid) {
#pragma unroll
        for (int v = 0; v < V; ++v) col[v].add(x[v]);
      }
    }
  }
  if constexpr (SYM) {
    __shared__ A sm[kWarps][32 * V], ss[kWarps][32 * V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      sm[warp][lane * V + v] = col[v].m;
      ss[warp][lane * V + v] = col[v].s;
    }
    __syncthreads();
    if (threadIdx.x < 32 * V) {
      const int t = threadIdx.x;
      const int64_t j = ct * 32 * V + t;
      if (j < nk) {
        Lse2<A> st{sm[0][t], ss[0][t]};
        for (int w = 1; w < kWarps; ++w) st.merge(sm[w][t], ss[w][t]);
        col_pm[rt * nk + j] = st.m;
        col_ps[rt * nk + j] = st.s;
      }
    }
  }
}

// One warp per chunk row: merges the row's n_ct tile partials (lane-strided, then a fixed
// shuffle tree), writes r_i (natural log), S_ii, and for the rect form loss_i = r_i - S_ii.
template <typename A, bool SYM>
__global__ void __launch_bounds__(kThreads)
row_merge_kernel(const A* __restrict__ pm, const A* __restrict__ ps, int64_t n_ct, int64_t c,
                 int64_t i0, const A* __restrict__ W, int64_t nk, int64_t offset,
                 const A* __restrict__ scale, A* __restrict__ rlse, A* __restrict__ diag,
                 A* __restrict__ loss) {
  const int lane = threadIdx.x & 31;
  const int64_t rr = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (rr >= c) return;  // uniform per warp
  const A* m = pm + rr * n_ct;
  const A* s = ps + rr * n_ct;
  A mx = neg_inf<A>();
  for (int64_t t = lane; t < n_ct; t += 32) mx = nan_max(mx, m[t]);
  mx = warp_max(mx);
  A sum = A(0);
  for (int64_t t = lane; t < n_ct; t += 32) sum += s[t] * exp_diff(m[t], mx);
  sum = warp_sum(sum);
  if (lane == 0) {
    const A sc = scale[0];
    const int64_t i = i0 + rr;
    A r = mx + log2_(sum) * kLn2<A>;
    if (!scale_ok(sc)) r = std::numeric_limits<A>::quiet_NaN();  // poison (see top)
    const A d = mul_rn(W[rr * nk + i + offset], sc);
    rlse[i] = r;
    if constexpr (SYM) diag[i] = d; else loss[i] = r - d;
  }
}

// ---- backward -----------------------------------------------------------------------------
// One block per chunk row; threads walk V-vectors of the row. For each element
//   g = rc_i exp(x - r_i) [+ cc_j exp(x - c_j)] - dc_i [j == i + offset],  x = mul_rn(W, s)
// (exp_diff; r, c natural), ds_i += g W_ij, and s*g is stored (in place when GT == A),
// times gscale[0] when given (fp16: see bwd_impl).
// ds_i is reduced over the block (fixed tree) into ds_rows[i].
template <typename A, typename GT, int V, bool SYM>
__global__ void __launch_bounds__(kThreads)
grad_kernel(const A* W, GT* G, int64_t nk, int64_t i0, int64_t offset,
            const A* __restrict__ scale, const A* __restrict__ rlse,
            const A* __restrict__ rcoef, const A* __restrict__ dcoef, const A* __restrict__ clse,
            const A* __restrict__ ccoef, const A* __restrict__ gscale, A* __restrict__ ds_rows) {
  const int64_t rr = blockIdx.x, i = i0 + rr;
  const A s = scale_ok(scale[0]) ? scale[0] : std::numeric_limits<A>::quiet_NaN();  // poison
  const A sg = gscale ? s * gscale[0] : s;  // stored value s*G, times the fp16 pre-scale
  const A r = rlse[i], rc = rcoef[i], dc = dcoef[i];
  const int64_t jd = i + offset;
  const A* w = W + rr * nk;
  GT* g = G + rr * nk;
  A ds = A(0);
  for (int64_t j0 = int64_t(threadIdx.x) * V; j0 < nk; j0 += int64_t(blockDim.x) * V) {
    const Vec<A, V> wv = *reinterpret_cast<const Vec<A, V>*>(w + j0);
    Vec<A, V> cv, ccv;
    if constexpr (SYM) {
      cv = *reinterpret_cast<const Vec<A, V>*>(clse + j0);
      ccv = *reinterpret_cast<const Vec<A, V>*>(ccoef + j0);
    }
    Vec<GT, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const A x = mul_rn(wv.v[v], s);
      A gv = rc * exp_diff(x, r);
      if constexpr (SYM) gv += ccv.v[v] * exp_diff(x, cv.v[v]);
      if (j0 + v == jd) gv -= dc;
      ds += gv * wv.v[v];
      out.v[v] = static_cast<GT>(sg * gv);
    }
    *reinterpret_cast<Vec<GT, V>*>(g + j0) = out;
  }
  ds = block_sum(ds);
  if (threadIdx.x == 0) ds_rows[i] = ds;
}

// ---- host drivers ------------------------------------------------------------------------

unsigned grid_1d(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 65536)));
}

template <typename T>
constexpr bool kMixed = SEMCOMP_MM_OUT_DTYPE && !std::is_same_v<T, acc_t<T>>;

// gemm path: rows per chunk, the same in the forward and the backward (infonce_chunks.h).
template <typename T>
int64_t gemm_chunk(int64_t requested, int64_t rows, int64_t cols) {
  return chunks::chunk_rows(requested, rows, cols,
                            chunks::gemm_bytes_per_logit(sizeof(acc_t<T>), sizeof(T), kMixed<T>));
}

template <typename T>
at::Tensor gemm_operand(const at::Tensor& x) {
  using A = acc_t<T>;
  if constexpr (kMixed<T>) return x.contiguous();
  return x.to(std::is_same_v<A, double> ? at::kDouble : at::kFloat).contiguous();
}

// out (c x nk, accumulation dtype) = q_c k^T.
template <typename T>
void dots(at::Tensor& out, const at::Tensor& qc, const at::Tensor& k) {
#if SEMCOMP_MM_OUT_DTYPE
  if constexpr (kMixed<T>) {
    at::mm_out(out, qc, k.t(), at::kFloat);
    return;
  }
#endif
  at::mm_out(out, qc, k.t());
}

// The implementation one call runs (common/impl_choice.h): kImplGemm, kImplTile, kImplMma or
// kImplWgmma. impl is the op's argument: 0 the process-wide setting (infonce_cuda_impl(); 0
// there means gemm), > 0 exactly that one, < 0 that one where it can run. The tensor-core
// implementations need bf16/fp16 GEMM operands (kMixed) and d > 0 (d = 0: every logit 0, the
// gemm path); mma and wgmma also what their available() checks. An exact request that cannot
// run is a ValueError naming it and what it needs; anything else falls back to gemm. q, k: the
// GEMM operands (contiguous), the same tensors in the forward and the backward, so both
// passes resolve a given impl to the same implementation.
template <typename T>
int resolve_impl(const char* op, int64_t impl, const at::Tensor& q, const at::Tensor& k) {
  check_impl_range(op, impl);
  const int want = impl == 0 ? infonce_cuda_impl().load() : static_cast<int>(impl < 0 ? -impl : impl);
  if (want <= kImplGemm) return kImplGemm;
  constexpr bool lowp = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
  const char* needs = nullptr;
  if (!lowp) {
    needs = "bf16/fp16 inputs";
  } else if (!kMixed<T>) {
    needs = "torch >= 2.8 (mm.dtype_out)";
  } else if (q.size(1) == 0) {
    needs = "D > 0";
  } else if (want == kImplMma && !mma::available(q)) {
    needs = "compute capability >= 8.0";
  } else if (want == kImplWgmma && !wgmma::available(q, k)) {
    needs = "a build with its sm_90a kernels, compute capability 9.0 and 16-byte aligned rows";
  }
  if (needs == nullptr) return want;
  TORCH_CHECK_VALUE(impl <= 0, op, ": impl=", impl, " (", impl_name(want),
                    ") cannot run these inputs: it needs ", needs, "; got ",
                    c10::CppTypeToScalarType<T>::value, " ", q.sizes(), " on ", q.device());
  return kImplGemm;
}

// Forward on the tile kernels: logits never leave the SM. q, k contiguous bf16/fp16, d > 0.
// The symmetric form runs in chunks of rows whose column partials fit the budget of
// infonce_chunks.h; each chunk's partials are folded into running column states, in row-block
// order (the same fold as one pass over all rows). Row partials of every chunk land in one
// (splits, nq) buffer, merged once at the end.
template <bool SYM>
std::vector<at::Tensor> tile_fwd_impl(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& s, int64_t offset) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t nq = q.size(0), nk = k.size(0);
  const auto opts = q.options().dtype(at::kFloat);
  const int64_t C = chunks::tile_fwd_chunk_rows(nq, nk, SYM);
  const int64_t n_rb = ceil_div(C, tile::kBM), n_ct = ceil_div(nk, tile::kBN);
  TORCH_CHECK_VALUE(n_rb <= kMaxGridX, "infonce: too many rows (", nq, ")");
  const int64_t splits = tile::pick_splits(n_rb, n_ct, tile::device_sms(q));
  FwdPartials p(splits, nq, n_rb, nk, SYM, opts);
  const float* sp = s.const_data_ptr<float>();
  for (int64_t i0 = 0; i0 < nq; i0 += C) {
    const int64_t c = std::min(C, nq - i0);
    tile::launch_fwd(q, k, sp, offset, SYM, splits, i0, c, p.rpm, p.rps, p.cpm, p.cps, p.diag);
    if constexpr (SYM) p.merge_columns(ceil_div(c, tile::kBM), stream);
  }
  return p.template finish<SYM>(sp, stream);
}

template <typename T, bool SYM>
std::vector<at::Tensor> fwd_impl(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                                 const at::Tensor& logit_scale, int64_t offset, int64_t chunk,
                                 int64_t impl_arg) {
  using A = acc_t<T>;
  constexpr int VW = 16 / sizeof(A);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q_in.device().index()).stream();
  const at::Tensor q = gemm_operand<T>(q_in), k = gemm_operand<T>(k_in);
  const int64_t nq = q.size(0), nk = k.size(0);
  const auto opts = q_in.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const int impl = resolve_impl<T>(op, impl_arg, q, k);
  const at::Tensor s = logit_scale.reshape({1}).to(opts).contiguous();  // stays on device
  if (impl == kImplTile) return tile_fwd_impl<SYM>(q, k, s, offset);
  if (impl == kImplMma) return mma::fwd(q, k, s, offset, SYM, chunk);
  if (impl == kImplWgmma) return wgmma::fwd(q, k, s, offset, SYM, chunk);
  const int64_t C = gemm_chunk<T>(chunk, nq, nk);
  const int V = nk % VW == 0 ? VW : 1;
  const int64_t n_ct = ceil_div(nk, 32 * V), n_rt = ceil_div(C, kTileRows);
  TORCH_CHECK_VALUE(n_rt <= kMaxGridY, "infonce: chunk_size too large (", C, ")");
  at::Tensor ws = at::empty({C, nk}, opts);
  at::Tensor rpm = at::empty({C, n_ct}, opts), rps = at::empty({C, n_ct}, opts);
  at::Tensor loss = at::empty({nq}, opts), rlse = at::empty({nq}, opts), diag;
  at::Tensor cpm, cps, cm, cs;
  if constexpr (SYM) {
    diag = at::empty({nq}, opts);
    cpm = at::empty({n_rt, nk}, opts);
    cps = at::empty({n_rt, nk}, opts);
    cm = at::full({nk}, -std::numeric_limits<double>::infinity(), opts);
    cs = at::zeros({nk}, opts);
  }
  const A* sp = s.const_data_ptr<A>();
  for (int64_t i0 = 0; i0 < nq; i0 += C) {
    const int64_t c = std::min(C, nq - i0);
    at::Tensor w = ws.narrow(0, 0, c);
    dots<T>(w, q.narrow(0, i0, c), k);
    const dim3 grid(static_cast<unsigned>(n_ct), static_cast<unsigned>(ceil_div(c, kTileRows)));
    A* cpm_p = SYM ? cpm.data_ptr<A>() : nullptr;
    A* cps_p = SYM ? cps.data_ptr<A>() : nullptr;
    if (V == VW) {
      logit_partials_kernel<A, VW, SYM><<<grid, kThreads, 0, stream>>>(
          w.const_data_ptr<A>(), c, nk, sp, rpm.data_ptr<A>(), rps.data_ptr<A>(), n_ct, cpm_p, cps_p);
    } else {
      logit_partials_kernel<A, 1, SYM><<<grid, kThreads, 0, stream>>>(
          w.const_data_ptr<A>(), c, nk, sp, rpm.data_ptr<A>(), rps.data_ptr<A>(), n_ct, cpm_p, cps_p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_merge_kernel<A, SYM><<<static_cast<unsigned>(ceil_div(c, kWarps)), kThreads, 0, stream>>>(
        rpm.const_data_ptr<A>(), rps.const_data_ptr<A>(), n_ct, c, i0, w.const_data_ptr<A>(), nk,
        offset, sp, rlse.data_ptr<A>(), SYM ? diag.data_ptr<A>() : nullptr, loss.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if constexpr (SYM) {
      col_merge_kernel<A><<<grid_1d(nk), kThreads, 0, stream>>>(
          cpm.const_data_ptr<A>(), cps.const_data_ptr<A>(), ceil_div(c, kTileRows), nk,
          cm.data_ptr<A>(), cs.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return finish_fwd<A, SYM>(cm, cs, rlse, diag, loss, sp, stream);
}

// ---- backward, in steps ---------------------------------------------------------------------

// The backward's per-row (and, symmetric, per-column) inputs in the accumulation dtype,
// contiguous on the device; s is the logit scale as a (1,) device tensor.
struct BwdCoefs {
  at::Tensor s, rlse, rcoef, dcoef, clse, ccoef;  // clse, ccoef: symmetric form only
};

BwdCoefs bwd_coefs(const at::TensorOptions& opts, bool sym, const at::Tensor& logit_scale,
                   const at::Tensor& rlse, const at::Tensor& clse, const at::Tensor& rcoef,
                   const at::Tensor& ccoef, const at::Tensor& dcoef) {
  BwdCoefs b;
  b.s = logit_scale.reshape({1}).to(opts).contiguous();
  b.rlse = rlse.to(opts).contiguous();
  b.rcoef = rcoef.to(opts).contiguous();
  b.dcoef = dcoef.to(opts).contiguous();
  if (sym) {  // column LSEs in natural units, as the forward wrote them
    b.clse = clse.to(opts).contiguous();
    b.ccoef = ccoef.to(opts).contiguous();
  }
  return b;
}

// fp16 G blocks are stored times a power of two (pow2_prescale, cuda_utils.cuh) chosen so that
// the largest possible entry, s * (max|row_coef| + max|col_coef| + max|diag_coef|), lands near
// 2^14; dq is then computed in fp32 and both gradients are multiplied by 1/p before the cast.
at::Tensor fp16_grad_prescale(const BwdCoefs& b, bool sym) {
  at::Tensor m = b.rcoef.abs().amax().add(b.dcoef.abs().amax());
  if (sym) m = m.add(b.ccoef.abs().amax());
  return pow2_prescale(m.mul(b.s.reshape({})));
}

// gemm path, one chunk of rows [i0, i0 + c): W = q_c k^T in fp32 (fp64) into w, then
// grad_kernel stores s*G into g (GT: the input dtype when the GEMMs run mixed, else over W in
// place) and the rows' shares of d(logit_scale) into ds_rows.
template <typename T, bool SYM>
void grad_block_gemm(at::Tensor& w, at::Tensor& g, const at::Tensor& qc, const at::Tensor& k,
                     int64_t i0, int64_t offset, const BwdCoefs& b, const acc_t<T>* gsp,
                     at::Tensor& ds_rows, cudaStream_t stream) {
  using A = acc_t<T>;
  using GT = std::conditional_t<kMixed<T>, T, A>;
  constexpr int VW = 16 / sizeof(A);
  const int64_t c = qc.size(0), nk = k.size(0);
  dots<T>(w, qc, k);
  // Vector loads of W, col_lse and col_coef need nk % VW == 0 and 16-byte aligned vectors
  // (col_lse and col_coef may arrive as views with an odd storage offset).
  const bool ccoef_aligned =
      !SYM || (aligned16(b.ccoef.const_data_ptr()) && aligned16(b.clse.const_data_ptr()));
  const A* c2p = SYM ? b.clse.const_data_ptr<A>() : nullptr;
  const A* ccp = SYM ? b.ccoef.const_data_ptr<A>() : nullptr;
  GT* gp = reinterpret_cast<GT*>(g.data_ptr());
  const unsigned blocks = static_cast<unsigned>(c);
  if (nk % VW == 0 && ccoef_aligned) {
    grad_kernel<A, GT, VW, SYM><<<blocks, kThreads, 0, stream>>>(
        w.const_data_ptr<A>(), gp, nk, i0, offset, b.s.const_data_ptr<A>(),
        b.rlse.const_data_ptr<A>(), b.rcoef.const_data_ptr<A>(), b.dcoef.const_data_ptr<A>(), c2p,
        ccp, gsp, ds_rows.data_ptr<A>());
  } else {
    grad_kernel<A, GT, 1, SYM><<<blocks, kThreads, 0, stream>>>(
        w.const_data_ptr<A>(), gp, nk, i0, offset, b.s.const_data_ptr<A>(),
        b.rlse.const_data_ptr<A>(), b.rcoef.const_data_ptr<A>(), b.dcoef.const_data_ptr<A>(), c2p,
        ccp, gsp, ds_rows.data_ptr<A>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile path, one chunk of rows [i0, i0 + c) (bf16/fp16, fp32 coefficients): s*G straight from
// the tensor-core tiles into g; the per-split ds shares are summed into ds_rows (fixed order).
void grad_block_tile(const at::Tensor& q, const at::Tensor& k, int64_t i0, int64_t c,
                     int64_t offset, bool sym, int64_t splits, const BwdCoefs& b,
                     const float* gsp, at::Tensor& g, at::Tensor& ds_part, at::Tensor& ds_rows) {
  tile::launch_grad(q, k, b.s.const_data_ptr<float>(), i0, c, offset, sym, splits,
                    b.rlse.const_data_ptr<float>(), b.rcoef.const_data_ptr<float>(),
                    b.dcoef.const_data_ptr<float>(), sym ? b.clse.const_data_ptr<float>() : nullptr,
                    sym ? b.ccoef.const_data_ptr<float>() : nullptr, gsp, g, ds_part);
  ds_rows.narrow(0, i0, c).copy_(at::sum(ds_part.narrow(1, 0, c), 0));
}

// The two products of one chunk: dq_c = (sG) k into gq_blk (one rounding to the GEMM dtype;
// fp32 when the block is pre-scaled) and dk += (sG)^T q_c into the fp32 (fp64) accumulator gk.
template <typename T, bool kPrescale>
void apply_grad_block(const at::Tensor& g, const at::Tensor& qc, const at::Tensor& k,
                      at::Tensor gq_blk, at::Tensor& gk, at::Tensor& scratch) {
#if SEMCOMP_MM_OUT_DTYPE
  if constexpr (kPrescale) {
    at::mm_out(gq_blk, g, k, at::kFloat);  // p * dq_c in fp32
  } else {
    at::mm_out(gq_blk, g, k);
  }
  if constexpr (kMixed<T>) {
    addmm_fp32_accumulate(gk, g.t(), qc, scratch, infonce_dk_accumulate_mode());
    return;
  }
#else
  at::mm_out(gq_blk, g, k);
#endif
  at::addmm_out(gk, gk, g.t(), qc, /*beta=*/1, /*alpha=*/1);
}

template <typename T, bool SYM>
std::vector<at::Tensor> bwd_impl(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                                 const at::Tensor& logit_scale, const at::Tensor& rlse_in,
                                 const at::Tensor& clse_in, const at::Tensor& rcoef_in,
                                 const at::Tensor& ccoef_in, const at::Tensor& dcoef_in,
                                 int64_t offset, int64_t chunk, int64_t impl_arg) {
  using A = acc_t<T>;
  constexpr bool kPrescale = kMixed<T> && std::is_same_v<T, at::Half>;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q_in.device().index()).stream();
  const at::Tensor q = gemm_operand<T>(q_in), k = gemm_operand<T>(k_in);
  const int64_t nq = q.size(0), nk = k.size(0);
  const auto opts = q_in.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const int impl = resolve_impl<T>(op, impl_arg, q, k);
  const BwdCoefs b = bwd_coefs(opts, SYM, logit_scale, rlse_in, clse_in, rcoef_in, ccoef_in, dcoef_in);
  if (impl == kImplMma)
    return mma::bwd(q, k, logit_scale, b.s, b.rlse, b.rcoef, b.dcoef, b.clse, b.ccoef, offset, SYM, chunk);
  if (impl == kImplWgmma)
    return wgmma::bwd(q, k, logit_scale, b.s, b.rlse, b.rcoef, b.dcoef, b.clse, b.ccoef, offset, SYM, chunk);
  // The tile path needs only the G block (input dtype); the gemm path also the W block, and
  // splits the rows exactly as its forward did.
  const bool tiled = impl == kImplTile;
  const int64_t C = tiled ? chunks::chunk_rows(chunk, nq, nk, sizeof(T)) : gemm_chunk<T>(chunk, nq, nk);
  const at::Tensor gscale = kPrescale ? fp16_grad_prescale(b, SYM) : at::Tensor();
  const A* gsp = kPrescale ? gscale.const_data_ptr<A>() : nullptr;
  at::Tensor ws = tiled ? at::Tensor() : at::empty({C, nk}, opts);
  at::Tensor gbuf = kMixed<T> ? at::empty({C, nk}, q.options()) : ws;
  int64_t splits = 0;
  at::Tensor ds_part;
  if (tiled) {
    splits = tile::pick_splits(ceil_div(C, tile::kBM), ceil_div(nk, tile::kBN), tile::device_sms(q));
    ds_part = at::empty({splits, C}, opts);
  }
  // dq in the GEMM dtype (cast at the end), or fp32 when the G blocks are pre-scaled
  at::Tensor gq = at::empty({nq, q.size(1)}, kPrescale ? opts : q.options());
  at::Tensor gk = at::zeros({nk, k.size(1)}, opts);  // fp32 (fp64) accumulator
  at::Tensor ds_rows = at::empty({nq}, opts);
  at::Tensor scratch;  // only for the addmm_fp32_accumulate fallback
  for (int64_t i0 = 0; i0 < nq; i0 += C) {
    const int64_t c = std::min(C, nq - i0);
    at::Tensor g = gbuf.narrow(0, 0, c);
    const at::Tensor qc = q.narrow(0, i0, c);
    if (tiled) {
      grad_block_tile(q, k, i0, c, offset, SYM, splits, b, reinterpret_cast<const float*>(gsp), g,
                      ds_part, ds_rows);
    } else {
      at::Tensor w = ws.narrow(0, 0, c);
      grad_block_gemm<T, SYM>(w, g, qc, k, i0, offset, b, gsp, ds_rows, stream);
    }
    apply_grad_block<T, kPrescale>(g, qc, k, gq.narrow(0, i0, c), gk, scratch);
  }
  // Deterministic reduction of the row shares (ATen's sum has a fixed order for a fixed size).
  at::Tensor gs = at::sum(ds_rows).reshape(logit_scale.sizes()).to(logit_scale.scalar_type());
  if constexpr (kPrescale) {
    const at::Tensor inv = gscale.reciprocal();  // exact: p is a power of two
    gq.mul_(inv);
    gk.mul_(inv);
  }
  return {gq.to(q_in.scalar_type()), gk.to(k_in.scalar_type()), gs};
}

// T dispatch: the input dtype picks the template; the accumulation dtype follows.
template <bool SYM, typename F>
auto dispatch(const char* op, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kDouble: return f(double{});
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t);  // unreachable after check_matrix
  return f(float{});
}

// ---- registered CUDA entry points -----------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cuda(const at::Tensor& a,
                                                                const at::Tensor& b,
                                                                const at::Tensor& logit_scale,
                                                                int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "infonce_fwd";
  check_infonce_pair(op, a, b, logit_scale, /*symmetric=*/true, 0);
  c10::cuda::CUDAGuard guard(a.device());
  auto out = dispatch<true>(op, a.scalar_type(), [&](auto tag) {
    return fwd_impl<decltype(tag), true>(op, a, b, logit_scale, 0, chunk_size, impl);
  });
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_coef,
    const at::Tensor& col_coef, const at::Tensor& diag_coef, int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "infonce_bwd";
  check_infonce_bwd(op, a, b, logit_scale, /*symmetric=*/true, 0,
                    {{"row_lse", &row_lse}, {"col_lse", &col_lse}, {"row_coef", &row_coef},
                     {"col_coef", &col_coef}, {"diag_coef", &diag_coef}});
  c10::cuda::CUDAGuard guard(a.device());
  auto out = dispatch<true>(op, a.scalar_type(), [&](auto tag) {
    return bwd_impl<decltype(tag), true>(op, a, b, logit_scale, row_lse, col_lse, row_coef,
                                         col_coef, diag_coef, 0, chunk_size, impl);
  });
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> infonce_rect_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& logit_scale,
                                                         int64_t offset, int64_t chunk_size,
                                                         int64_t impl) {
  constexpr const char* op = "infonce_rect_fwd";
  check_infonce_pair(op, q, k, logit_scale, /*symmetric=*/false, offset);
  c10::cuda::CUDAGuard guard(q.device());
  auto out = dispatch<false>(op, q.scalar_type(), [&](auto tag) {
    return fwd_impl<decltype(tag), false>(op, q, k, logit_scale, offset, chunk_size, impl);
  });
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_rect_bwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& logit_scale,
    const at::Tensor& lse, const at::Tensor& row_coef, const at::Tensor& diag_coef, int64_t offset,
    int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "infonce_rect_bwd";
  check_infonce_bwd(op, q, k, logit_scale, /*symmetric=*/false, offset,
                    {{"lse", &lse}, {"row_coef", &row_coef}, {"diag_coef", &diag_coef}});
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor none;
  auto out = dispatch<false>(op, q.scalar_type(), [&](auto tag) {
    return bwd_impl<decltype(tag), false>(op, q, k, logit_scale, lse, none, row_coef, none,
                                          diag_coef, offset, chunk_size, impl);
  });
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CUDA, m) {
  m.impl("infonce_fwd", &infonce_fwd_cuda);
  m.impl("infonce_bwd", &infonce_bwd_cuda);
  m.impl("infonce_rect_fwd", &infonce_rect_fwd_cuda);
  m.impl("infonce_rect_bwd", &infonce_rect_bwd_cuda);
}

}  // namespace semcomp
