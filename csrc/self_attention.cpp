// The fused self-attention layer: projections and attention in one op, written once for
// every device (it calls only ATen and the attention entry points of attention.h).
//
// With H query heads, Hkv key/value heads (Hkv divides H; Hkv = H is plain multi-head attention)
// and head dim D, w_qkv holds (H + 2·Hkv)·D rows: q heads, then k heads, then v heads.
//
// Forward:  qkv = x · [W_q; W_k; W_v]ᵀ (+ b)       one GEMM into (B, N, H + 2·Hkv, D)
//           out = attention(q, k, v)              on strided views of qkv (query head h reads kv
//                                                 head h / (H / Hkv)), written as (B, N, H, D) = (B, N, M)
// Backward: dq, dk, dv written straight into one (B, N, H + 2·Hkv, D) buffer dqkv (dk, dv summed
//           over each group's query heads by the attention backward),
//           dx = dqkv · W,  dW = dqkvᵀ · x,  db = sum of dqkv over (B, N).
// The mask: the band of causal / window (offset 0: Nq = Nk, so top-left = bottom-right) and at
// most one attn_mask, broadcast to (B, H, N, N) as a view (stride 0 on its broadcast dims).
#include "attention.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace selfattn {
namespace {

// (B, H, N, D) views of q and (B, Hkv, N, D) views of k and v inside a (B, N, H + 2·Hkv, D) buffer.
std::array<at::Tensor, 3> split_heads(const at::Tensor& packed, const LayerShape& s) {
  const at::Tensor heads = packed.view({s.batch, s.seq, s.heads + 2 * s.heads_kv, s.head_dim});
  return {heads.narrow(2, 0, s.heads).transpose(1, 2),
          heads.narrow(2, s.heads, s.heads_kv).transpose(1, 2),
          heads.narrow(2, s.heads + s.heads_kv, s.heads_kv).transpose(1, 2)};
}

// The projection GEMMs. A float16 or bfloat16 one on a CPU without that type's arithmetic
// (AVX512-FP16, AVX512-BF16) falls back in ATen to code 4-90x slower than float32 (AMD EPYC
// Zen 5, float16 (4096, 512) x (512, 1536): 196 ms forward, 1.2-3.9 s for the backward's two
// products, against 44-47 ms in float32; Zen 1, bfloat16: 5.5 s against 0.20 s), so those run in
// float32 on widened copies, rounded once at the end: float32 accumulation, as the
// reduced-precision GEMM's own.
bool widen_gemm(const at::Tensor& t) {
  static const bool has_float16_arithmetic = __builtin_cpu_supports("avx512fp16");
  static const bool has_bfloat16_arithmetic = __builtin_cpu_supports("avx512bf16");
  return t.is_cpu() && ((t.scalar_type() == at::kHalf && !has_float16_arithmetic) ||
                        (t.scalar_type() == at::kBFloat16 && !has_bfloat16_arithmetic));
}

// a · b (+ bias, broadcast over rows).
at::Tensor projection_mm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  if (widen_gemm(a)) {
    const at::Tensor product = projection_mm(a.to(at::kFloat), b.to(at::kFloat),
                                             bias.has_value() ? std::optional(bias->to(at::kFloat)) : std::nullopt);
    return product.to(a.scalar_type());
  }
  return bias.has_value() ? at::addmm(*bias, a, b) : at::mm(a, b);
}

