// Schema of the rpe_ops library. The CPU kernels register themselves in
// cpu/rpe_index_kernel.cpp; the CUDA kernel (Triton, or cuda/rpe_index_kernel.cu)
// from Python in rpe_ops/cuda.py, as autograd and the fake (meta) kernels are
// in rpe_ops/__init__.py.
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu/loops.h"
#include "cpu/output_cache.h"

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
// above, and compiled_with_cuda() tells build_info() which kernels exist.
namespace {

PyObject* compiled_with_cuda(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// A C++ exception as a Python one: ValueError for a bad setting, RuntimeError otherwise.
PyObject* raise(const std::exception& error) {
  PyErr_SetString(dynamic_cast<const c10::ValueError*>(&error) ? PyExc_ValueError : PyExc_RuntimeError,
                  dynamic_cast<const c10::Error*>(&error) ? static_cast<const c10::Error&>(error).what_without_backtrace()
                                                          : error.what());
  return nullptr;
}

// {'setting', 'set_by', 'candidates': [...], 'ops': {op: {'loops', 'reason', 'milliseconds': {loops: ms}}}}
PyObject* cpu_loops(PyObject*, PyObject*) {
  rpe_ops::LoopsReport report;
  try {
    report = rpe_ops::loops_report();
  } catch (const std::exception& error) {
    return raise(error);
  }
  PyObject* candidates = PyList_New(0);
  for (const std::string& c : report.candidates) {
    PyObject* name = PyUnicode_FromString(c.c_str());
    PyList_Append(candidates, name);
    Py_DECREF(name);
  }
  PyObject* ops = PyDict_New();
  for (const auto& choice : report.ops) {
    PyObject* ms = PyDict_New();
    for (const auto& [loops, milliseconds] : choice.milliseconds) {
      PyObject* value = PyFloat_FromDouble(milliseconds);
      PyDict_SetItemString(ms, loops.c_str(), value);
      Py_DECREF(value);
    }
    PyObject* loops = choice.loops.empty() ? (Py_INCREF(Py_None), Py_None) : PyUnicode_FromString(choice.loops.c_str());
    PyObject* entry = Py_BuildValue("{s:N,s:s,s:N}", "loops", loops, "reason", choice.reason.c_str(), "milliseconds", ms);
    PyDict_SetItemString(ops, choice.op.c_str(), entry);
    Py_DECREF(entry);
  }
  return Py_BuildValue("{s:s,s:s,s:N,s:N}", "setting", report.setting.c_str(), "set_by", report.set_by.c_str(),
                       "candidates", candidates, "ops", ops);
}

PyObject* set_cpu_loops(PyObject*, PyObject* arg) {
  const char* setting = PyUnicode_AsUTF8(arg);
  if (setting == nullptr) return nullptr;
  try {
    return PyUnicode_FromString(rpe_ops::set_loops(setting).c_str());
  } catch (const std::exception& error) {
    return raise(error);
  }
}

PyObject* cpu_cache_stats(PyObject*, PyObject*) {
  const rpe_ops::OutputCacheStats s = rpe_ops::output_cache_stats();
  return Py_BuildValue("{s:n,s:n,s:n,s:n,s:n}", "cached_bytes", static_cast<Py_ssize_t>(s.cached_bytes),
                       "cached_blocks", static_cast<Py_ssize_t>(s.cached_blocks), "limit_bytes",
                       static_cast<Py_ssize_t>(s.limit_bytes), "hits", static_cast<Py_ssize_t>(s.hits), "misses",
                       static_cast<Py_ssize_t>(s.misses));
}

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  rpe_ops::empty_output_cache();
  Py_RETURN_NONE;
}

PyObject* cache_all_cpu_tensors(PyObject*, PyObject*) {
  return PyBool_FromLong(rpe_ops::install_as_cpu_allocator());
}

PyObject* caches_all_cpu_tensors(PyObject*, PyObject*) {
  return PyBool_FromLong(rpe_ops::installed_as_cpu_allocator());
}

PyMethodDef methods[] = {
    {"compiled_with_cuda", compiled_with_cuda, METH_NOARGS,
     "True if the CUDA kernels were compiled into this build."},
    {"cpu_loops", cpu_loops, METH_NOARGS, "Which CPU loops each op runs, and why (see cpu/loops.h)."},
    {"set_cpu_loops", set_cpu_loops, METH_O,
     "Force the CPU loops of every op ('portable', 'avx512', 'avx512_stream') or 'auto'; returns the previous setting."},
    {"cpu_cache_stats", cpu_cache_stats, METH_NOARGS, "Counters of the CPU output cache (see output_cache.h)."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Free the blocks the CPU output cache keeps."},
    {"cache_all_cpu_tensors", cache_all_cpu_tensors, METH_NOARGS,
     "Make the CPU output cache torch's CPU allocator; False if it already was."},
    {"caches_all_cpu_tensors", caches_all_cpu_tensors, METH_NOARGS, "Whether the CPU output cache is torch's CPU allocator."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
