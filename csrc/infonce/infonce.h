// Fused InfoNCE: argument checks shared by the CPU and CUDA front ends.
//
// Symmetric form (a, b: N x D):       S = s * a b^T, r_i = LSE_j S_ij, c_j = LSE_i S_ij,
//   loss_i = ((r_i - S_ii) + (c_i - S_ii)) / 2
// Rectangular form (q: Nq x D, k: Nk x D, positives at k[i + offset]):
//   loss_i = r_i - S_{i, i+offset}
// Backward takes per-row coefficients so every reduction (and gradients flowing into the
// saved log-sum-exps) is one kernel:
//   G_ij = row_coef_i * exp(S_ij - r_i) + col_coef_j * exp(S_ij - c_j) - diag_coef_i * [j == i + offset]
//   dq = s G k,   dk = s G^T q,   ds = sum_ij G_ij <q_i, k_j>
#pragma once

#include <atomic>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace semcomp {

// ---- process-wide state (infonce_state.cpp) ---------------------------------------------

// Which CUDA implementation the InfoNCE ops use for bf16/fp16 inputs when their impl argument
// is 0 (common/impl_choice.h; fp32/fp64 always use "gemm"): 0 auto (= gemm here; the Python
// API resolves "auto" from its measured table), 1 gemm (cuBLAS logits in fp32 + LSE/gradient
// kernels), 2 tile (tensor-core tiles fused with the LSE/gradient epilogues, infonce_tile.h),
// 3 mma (infonce_mma.h), 4 wgmma (infonce_wgmma.h); one that cannot run the inputs falls back
// to gemm. Process-wide; set from Python with semcomp_ext.set_infonce_cuda_impl().
std::atomic<int>& infonce_cuda_impl();

// How the CUDA backward accumulates dk (fp32) from bf16/fp16 blocks, decided on first use:
// 0 not yet used, 1 one addmm.dtype_out per chunk, 2 mm.dtype_out into a scratch block plus
// add_ (torch versions whose addmm.dtype_out rejects an fp32 bias; one extra pass over dk per
// chunk). Reported by semcomp_ext.build_info()["infonce_dk_accumulate"].
std::atomic<int>& infonce_dk_accumulate_mode();

// Names of the input dtypes ("bfloat16", "float16") whose CPU InfoNCE runs its logit and
// gradient GEMMs in that dtype with fp32 accumulation on this machine (infonce_cpu.cpp).
std::vector<std::string> infonce_cpu_lowp_dtypes();

inline void check_infonce_pair(const char* op, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& logit_scale, bool symmetric, int64_t offset) {
  const char* qn = symmetric ? "a" : "q";
  const char* kn = symmetric ? "b" : "k";
  check_matrix(op, qn, q);
  check_matrix(op, kn, k);
  check_same_device_dtype(op, qn, q, kn, k);
  TORCH_CHECK_VALUE(q.size(1) == k.size(1), op, ": ", qn, " and ", kn,
              " must have the same feature dimension D, got ", q.size(1), " and ", k.size(1));
  TORCH_CHECK_VALUE(q.size(0) > 0, op, ": empty batch: ", qn, " has 0 rows");
  if (symmetric) {
    TORCH_CHECK_VALUE(q.size(0) == k.size(0), op,
                ": a and b must have the same number of rows N (row i of a pairs with row i of b), got ",
                q.size(0), " and ", k.size(0));
  } else {
    TORCH_CHECK_VALUE(offset >= 0 && offset + q.size(0) <= k.size(0), op, ": offset must satisfy 0 <= offset and offset + Nq <= Nk (positives at k[i + offset]), got offset=",
                offset, ", Nq=", q.size(0), ", Nk=", k.size(0));
  }
  check_scale(op, logit_scale, q);
}

// Backward ops: the pair checks, then every per-row vector (name, tensor), each of length Nq.
inline void check_infonce_bwd(const char* op, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& logit_scale, bool symmetric, int64_t offset,
                              std::initializer_list<std::pair<const char*, const at::Tensor*>> rows) {
  check_infonce_pair(op, q, k, logit_scale, symmetric, offset);
  for (const auto& [name, t] : rows) check_row_vector(op, name, *t, q.size(0), q);
}

}  // namespace semcomp
