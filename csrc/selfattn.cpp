// Every schema of the selfattn op library, in one place. The kernels live in
// attention.cpp (attention forward/backward), varlen.cpp (packed variable-length sequences) and
// self_attention.cpp (the fused layer), and
// every one of them first checks all its arguments (checks.h); fake kernels, which make the
// same checks, and autograd are registered from Python (selfattn/ops.py, selfattn/_checks.py).
#include <Python.h>
#include <torch/library.h>

#include "attention.h"

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
  // q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), any strides; Hk divides Hq (grouped-
  // query attention: query head h reads kv head h / (Hq / Hk)).
  // out (B, Hq, Nq, Dv), laid out in memory as (B, Nq, Hq, Dv); lse (B, Hq, Nq), float32 (float64
  // for float64 inputs), -inf for a row that sees no key (its output is 0).
  // Which keys query i sees (mask.h): the band i + diagonal_offset - window_left <= j <=
  // i + diagonal_offset + window_right, -1 for an unbounded side; causal bounds the right side at
  // 0. diagonal_offset 0 is top-left causal (SDPA's), Nk - Nq bottom-right. attn_mask, 4-D and
  // broadcastable to (B, Hq, Nq, Nk), read through its strides: bool (true = take part) or float
  // (added to the scaled scores; float32 or q's dtype). Both the band and the mask apply.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? attn_mask=None, "
      "int window_left=-1, int window_right=-1, int diagonal_offset=0) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "bool causal, float scale, Tensor? attn_mask=None, int window_left=-1, int window_right=-1, "
      "int diagonal_offset=0) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Variable-length (packed) sequences, FlashAttention's layout (varlen.cpp): q (Tq, Hq, D),
  // k (Tk, Hk, D), v (Tk, Hk, Dv); cu_seqlens_q / cu_seqlens_k int32 (S + 1,), 0 first,
  // non-decreasing, Tq / Tk last: sequence s is rows cu[s]:cu[s+1]. max_seqlen_q / _k bound every
  // sequence's length. The band applies within each sequence, offset 0 (top-left) or, with
  // bottom_right, nk_s - nq_s. out (Tq, Hq, Dv); lse (Hq, Tq), float32 (float64 for float64).
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left=-1, "
      "int window_right=-1, bool bottom_right=False) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
      "float scale, int window_left=-1, int window_right=-1, bool bottom_right=False) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // The fused layer. x (B, N, E); w_qkv ((H + 2·Hkv)·D, E) = [W_q; W_k; W_v] in nn.Linear layout,
  // q heads, then k heads, then v heads (Llama's q_proj; k_proj; v_proj stacked); b_qkv the same
  // rows, or None. num_kv_heads = Hkv divides num_heads = H (0: Hkv = H, plain multi-head).
  // out (B, N, H·D) heads concatenated; qkv (B, N, (H + 2·Hkv)·D) and lse (B, H, N) are kept for
  // backward. The mask as attention_fwd's with Nq = Nk = N (so top-left = bottom-right, offset 0):
  // causal, window sides (-1 unbounded), attn_mask broadcastable to (B, H, N, N).
  m.def(
      "self_attention_fwd(Tensor x, Tensor w_qkv, Tensor? b_qkv, int num_heads, bool causal, "
      "float scale, int num_kv_heads=0, Tensor? attn_mask=None, int window_left=-1, "
      "int window_right=-1) -> (Tensor out, Tensor qkv, Tensor lse)");
  // output_mask, 3 entries, says which of (grad_x, grad_w, grad_b) to compute; the others come
  // back empty. (bool[], not bool[3]: the op then names a list of the wrong length itself.)
  m.def(
      "self_attention_bwd(Tensor grad_out, Tensor x, Tensor w_qkv, Tensor qkv, Tensor out, "
      "Tensor lse, int num_heads, bool causal, float scale, bool[] output_mask, int num_kv_heads=0, "
      "Tensor? attn_mask=None, int window_left=-1, int window_right=-1) "
      "-> (Tensor grad_x, Tensor grad_w, Tensor grad_b)");
  // Private, for tests: which copy of the CPU kernels runs (DEFAULT, AVX2 or AVX512; chosen at
  // run time from the CPU, cpu/dispatch.cpp). "" reports it; "auto" decides again as the first
  // call did; "default", "avx2" or "avx512" forces that copy for the whole process (an error if
  // this build lacks it or this CPU cannot run it). Returns the one in use. No tensors, so no
  // fake kernel: the function itself serves every dispatch key.
  m.def("_cpu_capability(str capability='') -> str", &selfattn::cpu_capability);
}
