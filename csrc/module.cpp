// The Python module semcomp_ext._C: importing it loads the op registrations
// (csrc/registration.cpp and the backends' TORCH_LIBRARY_IMPL blocks). It holds build
// information, a probe of the CPU kernels' threading, and InfoNCE's state functions
// (csrc/infonce/infonce_state.cpp).
//
// Written against the plain Python C API: this keeps a second pybind11 (beside the one torch's
// bindings carry) out of the process. Build with the GCC torch was built with, linking
// libstdc++ dynamically: an extension with its own static copy of libstdc++ crashes when a
// TORCH_CHECK message is formatted (benchmarks/native_error_check.py detects it).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "infonce/infonce.h"

namespace semcomp {
std::vector<PyMethodDef> infonce_python_methods();  // infonce/infonce_state.cpp
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

PyObject* string_list(const std::vector<std::string>& items) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (const auto& s : items) {
    PyObject* item = PyUnicode_FromString(s.c_str());
    if (item == nullptr || PyList_Append(list, item) != 0) {
      Py_XDECREF(item);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return list;
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
      !put("openmp", PyBool_FromLong(openmp)) ||
      !put("cpu_lowp_gemm", string_list(semcomp::infonce_cpu_lowp_dtypes()))) {
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

// The method table: lives as long as the module (static), terminated by a null entry.
PyMethodDef* methods() {
  static std::vector<PyMethodDef> table = [] {
    std::vector<PyMethodDef> t = {
        {"build_info", build_info, METH_NOARGS,
         "Build information: version, torch version built against, CUDA compiled, archs, OpenMP, "
         "dtypes with low-precision CPU GEMMs."},
        {"_parallel_thread_count", parallel_thread_count_py, METH_O,
         "Distinct threads used by at::parallel_for inside this library (test hook)."},
    };
    for (const auto& m : semcomp::infonce_python_methods()) t.push_back(m);
    t.push_back({nullptr, nullptr, 0, nullptr});
    return t;
  }();
  return table.data();
}

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "semcomp_ext native kernels (ops are registered under torch.ops.semcomp)",
                       -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  kModule.m_methods = methods();
  return PyModule_Create(&kModule);
}
