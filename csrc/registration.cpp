// The whole op surface of semcomp_ext: every schema is defined here, once. Backends add
// implementations with TORCH_LIBRARY_IMPL(semcomp, CPU|CUDA, m) in csrc/<family>/; fake
// kernels and autograd are registered in semcomp_ext/_ops.py. This file also defines the
// Python module `semcomp_ext._C`, whose import loads the registrations.
//
// The module is written against the plain Python C API: it holds two functions, and this
// keeps a second pybind11 (beside the one torch's bindings carry) out of the process.
// Build with the GCC torch was built with, linking libstdc++ dynamically: an extension with
// its own static copy of libstdc++ crashes when a TORCH_CHECK message is formatted
// (benchmarks/native_error_check.py detects it).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "infonce/infonce.h"

#include <mutex>
#include <set>
#include <thread>

TORCH_LIBRARY(semcomp, m) {
  // Symmetric InfoNCE forward: per-row loss (N,), row and column log-sum-exp (N,) in the
  // accumulation dtype (fp32, or fp64 for fp64 inputs). chunk_size <= 0 picks a default.
  m.def("infonce_fwd(Tensor a, Tensor b, Tensor logit_scale, int chunk_size=0) -> (Tensor, Tensor, Tensor)");
  // Symmetric InfoNCE backward: G = row_coef*P^r + col_coef*P^c - diag_coef*I, returns
  // (grad_a, grad_b, grad_logit_scale).
  m.def("infonce_bwd(Tensor a, Tensor b, Tensor logit_scale, Tensor row_lse, Tensor col_lse, Tensor row_coef, Tensor col_coef, Tensor diag_coef, int chunk_size=0) -> (Tensor, Tensor, Tensor)");
  // One-directional InfoNCE of q (Nq, D) against k (Nk, D), positives at k[i + offset]:
  // per-row loss (Nq,) and row log-sum-exp (Nq,).
  m.def("infonce_rect_fwd(Tensor q, Tensor k, Tensor logit_scale, int offset=0, int chunk_size=0) -> (Tensor, Tensor)");
  // Its backward: G = row_coef*P - diag_coef*[j == i + offset]; (grad_q, grad_k, grad_logit_scale).
  m.def("infonce_rect_bwd(Tensor q, Tensor k, Tensor logit_scale, Tensor lse, Tensor row_coef, Tensor diag_coef, int offset=0, int chunk_size=0) -> (Tensor, Tensor, Tensor)");
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
  m.def("sigmoid_fwd(Tensor a, Tensor b, Tensor logit_scale, Tensor logit_bias, bool negative_only=False, int chunk_size=0) -> Tensor");
  // Its backward for per-row upstream gradients, logits recomputed chunk by chunk:
  // (grad_a, grad_b, grad_logit_scale, grad_logit_bias).
  m.def("sigmoid_bwd(Tensor a, Tensor b, Tensor logit_scale, Tensor logit_bias, Tensor grad_rows, bool negative_only=False, int chunk_size=0) -> (Tensor, Tensor, Tensor, Tensor)");
  // Both in one pass: the summed loss (0-d) and its gradients (grad_a, grad_b in the
  // accumulation dtype, grad_logit_scale, grad_logit_bias); nothing is recomputed.
  m.def("sigmoid_fwd_bwd(Tensor a, Tensor b, Tensor logit_scale, Tensor logit_bias, bool negative_only=False, int chunk_size=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

// Number of distinct threads at::parallel_for uses, compiled in this library exactly as the
// kernels are: it is 1 whenever the extension was built without OpenMP.
int parallel_thread_count(int64_t work_items) {
  std::mutex mu;
  std::set<std::thread::id> seen;
  at::parallel_for(0, work_items, 1, [&](int64_t lo, int64_t hi) {
    volatile double sink = 0;
    for (int64_t i = lo; i < hi; ++i)
      for (int j = 0; j < 20000; ++j) sink = sink + 1e-9 * j;
    std::lock_guard<std::mutex> lock(mu);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int>(seen.size());
}

}  // namespace

namespace semcomp {
std::atomic<int>& infonce_cuda_impl() {
  static std::atomic<int> mode{0};
  return mode;
}
std::atomic<int>& infonce_dk_accumulate_mode() {
  static std::atomic<int> mode{0};
  return mode;
}
}  // namespace semcomp

namespace {

PyObject* set_infonce_cuda_impl(PyObject*, PyObject* arg) {
  const long v = PyLong_AsLong(arg);
  if (v == -1 && PyErr_Occurred()) return nullptr;
  if (v < 0 || v > 2) {
    PyErr_Format(PyExc_ValueError, "infonce CUDA implementation must be 0, 1 or 2, got %ld", v);
    return nullptr;
  }
  semcomp::infonce_cuda_impl().store(static_cast<int>(v));
  Py_RETURN_NONE;
}

PyObject* get_infonce_cuda_impl(PyObject*, PyObject*) {
  return PyLong_FromLong(semcomp::infonce_cuda_impl().load());
}

PyObject* get_infonce_dk_accumulate(PyObject*, PyObject*) {
  return PyLong_FromLong(semcomp::infonce_dk_accumulate_mode().load());
}

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  auto put = [d](const char* key, PyObject* value) {
    if (value == nullptr) return false;
    const int rc = PyDict_SetItemString(d, key, value);
    Py_DECREF(value);
    return rc == 0;
  };
#ifdef SEMCOMP_WITH_CUDA
  constexpr bool cuda = true;
#else
  constexpr bool cuda = false;
#endif
#ifdef _OPENMP
  constexpr bool openmp = true;
#else
  constexpr bool openmp = false;
#endif
  if (!put("version", PyUnicode_FromString(SEMCOMP_VERSION)) ||
      !put("torch_version", PyUnicode_FromString(SEMCOMP_TORCH_VERSION)) ||
      !put("cuda", PyBool_FromLong(cuda)) ||
      !put("cuda_archs", PyUnicode_FromString(SEMCOMP_CUDA_ARCHS)) ||
      !put("openmp", PyBool_FromLong(openmp))) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

PyObject* parallel_thread_count_py(PyObject*, PyObject* arg) {
  const long long n = PyLong_AsLongLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  int count = 0;
  Py_BEGIN_ALLOW_THREADS
  count = parallel_thread_count(n);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(count);
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS,
     "Build information: version, torch version built against, CUDA compiled, archs, OpenMP."},
    {"_set_infonce_cuda_impl", set_infonce_cuda_impl, METH_O,
     "Selects the CUDA InfoNCE implementation for bf16/fp16: 0 auto, 1 gemm, 2 tile."},
    {"_infonce_cuda_impl", get_infonce_cuda_impl, METH_NOARGS,
     "The selected CUDA InfoNCE implementation (0 auto, 1 gemm, 2 tile)."},
    {"_infonce_dk_accumulate", get_infonce_dk_accumulate, METH_NOARGS,
     "How the CUDA backward accumulates dk: 0 not yet used, 1 addmm.dtype_out, 2 mm + add_."},
    {"_parallel_thread_count", parallel_thread_count_py, METH_O,
     "Distinct threads used by at::parallel_for inside this library (test hook)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "semcomp_ext native kernels (ops are registered under torch.ops.semcomp)",
                       -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kModule); }
