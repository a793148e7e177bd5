// Schema of the rpe_ops library. The CPU kernels register themselves in
// cpu/rpe_index_kernel.cpp; the CUDA kernels (Triton) from Python in rpe_ops/cuda.py,
// as autograd and the fake (meta) kernels are in rpe_ops/__init__.py.
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu/block_cache.h"
#include "cpu/loops.h"

TORCH_LIBRARY(rpe_ops, m) {
  // Y[b, h, i, j] = input[b, h, i, index[i, j]]:  (B, H, Lq, K) -> (B, H, Lq, Lk)
  m.def("rpe_index(Tensor input, Tensor index) -> Tensor");
  // out[b, h, i, t] = sum_j values[b, h, i, j] * [index[i, j] == t]:
  // (B, H, Lq, Lk) -> (B, H, Lq, num_buckets). Each is the other's backward.
  m.def("rpe_reduce(Tensor values, Tensor index, int num_buckets) -> Tensor");
  // The iRPE terms on keys and on queries of self-attention logits in one pass:
  // Y[b, h, i, j] = input[b, h, i, index[i, j]] + input_t[b, h, j, index_t[i, j]]
  // input (B, H, Lq, K), input_t (B, H, Lk, Kt), index and index_t (Lq, Lk).
  m.def("rpe_index_qk(Tensor input, Tensor index, Tensor input_t, Tensor index_t) -> Tensor");
  // Its backward, one read of values for both tables:
  // out[b, h, i, t] = sum_j values[b, h, i, j] * [index[i, j] == t]     (B, H, Lq, num_buckets)
  // out_t[b, h, j, t] = sum_i values[b, h, i, j] * [index_t[i, j] == t] (B, H, Lk, num_buckets_t)
  m.def("rpe_reduce_qk(Tensor values, Tensor index, int num_buckets, Tensor index_t, "
        "int num_buckets_t) -> (Tensor, Tensor)");
}

// A plain Python module (no pybind11): importing rpe_ops._C loads the library
// above; its functions report and set the CPU kernels' state.
namespace {

// fn(), with a C++ exception raised as a Python one: ValueError for a bad setting, RuntimeError otherwise.
template <typename Fn>
PyObject* guarded(Fn fn) {
  try {
    return fn();
  } catch (const std::exception& error) {
    const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
    PyErr_SetString(dynamic_cast<const c10::ValueError*>(&error) ? PyExc_ValueError : PyExc_RuntimeError,
                    c10_error ? c10_error->what_without_backtrace() : error.what());
    return nullptr;
  }
}

// {'loops': 'portable' | 'avx512', 'reason': why, 'available': the sets this CPU runs}
PyObject* cpu_loops(PyObject*, PyObject*) {
  return guarded([] {
    const rpe_ops::LoopsReport report = rpe_ops::loops_report();
    PyObject* available = PyList_New(0);
    for (const std::string& name : report.available) {
      PyObject* item = PyUnicode_FromString(name.c_str());
      PyList_Append(available, item);
      Py_DECREF(item);
    }
    return Py_BuildValue("{s:s,s:s,s:N}", "loops", report.loops.c_str(), "reason", report.reason.c_str(),
                         "available", available);
  });
}

PyObject* set_cpu_loops(PyObject*, PyObject* arg) {
  const char* setting = PyUnicode_AsUTF8(arg);
  if (setting == nullptr) return nullptr;
  return guarded([&] { return PyUnicode_FromString(rpe_ops::set_loops(setting).c_str()); });
}

// {'cached_bytes', 'cached_blocks', 'limit_bytes', 'hits', 'misses'}
PyObject* block_cache_stats(PyObject*, PyObject*) {
  return guarded([] {
    const rpe_ops::block_cache::Stats s = rpe_ops::block_cache::stats();
    return Py_BuildValue("{s:n,s:n,s:n,s:n,s:n}", "cached_bytes", static_cast<Py_ssize_t>(s.cached_bytes),
                         "cached_blocks", static_cast<Py_ssize_t>(s.cached_blocks), "limit_bytes",
                         static_cast<Py_ssize_t>(s.limit_bytes), "hits", static_cast<Py_ssize_t>(s.hits), "misses",
                         static_cast<Py_ssize_t>(s.misses));
  });
}

PyObject* block_cache_empty(PyObject*, PyObject*) {
  return guarded([] {
    rpe_ops::block_cache::empty();
    Py_RETURN_NONE;
  });
}

PyObject* block_cache_install(PyObject*, PyObject*) {
  return guarded([] { return PyBool_FromLong(rpe_ops::block_cache::install()); });
}

PyObject* block_cache_installed(PyObject*, PyObject*) {
  return guarded([] { return PyBool_FromLong(rpe_ops::block_cache::installed()); });
}

PyMethodDef methods[] = {
    {"cpu_loops", cpu_loops, METH_NOARGS, "Which CPU loops the ops run, and why (see cpu/loops.h)."},
    {"set_cpu_loops", set_cpu_loops, METH_O,
     "Force the CPU loops of every op ('portable', 'avx512') or 'auto'; returns the previous setting."},
    {"block_cache_stats", block_cache_stats, METH_NOARGS, "Counters of the CPU block cache (see cpu/block_cache.h)."},
    {"block_cache_empty", block_cache_empty, METH_NOARGS, "Free the blocks the CPU block cache keeps."},
    {"block_cache_install", block_cache_install, METH_NOARGS,
     "Make the block cache torch's CPU allocator; False if it already was or keeps nothing."},
    {"block_cache_installed", block_cache_installed, METH_NOARGS, "Whether the block cache is torch's CPU allocator."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
