// The whole op surface of semcomp_ext: every schema is defined here, once, and nothing else
// is. Backends add implementations with TORCH_LIBRARY_IMPL(semcomp, CPU|CUDA, m) in
// csrc/<family>/; fake kernels and autograd are registered in semcomp_ext/_ops.py. The Python
// module semcomp_ext._C, whose import loads these registrations, is csrc/module.cpp.
//
// `int impl=0` (the InfoNCE and sigmoid ops) picks the CUDA implementation of one call
// (csrc/common/impl_choice.h): 0 the default (InfoNCE: the process-wide
// set_infonce_cuda_impl setting; SigLIP: gemm), 1 gemm, 2 tile (InfoNCE only), 3 mma, 4 wgmma
// exactly (a ValueError when that implementation cannot run the inputs), -1..-4 that
// implementation where it can run, else gemm. The CPU kernels take 0 and -1..-4 (they have one
// implementation) and refuse 1..4. A backward must get its forward's impl (it recomputes the
// forward's logits bit for bit).
#include <torch/library.h>

TORCH_LIBRARY(semcomp, m) {
  // Symmetric InfoNCE forward: per-row loss (N,), row and column log-sum-exp (N,) in the
  // accumulation dtype (fp32, or fp64 for fp64 inputs). chunk_size <= 0 picks a default.
  m.def("infonce_fwd(Tensor a, Tensor b, Tensor logit_scale, int chunk_size=0, int impl=0) -> (Tensor, Tensor, Tensor)");
  // Symmetric InfoNCE backward: G = row_coef*P^r + col_coef*P^c - diag_coef*I, returns
  // (grad_a, grad_b, grad_logit_scale).
  m.def("infonce_bwd(Tensor a, Tensor b, Tensor logit_scale, Tensor row_lse, Tensor col_lse, Tensor row_coef, Tensor col_coef, Tensor diag_coef, int chunk_size=0, int impl=0) -> (Tensor, Tensor, Tensor)");
  // One-directional InfoNCE of q (Nq, D) against k (Nk, D), positives at k[i + offset]:
  // per-row loss (Nq,) and row log-sum-exp (Nq,).
  m.def("infonce_rect_fwd(Tensor q, Tensor k, Tensor logit_scale, int offset=0, int chunk_size=0, int impl=0) -> (Tensor, Tensor)");
  // Its backward: G = row_coef*P - diag_coef*[j == i + offset]; (grad_q, grad_k, grad_logit_scale).
  m.def("infonce_rect_bwd(Tensor q, Tensor k, Tensor logit_scale, Tensor lse, Tensor row_coef, Tensor diag_coef, int offset=0, int chunk_size=0, int impl=0) -> (Tensor, Tensor, Tensor)");
  // Segment mean: (num_groups, K) means (K = len(features) or D) and int64 counts (num_groups,).
  m.def("segment_mean(Tensor x, Tensor ids, SymInt num_groups, Tensor? features=None) -> (Tensor, Tensor)");
  // Its backward: (N, dim) with grad[ids_i] / counts[ids_i] scattered into the kept columns.
  m.def("segment_mean_bwd(Tensor grad, Tensor ids, Tensor counts, SymInt dim, Tensor? features=None) -> Tensor");
  // Column gather: x[:, index] (N, K).
  m.def("gather_columns(Tensor x, Tensor index) -> Tensor");
  // Its backward: scatter-add of grad (N, K) into zeros (N, dim).
  m.def("gather_columns_bwd(Tensor grad, Tensor index, SymInt dim) -> Tensor");
  // Row-aligned mean over M modalities with the column gather fused (csrc/gather/pair_mean.h):
  // (N, K) means in the accumulation dtype and (N,) bool, true where every column of every
  // modality is finite.
  m.def("pair_mean(Tensor[] zs, Tensor? features=None) -> (Tensor, Tensor)");
  // Sigmoid (SigLIP) loss, z = logit_scale * a b^T + logit_bias, positives on the diagonal
  // unless negative_only (csrc/siglip/siglip.h): per-row loss (Na,) in the accumulation dtype.
  m.def("sigmoid_fwd(Tensor a, Tensor b, Tensor logit_scale, Tensor logit_bias, bool negative_only=False, int chunk_size=0, int impl=0) -> Tensor");
  // Its backward for per-row upstream gradients, logits recomputed chunk by chunk:
  // (grad_a, grad_b, grad_logit_scale, grad_logit_bias).
  m.def("sigmoid_bwd(Tensor a, Tensor b, Tensor logit_scale, Tensor logit_bias, Tensor grad_rows, bool negative_only=False, int chunk_size=0, int impl=0) -> (Tensor, Tensor, Tensor, Tensor)");
  // Both in one pass: the summed loss (0-d) and its gradients (grad_a, grad_b in the
  // accumulation dtype, grad_logit_scale, grad_logit_bias); nothing is recomputed.
  m.def("sigmoid_fwd_bwd(Tensor a, Tensor b, Tensor logit_scale, Tensor logit_bias, bool negative_only=False, int chunk_size=0, int impl=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
