// The argument checks of every op, forward and backward, made before any data is touched.
//
// Each check names the argument and what was expected, and raises a Python ValueError
// (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE). They are the only copy: every op runs them
// on every device key, Meta included (fake tensors under torch.compile reach the Meta kernels), so
// an error reads the same from the kernel, from meta tensors or from torch.compile's tracing
// (tests/test_bad_inputs.py). Sizes are SymInts: with symbolic shapes a comparison is a guard, and
// a message prints a size as its expression.
//
// Shapes (the kernels read every tensor through its strides, so no layout is required):
//   attention   q (B, Hq, Nq, D)  k (B, Hk, Nk, D)  v (B, Hk, Nk, Dv)   Hk divides Hq
//               out, grad_out (B, Hq, Nq, Dv)     lse (B, Hq, Nq)
//               tangent_q/k/v: the shapes of q/k/v, or None
//               attn_mask: bool or float, 4-D, each dim 1 or that of (B, Hq, Nq, Nk)
//   varlen      q (Tq, Hq, D)  k (Tk, Hk, D)  v (Tk, Hk, Dv)   Hk divides Hq
//               cu_seqlens_q, cu_seqlens_k int32 (S + 1,)   out, grad_out (Tq, Hq, Dv)   lse (Hq, Tq)
//   layer       x (B, N, E)  w_qkv ((H + 2·Hkv)·D, E)  b_qkv ((H + 2·Hkv)·D)   Hkv divides H
//               qkv (B, N, (H + 2·Hkv)·D)  out, grad_out (B, N, M)  lse (B, H, N)   M = H·D
//               attn_mask as attention's with Hq = H, Nq = Nk = N
// lse is float32, or float64 for float64 inputs (accumulate_type).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>

namespace selfattn {

// Scalar type of lse and of all accumulation for inputs of `dtype`.
inline at::ScalarType accumulate_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

struct AttentionShape {
  c10::SymInt batch, heads, heads_kv, nq, nk, dim, dim_v;
};

struct VarlenShape {
  c10::SymInt total_q, total_k, heads, heads_kv, dim, dim_v, num_seqs;
};

struct LayerShape {
  c10::SymInt batch, seq, embed, model;  // model = heads * head_dim
  int64_t heads, heads_kv;
  c10::SymInt head_dim;

  // Width of the projections: q heads, then k heads, then v heads.
  c10::SymInt qkv_dim() const { return (heads + 2 * heads_kv) * head_dim; }
};

// q, k, v of attention_fwd; the scale it multiplies the scores by.
AttentionShape check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

// The tangents of attention_jvp, each undefined (a zero tangent) or with the dtype, device and shape
// of its primal (q, k or v).
void check_attention_tangents(const AttentionShape& s, const at::Tensor& q, const std::optional<at::Tensor>& tangent_q,
                              const std::optional<at::Tensor>& tangent_k, const std::optional<at::Tensor>& tangent_v);

// attn_mask of the attention ops, against the shape of q, k and v.
void check_mask_inputs(const AttentionShape& s, const at::Tensor& q, const std::optional<at::Tensor>& attn_mask);

// The score modifications of every op that takes them (mask.h's ScoreMods), against q (dtype,
// device; `q_name` as the op calls it), `batch` (B; varlen: the number of sequences S) and `heads`
// (Hq): softcap finite and >= 0 (0: off); alibi_slopes float32 of shape (Hq,) or (batch, Hq) on
// q's device; sinks of shape (Hq,), float32 or q's dtype, on q's device.
void check_score_mods(double softcap, const std::optional<at::Tensor>& alibi_slopes,
                      const std::optional<at::Tensor>& sinks, const at::Tensor& q, const char* q_name,
                      const c10::SymInt& batch, const c10::SymInt& heads, const char* batch_name);

// tangent_sinks of attention_jvp: None, or with the dtype, device and shape of sinks (which must be given).
void check_sinks_tangent(const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& tangent_sinks);

// The window sides (left, right) of every op that takes a window (-1: unbounded).
void check_window(int64_t left, int64_t right);

// dropout_p and rng_state of every op: 0 <= dropout_p < 1; rng_state, required when dropout_p > 0
// and checked whenever given, int64 (seed, offset) of shape (2,) on the device of `ref`.
// check_dropout_p alone is also the private op _check_dropout_p, which the public functions call
// before they draw an rng_state (selfattn/ops.py, rng.py).
void check_dropout_p(double dropout_p);
void check_dropout(double dropout_p, const std::optional<at::Tensor>& rng_state, const at::Tensor& ref,
                   const char* ref_name);

// q, k, v, cu_seqlens_q/k, max_seqlen_q/k and scale of varlen_attention_fwd: everything that
// needs no data (so the Meta kernels make them too).
VarlenShape check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, double scale);

// The values of one cu_seqlens (on the host, contiguous, `count` = S + 1 entries): 0 first,
// non-decreasing, `total` last, no sequence longer than max_seqlen. Only the kernels can make this
// check: meta and fake tensors carry no data.
void check_cu_seqlens_values(const int32_t* cu, int64_t count, const char* name, int64_t total, const char* total_name,
                             int64_t max_seqlen, const char* max_name);

// The rest of varlen_attention_bwd's arguments, against the shape of q, k and v.
void check_varlen_grad_inputs(const VarlenShape& s, const at::Tensor& q, const at::Tensor& grad_out,
                              const at::Tensor& out, const at::Tensor& lse);

// The rest of attention_bwd's arguments, against the shape of q, k and v.
void check_attention_grad_inputs(const AttentionShape& s, const at::Tensor& q, const at::Tensor& grad_out,
                                 const at::Tensor& out, const at::Tensor& lse);

// x, w_qkv, b_qkv, num_heads, num_kv_heads (0: num_heads) and scale of self_attention_fwd.
LayerShape check_layer_inputs(const at::Tensor& x, const at::Tensor& w_qkv, const std::optional<at::Tensor>& b_qkv,
                              int64_t num_heads, int64_t num_kv_heads, double scale);

// attn_mask of the layer ops: check_mask_inputs with Hq = num_heads and Nq = Nk = N.
void check_layer_mask_inputs(const LayerShape& s, const at::Tensor& x, const std::optional<at::Tensor>& attn_mask);

// The rest of self_attention_bwd's arguments, against the layer's shape.
void check_layer_grad_inputs(const LayerShape& s, const at::Tensor& x, const at::Tensor& grad_out,
                             const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                             const c10::List<bool>& output_mask);

// SELFATTN_DECODE_SPLITS, the decode paths' knob for tests and benchmarks (CPU and CUDA), read and
// checked per call: -1 unset (automatic), 0 (no decode path), S > 0 (S key splits).
int64_t decode_splits_setting();

}  // namespace selfattn
