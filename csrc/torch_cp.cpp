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
  // q: [B, Hq, Sq, D]; k, v: [B, Hkv, L, D] (one dtype: float32/float16/bfloat16/float64), Hq % Hkv == 0.
  // kv_lens [B]: valid keys per row; kv_pos [B, L]: key positions; q_pos [B]: position of query 0
  // (required with is_causal or window >= 0); window < 0: none; num_splits 0: automatic;
  // attn_mask: bool (true = attend) or additive float mask broadcastable to [B, Hq, Sq, L].
  // Returns out [B, Hq, Sq, D] float32 and lse [B, Hq, Sq] float32 (natural log; -inf when empty).
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lens, Tensor? kv_pos, Tensor? q_pos, "
      "float scale, float softcap, bool is_causal, int window, int num_splits, Tensor? attn_mask=None) -> (Tensor, Tensor)");
}
