// Fused sigmoid (SigLIP) loss on CUDA (math in siglip.h). The Na x Nb logit matrix is never
// built: rows of a are processed in chunks of C rows. Per chunk:
//
//   W = a_c b^T                      cuBLAS via ATen, fp32 output (fp64 for fp64 inputs)
//   rows_kernel<LOSS, GRAD>          one block per row of W: the row's loss sum_j softplus(z)
//                                    (minus z_ii for the positive), and with GRAD the block
//                                    s*G (over W in place, or in the input dtype: below) plus
//                                    the row shares of d scale (sum_j G_ij W_ij) and d bias
//                                    (sum_j G_ij)
//   da_c = (sG) b,  db += (sG)^T a_c two GEMMs (GRAD only)
//   finally: fixed-order sums of the per-row partials (no float atomics anywhere).
//
// Thread mapping: blockDim.x = 256 threads stride over the Nb columns of one row (coalesced
// reads and writes of W); the row sums are block reductions (fixed shuffle trees: results are
// reproducible for a given chunk size). The thread that meets column j == i treats it as the
// positive pair (y = +1) in its own loop.
//
// logit_scale and logit_bias stay on the device: the kernels read them through pointers (no
// host sync). A non-finite value cannot raise without a sync, so on CUDA it poisons the outputs
// (NaN losses and gradients) instead; the CPU backend raises.
// bf16/fp16 inputs run mixed, as InfoNCE's gemm path: the GEMMs read the inputs in their own
// dtype (tensor cores) and accumulate and write in fp32 (ATen's out_dtype overloads, torch >=
// 2.8); the s*G block is rounded once to the input dtype for the two backward GEMMs (as
// PyTorch's own low-precision autograd rounds the logits' gradient), fp16 times a power-of-two
// pre-scale (pow2_prescale) so that small entries do not flush to zero; da is written in fp32
// by one GEMM and db accumulated across chunks in an fp32 buffer. Losses, d scale and d bias
// come from the fp32 W and G. fp32 and fp64 inputs stay in their dtype; on older torch bf16
// and fp16 are converted to fp32 once (2 x N x D x 4 bytes).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_utils.cuh"  // also SEMCOMP_MM_OUT_DTYPE, addmm_fp32_accumulate
#include "common/impl_choice.h"
#include "infonce/infonce.h"      // infonce_dk_accumulate_mode(): how torch takes an fp32 bias
#include "siglip/siglip.h"
#include "siglip/siglip_mma.h"
#include "siglip/siglip_wgmma.h"

