// Every schema of the selfattn op library, in one place. The kernels live in
// attention.cpp (attention forward/backward) and self_attention.cpp (the fused layer);
// fake kernels and autograd are registered from Python (selfattn/ops.py).
#include <Python.h>
#include <torch/library.h>

#ifndef SELFATTN_BUILD_INFO
#define SELFATTN_BUILD_INFO unknown
#endif
#define SELFATTN_STRINGIZE_(...) #__VA_ARGS__
#define SELFATTN_STRINGIZE(...) SELFATTN_STRINGIZE_(__VA_ARGS__)

extern "C" {
// How this library was built (torch version, CPU instruction set, CUDA and its GPU archs,
// sanitizers), set by selfattn/_settings.py. The loader finds it in the file's bytes before
// loading the library, so a build for another torch is reported in words rather than as an
// undefined symbol.
__attribute__((used)) const char selfattn_build_info[] =
    "selfattn-build-info:" SELFATTN_STRINGIZE(SELFATTN_BUILD_INFO);

// `import selfattn._C` loads this library, and loading it runs the registrations below.
// The module itself is empty: every entry point is reached through torch.ops.selfattn.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(selfattn, m) {
  // q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), any strides.
  // out (B, H, Nq, Dv), laid out in memory as (B, Nq, H, Dv); lse (B, H, Nq), float32
  // (float64 for float64 inputs). Causal masking is top-left aligned: query i sees keys j <= i.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "bool causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // x (B, N, E), w_qkv (3M, E) = [W_q; W_k; W_v] in nn.Linear layout, b_qkv (3M) or None.
  // out (B, N, M) heads concatenated; qkv (B, N, 3M) and lse (B, H, N) are kept for backward.
  m.def(
      "self_attention_fwd(Tensor x, Tensor w_qkv, Tensor? b_qkv, int num_heads, bool causal, "
      "float scale) -> (Tensor out, Tensor qkv, Tensor lse)");
  // output_mask says which of (grad_x, grad_w, grad_b) to compute; the others come back empty.
  m.def(
      "self_attention_bwd(Tensor grad_out, Tensor x, Tensor w_qkv, Tensor qkv, Tensor out, "
      "Tensor lse, int num_heads, bool causal, float scale, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_w, Tensor grad_b)");
}
