// Fused sigmoid (SigLIP) loss on CUDA (math in siglip.h). The Na x Nb logit matrix is never
// built: rows of a are processed in chunks of C rows. Per chunk:
//
//   W = a_c b^T                      cuBLAS via ATen, in the accumulation dtype
//   rows_kernel<LOSS, GRAD>          one block per row of W: the row's loss sum_j softplus(z)
//                                    (minus z_ii for the positive), and with GRAD the block
//                                    s*G written over W plus the row shares of d scale
//                                    (sum_j G_ij W_ij) and d bias (sum_j G_ij)
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
// bf16/fp16 inputs are converted to fp32 once (2 x N x D x 4 bytes, still O(N)); the GEMMs then
// run in fp32. fp64 stays fp64.
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

#include "common/cuda_utils.cuh"
#include "siglip/siglip.h"

namespace semcomp {
namespace {

using namespace semcomp::cuda;

constexpr int kThreads = 256;
constexpr int64_t kBudgetElems = int64_t{32} << 20;  // default chunk: 32M logits (128 MB fp32)

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }

template <typename A>
__device__ __forceinline__ bool finite_(A x) {
  return x - x == A(0);  // false for NaN and +-inf
}

// One block per row rr of the chunk (global row i = i0 + rr). W: c x nb, row-major.
// softplus(z) = max(z, 0) + log1p(e), sigmoid(z) = (z >= 0 ? 1 : e) / (1 + e), e = exp(-|z|).
template <typename A, bool LOSS, bool GRAD>
__global__ void __launch_bounds__(kThreads)
rows_kernel(A* __restrict__ W, int64_t nb, int64_t i0, const A* __restrict__ scale,
            const A* __restrict__ bias, const A* __restrict__ grad_rows, bool positive,
            A* __restrict__ row_loss, A* __restrict__ row_ds, A* __restrict__ row_db) {
  const int64_t rr = blockIdx.x;
  const int64_t i = i0 + rr;
  A s = *scale, t = *bias;
  if (!finite_(s) || !finite_(t)) s = t = std::numeric_limits<A>::quiet_NaN();
  const A g = GRAD ? (grad_rows != nullptr ? grad_rows[i] : A(1)) : A(0);
  A* row = W + rr * nb;
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
      row[j] = s * gj;  // the GEMMs take s*G
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

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t pick_chunk(int64_t requested, int64_t rows, int64_t cols) {
  if (requested > 0) return std::min(requested, rows);
  const int64_t c = std::max<int64_t>(1, kBudgetElems / std::max<int64_t>(cols, 1));
  return std::min(c, rows);
}

struct Outputs {
  at::Tensor loss, total, ga, gb, gs, gt;
};

template <bool LOSS, bool GRAD, typename A>
Outputs run(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& logit_scale,
            const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
            int64_t chunk, bool keep_acc) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a_in.device().index()).stream();
  const at::ScalarType acc = acc_type(a_in.scalar_type());
  const at::Tensor a = a_in.to(acc).contiguous(), b = b_in.to(acc).contiguous();
  const at::Tensor s = logit_scale.to(acc).reshape({1}).contiguous();
  const at::Tensor t = logit_bias.to(acc).reshape({1}).contiguous();
  const int64_t na = a.size(0), nb = b.size(0);
  const auto opts = a.options();
  at::Tensor g;
  if (GRAD && grad_rows.defined()) g = grad_rows.to(acc).contiguous();

  const int64_t C = pick_chunk(chunk, na, nb);
  at::Tensor ws = at::empty({C, nb}, opts);
  at::Tensor row_loss = at::empty({na}, opts);
  at::Tensor row_ds = at::empty({na}, opts), row_db = at::empty({na}, opts);
  Outputs out;
  if (GRAD) {
    out.ga = at::empty_like(a);
    out.gb = at::zeros_like(b);
  }
  for (int64_t i0 = 0; i0 < na; i0 += C) {
    const int64_t c = std::min(C, na - i0);
    at::Tensor block = ws.narrow(0, 0, c);
    at::mm_out(block, a.narrow(0, i0, c), b.t());
    rows_kernel<A, LOSS, GRAD><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
        block.data_ptr<A>(), nb, i0, s.data_ptr<A>(), t.data_ptr<A>(),
        g.defined() ? g.data_ptr<A>() : nullptr, !negative_only, row_loss.data_ptr<A>(),
        row_ds.data_ptr<A>(), row_db.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (GRAD) {
      at::Tensor ga_block = out.ga.narrow(0, i0, c);
      at::mm_out(ga_block, block, b);
      out.gb.addmm_(block.t(), a.narrow(0, i0, c), /*beta=*/1, /*alpha=*/1);
    }
  }
  if (LOSS) {
    out.loss = row_loss;
    out.total = row_loss.sum();
  }
  if (GRAD) {
    if (!keep_acc) {
      out.ga = out.ga.to(a_in.scalar_type());
      out.gb = out.gb.to(b_in.scalar_type());
    }
    out.gs = row_ds.sum().reshape(logit_scale.sizes()).to(logit_scale.scalar_type());
    out.gt = row_db.sum().reshape(logit_bias.sizes()).to(logit_bias.scalar_type());
  }
  return out;
}

template <bool LOSS, bool GRAD>
Outputs dispatch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
                 const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
                 int64_t chunk, bool keep_acc = false) {
  if (a.scalar_type() == at::kDouble)
    return run<LOSS, GRAD, double>(a, b, logit_scale, logit_bias, grad_rows, negative_only, chunk,
                                   keep_acc);
  return run<LOSS, GRAD, float>(a, b, logit_scale, logit_bias, grad_rows, negative_only, chunk,
                                keep_acc);
}

at::Tensor sigmoid_fwd_cuda(const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                            bool negative_only, int64_t chunk_size) {
  check_sigmoid_args("sigmoid_fwd", a, b, logit_scale, logit_bias, negative_only);
  return dispatch<true, false>(a, b, logit_scale, logit_bias, at::Tensor(), negative_only,
                               chunk_size)
      .loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_bwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& grad_rows, bool negative_only,
    int64_t chunk_size) {
  constexpr const char* op = "sigmoid_bwd";
  check_sigmoid_args(op, a, b, logit_scale, logit_bias, negative_only);
  check_row_vector(op, "grad_rows", grad_rows, a.size(0), a);
  auto o = dispatch<false, true>(a, b, logit_scale, logit_bias, grad_rows, negative_only,
                                 chunk_size);
  return {o.ga, o.gb, o.gs, o.gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_fwd_bwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, bool negative_only, int64_t chunk_size) {
  check_sigmoid_args("sigmoid_fwd_bwd", a, b, logit_scale, logit_bias, negative_only);
  auto o = dispatch<true, true>(a, b, logit_scale, logit_bias, at::Tensor(), negative_only,
                                chunk_size, /*keep_acc=*/true);
  return {o.total, o.ga, o.gb, o.gs, o.gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, CUDA, m) {
  m.impl("sigmoid_fwd", &sigmoid_fwd_cuda);
  m.impl("sigmoid_bwd", &sigmoid_bwd_cuda);
  m.impl("sigmoid_fwd_bwd", &sigmoid_fwd_bwd_cuda);
}

}  // namespace semcomp
