// The fused self-attention layer: projections and attention in one op, written once for
// every device (it calls only ATen and the attention kernels of the dispatch key's device, op_kernels.h).
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
#include "op_kernels.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

namespace selfattn {
namespace {

// (B, H, N, D) views of q and (B, Hkv, N, D) views of k and v inside a (B, N, H + 2·Hkv, D) buffer.
std::array<at::Tensor, 3> split_heads(const at::Tensor& packed, const LayerShape& s) {
  const at::Tensor heads = packed.view_symint({s.batch, s.seq, s.heads + 2 * s.heads_kv, s.head_dim});
  return {heads.narrow(2, 0, s.heads).transpose(1, 2), heads.narrow(2, s.heads, s.heads_kv).transpose(1, 2),
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

// The argument builder of self_attention_fwd and self_attention_bwd: their mask arguments (causal,
// attn_mask, the band: offset 0, as Nq = Nk) and dropout's, checked against the
// layer's shape, as the kernels take them (Meta: only checked).
AttentionMask layer_mask_arguments(const OpArguments& args, const LayerShape& s, const at::Tensor& x,
                                   bool for_kernels) {
  const BandArguments band = band_arguments(args);
  const std::optional<at::Tensor> attn_mask = args.optional_tensor("attn_mask");
  const double dropout_p = args.real("dropout_p");
  const std::optional<at::Tensor> rng_state = args.optional_tensor("rng_state");
  check_layer_mask_inputs(s, x, attn_mask);
  check_dropout(dropout_p, rng_state, x, "x");
  AttentionMask mask;
  score_mod_arguments(args, x, "x", s.batch, s.heads, "B", for_kernels ? &mask : nullptr);
  if (!for_kernels) {
    return mask;
  }
  mask.set_dropout(dropout_p, rng_state);
  mask.band = band.with_offset(0);
  if (attn_mask.has_value()) {
    mask.tensor = attn_mask->expand_symint({s.batch, s.heads, s.seq, s.seq});
  }
  return mask;
}

// The shape of x, w_qkv (and b_qkv) with num_heads, num_kv_heads and scale, checked.
LayerShape layer_inputs(const OpArguments& args, const at::Tensor& x, const at::Tensor& w_qkv,
                        const std::optional<at::Tensor>& b_qkv) {
  return check_layer_inputs(x, w_qkv, b_qkv, args.integer("num_heads"), args.integer("num_kv_heads"),
                            args.real("scale"));
}

// The GEMMs run on every device (ATen's Meta kernels give their shapes); the attention kernels
// only where there are some.
template <const DeviceKernels& kernels>
void self_attention_fwd(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const ArgumentNames names(op.schema());
  const OpArguments args(*stack, names);
  const at::Tensor x = args.tensor("x"), w_qkv = args.tensor("w_qkv");
  const std::optional<at::Tensor> b_qkv = args.optional_tensor("b_qkv");
  const LayerShape s = layer_inputs(args, x, w_qkv, b_qkv);
  const AttentionMask mask = layer_mask_arguments(args, s, x, kernels.runs());
  // 1. Query, key and value of every token from one GEMM: (B*N, E) · (E, (H + 2·Hkv)·D).
  const at::Tensor x_rows = x.reshape_symint({s.batch * s.seq, s.embed});
  const at::Tensor qkv = projection_mm(x_rows, w_qkv.t(), b_qkv);
  // 2-5. Attention on the strided views, written as (B, N, H, D): heads concatenated.
  const at::Tensor out = at::empty_symint({s.batch, s.seq, s.heads, s.head_dim}, x.options());
  const at::Tensor lse =
      at::empty_symint({s.batch, s.heads, s.seq}, x.options().dtype(accumulate_type(x.scalar_type())));
  if constexpr (kernels.runs()) {
    const auto [q, k, v] = split_heads(qkv, s);
    kernels.forward(q, k, v, mask, args.real("scale"), out.transpose(1, 2), lse);
  }
  set_outputs(stack, names, out.view_symint({s.batch, s.seq, s.model}), qkv.view_symint({s.batch, s.seq, s.qkv_dim()}),
              lse);
}

template <const DeviceKernels& kernels>
void self_attention_bwd(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const ArgumentNames names(op.schema());
  const OpArguments args(*stack, names);
  const at::Tensor x = args.tensor("x"), w_qkv = args.tensor("w_qkv"), qkv = args.tensor("qkv");
  const at::Tensor grad_out = args.tensor("grad_out"), out = args.tensor("out"), lse = args.tensor("lse");
  const c10::List<bool> output_mask = args.bool_list("output_mask");
  const LayerShape s = layer_inputs(args, x, w_qkv, std::nullopt);
  const AttentionMask mask = layer_mask_arguments(args, s, x, kernels.runs());
  check_layer_grad_inputs(s, x, grad_out, qkv, out, lse, output_mask);
  // dq, dk, dv straight into one packed buffer: the projection GEMMs then read it as
  // (B*N, (H + 2·Hkv)·D).
  const at::Tensor grad_qkv = at::empty_symint({s.batch * s.seq, s.qkv_dim()}, x.options());
  // Outputs must not alias each other, so each skipped gradient gets its own empty tensor.
  const auto nothing = [&] { return at::empty({0}, x.options()); };
  const std::optional<at::Tensor> sinks = args.optional_tensor("sinks");
  at::Tensor grad_sinks = sinks.has_value() && output_mask.get(3) ? at::empty_like(*sinks) : nothing();
  if constexpr (kernels.runs()) {
    const auto [q, k, v] = split_heads(qkv.contiguous(), s);
    const auto per_head = [&](const at::Tensor& t) {  // (B, N, M) -> (B, H, N, D), a view when it can be
      return t.reshape_symint({s.batch, s.seq, s.heads, s.head_dim}).transpose(1, 2);
    };
    const auto [grad_q, grad_k, grad_v] = split_heads(grad_qkv, s);
    kernels.backward(per_head(grad_out), q, k, v, per_head(out), lse, mask, args.real("scale"), grad_q, grad_k, grad_v);
    if (sinks.has_value() && output_mask.get(3)) {
      grad_sinks = sinks_gradient(*sinks, per_head(grad_out), per_head(out), lse);
    }
  }
  const at::Tensor grad_x = output_mask.get(0)
                                ? projection_mm(grad_qkv, w_qkv, std::nullopt).view_symint({s.batch, s.seq, s.embed})
                                : nothing();
  const at::Tensor grad_w =
      output_mask.get(1) ? projection_mm(grad_qkv.t(), x.reshape_symint({s.batch * s.seq, s.embed}), std::nullopt)
                         : nothing();
  const at::Tensor grad_b = output_mask.get(2) ? grad_qkv.sum(0) : nothing();
  set_outputs(stack, names, grad_x, grad_w, grad_b, grad_sinks);
}

// Under torch.autocast: x, w_qkv and b_qkv run in the region's lower-precision dtype. A float mask
// follows them unless it is float32 (which the kernels take with any input dtype) or float64
// (cached_cast leaves it, and the check refuses it); a bool mask stays bool.
void self_attention_fwd_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const AutocastCasts casts{{"x", "w_qkv", "b_qkv"}, /*mask_to_dtype=*/false};
  autocast_kernel(op, casts, stack);
}

template <const DeviceKernels& kernels>
void register_kernels(torch::Library& m) {
  m.impl("self_attention_fwd", boxed<&self_attention_fwd<kernels>>());
  m.impl("self_attention_bwd", boxed<&self_attention_bwd<kernels>>());
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CPU, m) { register_kernels<kCpuKernels>(m); }

#ifdef SELFATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selfattn, CUDA, m) { register_kernels<kCudaKernels>(m); }
#endif

TORCH_LIBRARY_IMPL(selfattn, Meta, m) { register_kernels<kMetaKernels>(m); }

TORCH_LIBRARY_IMPL(selfattn, AutocastCPU, m) { m.impl("self_attention_fwd", boxed<&self_attention_fwd_autocast>()); }

TORCH_LIBRARY_IMPL(selfattn, AutocastCUDA, m) { m.impl("self_attention_fwd", boxed<&self_attention_fwd_autocast>()); }

}  // namespace selfattn