namespace semcomp {
namespace {

using namespace semcomp::cuda;

constexpr int kThreads = 256;
// default chunk: the W block (and, mixed, the G block) of one chunk fits 128 MiB
constexpr int64_t kBudgetBytes = int64_t{128} << 20;

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }

template <typename A>
__device__ __forceinline__ bool finite_(A x) {
  return x - x == A(0);  // false for NaN and +-inf
}

// One block per row rr of the chunk (global row i = i0 + rr). W: c x nb, row-major; with GRAD
// s*G (times gscale[0] when given) is stored to G (c x nb, GT), which may be W itself (GT ==
// A: each element is read before the same thread overwrites it).
// softplus(z) = max(z, 0) + log1p(e), sigmoid(z) = (z >= 0 ? 1 : e) / (1 + e), e = exp(-|z|).
template <typename A, typename GT, bool LOSS, bool GRAD>
__global__ void __launch_bounds__(kThreads)
rows_kernel(const A* W, GT* G, int64_t nb, int64_t i0, const A* __restrict__ scale,
            const A* __restrict__ bias, const A* __restrict__ grad_rows,
            const A* __restrict__ gscale, bool positive, A* __restrict__ row_loss,
            A* __restrict__ row_ds, A* __restrict__ row_db) {
  const int64_t rr = blockIdx.x;
  const int64_t i = i0 + rr;
  A s = *scale, t = *bias;
  if (!finite_(s) || !finite_(t)) s = t = std::numeric_limits<A>::quiet_NaN();
  const A g = GRAD ? (grad_rows != nullptr ? grad_rows[i] : A(1)) : A(0);
  const A sg = gscale != nullptr ? s * gscale[0] : s;  // stored: s*G, times the fp16 pre-scale
  const A* row = W + rr * nb;
  GT* grow = G + rr * nb;
  A l = 0, ds = 0, db = 0;
  for (int64_t j = threadIdx.x; j < nb; j += kThreads) {
    const A x = row[j];
    const A z = mul_rn(s, x) + t;
    const A e = exp_(-fabs(z));
    // the positive pair (y = +1) is softplus(-z) and -g sigmoid(-z), computed as such (not as
    // softplus(z) - z, which cancels for a confident positive)
    const bool pos = positive && j == i;
    const A yz = pos ? -z : z;
    if (LOSS) l += (yz > A(0) ? yz : A(0)) + log1p_(e);
    if (GRAD) {
      const A r = A(1) / (A(1) + e);
      const A gj = (pos ? -g : g) * (yz >= A(0) ? r : e * r);
      ds += gj * x;
      db += gj;
      grow[j] = static_cast<GT>(sg * gj);  // the GEMMs take s*G
    }
  }
  if (LOSS) {
    l = block_sum(l);
    if (threadIdx.x == 0) row_loss[i] = l;
  }
  if (GRAD) {
    ds = block_sum(ds);
    db = block_sum(db);
    if (threadIdx.x == 0) {
      row_ds[i] = ds;
      row_db[i] = db;
    }
  }
}

template <typename T>
constexpr bool kMixed = SEMCOMP_MM_OUT_DTYPE && !std::is_same_v<T, acc_t<T>>;

// Rows per chunk: the requested size, or as many as fit the budget with bytes_per_elem bytes
// per element of the C x nb block(s). The same with and without GRAD, so a separate backward
// splits the rows as its forward did.
int64_t pick_chunk(int64_t requested, int64_t rows, int64_t cols, int64_t bytes_per_elem) {
  if (requested > 0) return std::min(requested, rows);
  const int64_t c = std::max<int64_t>(1, kBudgetBytes / (std::max<int64_t>(cols, 1) * bytes_per_elem));
  return std::min(c, rows);
}

// A GEMM operand: the input itself when the GEMMs run mixed, else in the accumulation dtype.
template <typename T>
at::Tensor gemm_operand(const at::Tensor& x) {
  if constexpr (kMixed<T>) return x.contiguous();
  return x.to(std::is_same_v<acc_t<T>, double> ? at::kDouble : at::kFloat).contiguous();
}

// out (accumulation dtype) = m1 m2 (fp32 output from bf16/fp16 operands when mixed).
template <typename T>
void mm_acc(at::Tensor out, const at::Tensor& m1, const at::Tensor& m2) {
#if SEMCOMP_MM_OUT_DTYPE
  if constexpr (kMixed<T>) {
    at::mm_out(out, m1, m2, at::kFloat);
    return;
  }
#endif
  at::mm_out(out, m1, m2);
}

// acc (accumulation dtype) += m1 m2.
template <typename T>
void addmm_acc(at::Tensor& acc, const at::Tensor& m1, const at::Tensor& m2, at::Tensor& scratch) {
#if SEMCOMP_MM_OUT_DTYPE
  if constexpr (kMixed<T>) {
    addmm_fp32_accumulate(acc, m1, m2, scratch, infonce_dk_accumulate_mode());
    return;
  }
#endif
  acc.addmm_(m1, m2, /*beta=*/1, /*alpha=*/1);
}

using Outputs = siglip_mma::Outputs;  // loss, total, ga, gb, gs, gt

// T: the input dtype; A: the accumulation dtype; GT: the dtype of the s*G block the backward
// GEMMs read (T when mixed, else A, written over W in place).
template <bool LOSS, bool GRAD, typename T>
Outputs run(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& logit_scale,
            const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
            int64_t chunk, bool keep_acc) {
  using A = acc_t<T>;
  using GT = std::conditional_t<kMixed<T>, T, A>;
  constexpr bool kPrescale = GRAD && kMixed<T> && std::is_same_v<T, at::Half>;
  const c10::cuda::CUDAGuard guard(a_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a_in.device().index()).stream();
  const auto opts = a_in.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const at::Tensor a = gemm_operand<T>(a_in), b = gemm_operand<T>(b_in);
  const at::Tensor s = logit_scale.to(opts).reshape({1}).contiguous();
  const at::Tensor t = logit_bias.to(opts).reshape({1}).contiguous();
  const int64_t na = a.size(0), nb = b.size(0), d = a.size(1);
  at::Tensor g;
  if (GRAD && grad_rows.defined()) g = grad_rows.to(opts).contiguous();
  // fp16: |s*G_ij| <= |s| max|g_i| (sigmoid < 1) bounds the stored block
  at::Tensor gscale;
  if constexpr (kPrescale) gscale = pow2_prescale(g.defined() ? s.abs().mul(g.abs().amax()) : s.abs());

  const int64_t C = pick_chunk(chunk, na, nb, sizeof(A) + (kMixed<T> ? sizeof(T) : 0));
  at::Tensor ws = at::empty({C, nb}, opts);
  at::Tensor gbuf = (GRAD && kMixed<T>) ? at::empty({C, nb}, a.options()) : ws;
  at::Tensor row_loss = at::empty({na}, opts);
  at::Tensor row_ds = at::empty({na}, opts), row_db = at::empty({na}, opts);
  at::Tensor scratch;  // only for the addmm_fp32_accumulate fallback
  Outputs out;
  if (GRAD) {
    out.ga = at::empty({na, d}, opts);
    out.gb = at::zeros({nb, d}, opts);
  }
  for (int64_t i0 = 0; i0 < na; i0 += C) {
    const int64_t c = std::min(C, na - i0);
    at::Tensor block = ws.narrow(0, 0, c), gblock = gbuf.narrow(0, 0, c);
    const at::Tensor ac = a.narrow(0, i0, c);
    mm_acc<T>(block, ac, b.t());
    rows_kernel<A, GT, LOSS, GRAD><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
        block.const_data_ptr<A>(), reinterpret_cast<GT*>(gblock.data_ptr()), nb, i0,
        s.const_data_ptr<A>(), t.const_data_ptr<A>(), g.defined() ? g.const_data_ptr<A>() : nullptr,
        kPrescale ? gscale.const_data_ptr<A>() : nullptr, !negative_only, row_loss.data_ptr<A>(),
        row_ds.data_ptr<A>(), row_db.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (GRAD) {
      mm_acc<T>(out.ga.narrow(0, i0, c), gblock, b);  // da_c = (sG) b
      addmm_acc<T>(out.gb, gblock.t(), ac, scratch);  // db += (sG)^T a_c
    }
  }
  if (LOSS) {
    out.loss = row_loss;
    out.total = row_loss.sum();
  }
  if (GRAD) {
    if constexpr (kPrescale) {
      const at::Tensor inv = gscale.reciprocal();  // exact: a power of two
      out.ga.mul_(inv);
      out.gb.mul_(inv);
    }
    if (!keep_acc) {
      out.ga = out.ga.to(a_in.scalar_type());
      out.gb = out.gb.to(b_in.scalar_type());
    }
    out.gs = row_ds.sum().reshape(logit_scale.sizes()).to(logit_scale.scalar_type());
    out.gt = row_db.sum().reshape(logit_bias.sizes()).to(logit_bias.scalar_type());
  }
  return out;
}

// The implementation one call runs (common/impl_choice.h): kImplGemm (this file), kImplMma
// (siglip_mma.h) or kImplWgmma (siglip_wgmma.h). impl is the op's argument: 0 gemm (SigLIP has
// no process-wide setting), > 0 exactly that one, < 0 that one where it can run. There is no
// SigLIP tile implementation (an exact request for it is refused, a preference runs gemm). An
// exact request that cannot run is a ValueError naming it and why; anything else falls back to
// gemm. The forward and the backward see the same a and b, so both resolve a given impl to the
// same implementation.
int resolve_impl(const char* op, int64_t impl, const at::Tensor& a, const at::Tensor& b) {
  check_impl_range(op, impl);
  const int want = static_cast<int>(impl < 0 ? -impl : impl);
  if (want <= kImplGemm) return kImplGemm;
  TORCH_CHECK_VALUE(impl < 0 || want == kImplMma || want == kImplWgmma, op, ": impl=", impl, " (",
                    impl_name(want), ") is not an implementation of the sigmoid ops (they have 1 gemm, "
                    "3 mma and 4 wgmma)");
  if (want != kImplMma && want != kImplWgmma) return kImplGemm;
  const bool lowp = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  const char* needs = nullptr;
  if (!lowp) {
    needs = "bf16/fp16 inputs";
  } else if (want == kImplMma && !siglip_mma::available(a)) {
    needs = "compute capability >= 8.0, torch >= 2.8 and D > 0";
  } else if (want == kImplWgmma && !siglip_wgmma::available(a, b)) {
    needs = "a build with its sm_90a kernels, compute capability 9.0, torch >= 2.8, D > 0 a multiple "
            "of 8 and contiguous 16-byte aligned rows";
  }
  if (needs == nullptr) return want;
  TORCH_CHECK_VALUE(impl <= 0, op, ": impl=", impl, " (", impl_name(want),
                    ") cannot run these inputs: it needs ", needs, "; got ", a.scalar_type(), " ",
                    a.sizes(), " on ", a.device());
  return kImplGemm;
}

template <bool LOSS, bool GRAD>
Outputs dispatch(const char* op, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                 const at::Tensor& grad_rows, bool negative_only, int64_t chunk, int64_t impl,
                 bool keep_acc = false) {
  const int which = resolve_impl(op, impl, a, b);
  if (which == kImplMma || which == kImplWgmma) {
    const c10::cuda::CUDAGuard guard(a.device());
    return which == kImplMma ? siglip_mma::run(a, b, logit_scale, logit_bias, grad_rows, negative_only,
                                               LOSS, GRAD, chunk, keep_acc)
                             : siglip_wgmma::run(a, b, logit_scale, logit_bias, grad_rows, negative_only,
                                                 LOSS, GRAD, chunk, keep_acc);
  }
  switch (a.scalar_type()) {
    case at::kDouble:
      return run<LOSS, GRAD, double>(a, b, logit_scale, logit_bias, grad_rows, negative_only,
                                     chunk, keep_acc);
    case at::kBFloat16:
      return run<LOSS, GRAD, at::BFloat16>(a, b, logit_scale, logit_bias, grad_rows,
                                           negative_only, chunk, keep_acc);
    case at::kHalf:
      return run<LOSS, GRAD, at::Half>(a, b, logit_scale, logit_bias, grad_rows, negative_only,
                                       chunk, keep_acc);
    default:
      return run<LOSS, GRAD, float>(a, b, logit_scale, logit_bias, grad_rows, negative_only,
                                    chunk, keep_acc);
  }
}

at::Tensor sigmoid_fwd_cuda(const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                            bool negative_only, int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "sigmoid_fwd";
  check_sigmoid_args(op, a, b, logit_scale, logit_bias, negative_only);
  return dispatch<true, false>(op, a, b, logit_scale, logit_bias, at::Tensor(), negative_only,
                               chunk_size, impl)
      .loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_bwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
    int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "sigmoid_bwd";
  check_sigmoid_args(op, a, b, logit_scale, logit_bias, negative_only);
  check_row_vector(op, "grad_rows", grad_rows, a.size(0), a);
  auto o = dispatch<false, true>(op, a, b, logit_scale, logit_bias, grad_rows, negative_only,
                                 chunk_size, impl);
  return {o.ga, o.gb, o.gs, o.gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_fwd_bwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, bool negative_only, int64_t chunk_size, int64_t impl) {
  constexpr const char* op = "sigmoid_fwd_bwd";
  check_sigmoid_args(op, a, b, logit_scale, logit_bias, negative_only);
  auto o = dispatch<true, true>(op, a, b, logit_scale, logit_bias, at::Tensor(), negative_only,
                                chunk_size, impl, /*keep_acc=*/true);
  return {o.total, o.ga, o.gb, o.gs, o.gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CUDA, m) {
  m.impl("sigmoid_fwd", &sigmoid_fwd_cuda);
  m.impl("sigmoid_bwd", &sigmoid_bwd_cuda);
  m.impl("sigmoid_fwd_bwd", &sigmoid_fwd_bwd_cuda);
}

}  // namespace semcomp
