// Schema of the rpe_ops library. Kernels register themselves per device in
// cpu/rpe_index_kernel.cpp and cuda/rpe_index_kernel.cu; autograd and the fake
// (meta) kernels are registered from Python in rpe_ops/__init__.py.
#include <Python.h>
#include <torch/library.h>

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

PyMethodDef methods[] = {
    {"compiled_with_cuda", compiled_with_cuda, METH_NOARGS,
     "True if the CUDA kernels were compiled into this build."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