// The layer's mask arguments as the kernels take them.
AttentionMask layer_mask(const LayerShape& s, bool causal, const std::optional<at::Tensor>& attn_mask,
                         int64_t window_left, int64_t window_right, double dropout_p,
                         const std::optional<at::Tensor>& rng_state) {
  AttentionMask mask;
  mask.set_dropout(dropout_p, rng_state);
  mask.band = make_band(causal, window_left, window_right, 0);
  if (attn_mask.has_value()) {
    mask.tensor = attn_mask->expand({s.batch, s.heads, s.seq, s.seq});
  }
  return mask;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_fwd(
    const at::Tensor& x, const at::Tensor& w_qkv, const std::optional<at::Tensor>& b_qkv,
    int64_t num_heads, bool causal, double scale, int64_t num_kv_heads,
    const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const LayerShape s = check_layer_inputs(x, w_qkv, b_qkv, num_heads, num_kv_heads, scale);
  check_layer_mask_inputs(s, x, attn_mask, window_left, window_right);
  check_dropout(dropout_p, rng_state, x, "x");
  // 1. Query, key and value of every token from one GEMM: (B*N, E) · (E, (H + 2·Hkv)·D).
  const at::Tensor x_rows = x.reshape({s.batch * s.seq, s.embed});
  const at::Tensor qkv = projection_mm(x_rows, w_qkv.t(), b_qkv);
  const auto [q, k, v] = split_heads(qkv, s);
  // 2-5. Attention on the strided views, written as (B, N, H, D): heads concatenated.
  at::Tensor out = at::empty({s.batch, s.seq, s.heads, s.head_dim}, x.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.seq}, x.options().dtype(accumulate_type(x.scalar_type())));
  attention_forward(q, k, v, layer_mask(s, causal, attn_mask, window_left, window_right, dropout_p, rng_state),
                    scale, out.transpose(1, 2), lse);
  return {out.view({s.batch, s.seq, s.model}), qkv.view({s.batch, s.seq, s.qkv_dim()}), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_qkv, const at::Tensor& qkv,
    const at::Tensor& out, const at::Tensor& lse, int64_t num_heads, bool causal, double scale,
    const c10::List<bool>& output_mask, int64_t num_kv_heads, const std::optional<at::Tensor>& attn_mask,
    int64_t window_left, int64_t window_right, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  const LayerShape s = check_layer_inputs(x, w_qkv, std::nullopt, num_heads, num_kv_heads, scale);
  check_layer_mask_inputs(s, x, attn_mask, window_left, window_right);
  check_dropout(dropout_p, rng_state, x, "x");
  check_layer_grad_inputs(s, x, grad_out, qkv, out, lse, output_mask);
  const auto [q, k, v] = split_heads(qkv.contiguous(), s);
  const auto per_head = [&](const at::Tensor& t) {  // (B, N, M) -> (B, H, N, D), a view when it can be
    return t.reshape({s.batch, s.seq, s.heads, s.head_dim}).transpose(1, 2);
  };
  // dq, dk, dv straight into one packed buffer: the projection GEMMs then read it as
  // (B*N, (H + 2·Hkv)·D).
  const at::Tensor grad_qkv = at::empty({s.batch * s.seq, s.qkv_dim()}, x.options());
  const auto [grad_q, grad_k, grad_v] = split_heads(grad_qkv, s);
  attention_backward(per_head(grad_out), q, k, v, per_head(out), lse,
                     layer_mask(s, causal, attn_mask, window_left, window_right, dropout_p, rng_state), scale,
                     grad_q, grad_k, grad_v);

  // Outputs must not alias each other, so each skipped gradient gets its own empty tensor.
  const auto nothing = [&] { return at::empty({0}, x.options()); };
  const at::Tensor grad_x =
      output_mask.get(0) ? projection_mm(grad_qkv, w_qkv, std::nullopt).view({s.batch, s.seq, s.embed}) : nothing();
  const at::Tensor grad_w =
      output_mask.get(1) ? projection_mm(grad_qkv.t(), x.reshape({s.batch * s.seq, s.embed}), std::nullopt) : nothing();
  const at::Tensor grad_b = output_mask.get(2) ? grad_qkv.sum(0) : nothing();
  return {grad_x, grad_w, grad_b};
}

// Under torch.autocast: x, w_qkv and b_qkv run in the region's lower-precision dtype. A float
// mask follows them unless it is float32 (which the kernels take with any input dtype), as in
// attention_fwd_autocast; a bool mask stays bool.
std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_fwd_autocast(
    const at::Tensor& x, const at::Tensor& w_qkv, const std::optional<at::Tensor>& b_qkv,
    int64_t num_heads, bool causal, double scale, int64_t num_kv_heads,
    const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const c10::DeviceType device_type = x.device().type();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("selfattn::self_attention_fwd", "")
                       .typed<decltype(self_attention_fwd)>();
  std::optional<at::Tensor> mask = attn_mask;
  if (mask.has_value() && mask->is_floating_point() && mask->scalar_type() != at::kFloat) {
    mask = at::autocast::cached_cast(dtype, *mask, device_type);
  }
  return op.call(at::autocast::cached_cast(dtype, x, device_type),
                 at::autocast::cached_cast(dtype, w_qkv, device_type),
                 at::autocast::cached_cast(dtype, b_qkv, device_type), num_heads, causal, scale,
                 num_kv_heads, mask, window_left, window_right, dropout_p, rng_state);
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CPU, m) {
  m.impl("self_attention_fwd", &self_attention_fwd);
  m.impl("self_attention_bwd", &self_attention_bwd);
}

#ifdef SELFATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selfattn, CUDA, m) {
  m.impl("self_attention_fwd", &self_attention_fwd);
  m.impl("self_attention_bwd", &self_attention_bwd);
}
#endif

TORCH_LIBRARY_IMPL(selfattn, AutocastCPU, m) {
  m.impl("self_attention_fwd", &self_attention_fwd_autocast);
}

TORCH_LIBRARY_IMPL(selfattn, AutocastCUDA, m) {
  m.impl("self_attention_fwd", &self_attention_fwd_autocast);
}

}  // namespace selfattn
