// InfoNCE's process-wide state (declared in infonce.h) and the semcomp_ext._C functions that
// read and set it (listed in the module by csrc/module.cpp).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "infonce/infonce.h"

namespace semcomp {

std::atomic<int>& infonce_cuda_impl() {
  static std::atomic<int> mode{0};
  return mode;
}

std::atomic<int>& infonce_dk_accumulate_mode() {
  static std::atomic<int> mode{0};
  return mode;
}

namespace {

PyObject* set_infonce_cuda_impl(PyObject*, PyObject* arg) {
  const long v = PyLong_AsLong(arg);
  if (v == -1 && PyErr_Occurred()) return nullptr;
  if (v < 0 || v > 4) {
    PyErr_Format(PyExc_ValueError, "infonce CUDA implementation must be 0, 1, 2, 3 or 4, got %ld", v);
    return nullptr;
  }
  infonce_cuda_impl().store(static_cast<int>(v));
  Py_RETURN_NONE;
}

PyObject* get_infonce_cuda_impl(PyObject*, PyObject*) {
  return PyLong_FromLong(infonce_cuda_impl().load());
}

PyObject* get_infonce_dk_accumulate(PyObject*, PyObject*) {
  return PyLong_FromLong(infonce_dk_accumulate_mode().load());
}

}  // namespace

std::vector<PyMethodDef> infonce_python_methods() {
  return {
      {"_set_infonce_cuda_impl", set_infonce_cuda_impl, METH_O,
       "Selects the CUDA InfoNCE implementation for bf16/fp16: 0 auto, 1 gemm, 2 tile, 3 mma, 4 wgmma."},
      {"_infonce_cuda_impl", get_infonce_cuda_impl, METH_NOARGS,
       "The selected CUDA InfoNCE implementation (0 auto, 1 gemm, 2 tile, 3 mma, 4 wgmma)."},
      {"_infonce_dk_accumulate", get_infonce_dk_accumulate, METH_NOARGS,
       "How the CUDA backward accumulates dk: 0 not yet used, 1 addmm.dtype_out, 2 mm + add_."},
  };
}

}  // namespace semcomp
