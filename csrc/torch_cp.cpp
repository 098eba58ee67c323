// Schemas of the torch_cp operators and the Python module torch_cp._C.
//
// The kernels register their implementations per dispatch key next to their code
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); fake (meta) implementations for
// torch.compile live in torch_cp/_ops.py.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing torch_cp._C from Python runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torch_cp C++ kernels (registered as torch.ops.torch_cp.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torch_cp, m) {
  // out: [N, M, D] partial outputs (float32/float16/bfloat16), lse: [N, M] float32, natural log.
  // Returns the exact merge over N: out [M, D] (dtype of `out`) and lse [M] float32.
  m.def("merge_states(Tensor out, Tensor lse) -> (Tensor, Tensor)");
}
