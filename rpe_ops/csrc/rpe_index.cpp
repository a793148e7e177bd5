// Schema of the rpe_ops library. Kernels register themselves per device in
// cpu/rpe_index_kernel.cpp and cuda/rpe_index_kernel.cu; autograd and the fake
// (meta) kernels are registered from Python in rpe_ops/__init__.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/avx512.h"
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

PyObject* cpu_simd(PyObject*, PyObject*) {
  return Py_BuildValue("{s:O,s:O}", "available", rpe_ops::avx512::available() ? Py_True : Py_False, "enabled",
                       rpe_ops::avx512::enabled() ? Py_True : Py_False);
}

PyObject* set_cpu_simd(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool was = rpe_ops::avx512::enabled();
  rpe_ops::avx512::set_enabled(on != 0);
  return PyBool_FromLong(was);
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

PyMethodDef methods[] = {
    {"compiled_with_cuda", compiled_with_cuda, METH_NOARGS,
     "True if the CUDA kernels were compiled into this build."},
    {"cpu_simd", cpu_simd, METH_NOARGS, "{'available': bool, 'enabled': bool} for the AVX-512 CPU loops."},
    {"_set_cpu_simd", set_cpu_simd, METH_O,
     "Switch the AVX-512 CPU loops on or off (tests, comparisons); returns the previous setting."},
    {"cpu_cache_stats", cpu_cache_stats, METH_NOARGS, "Counters of the CPU output cache (see output_cache.h)."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Free the blocks the CPU output cache keeps."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
