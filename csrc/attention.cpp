// The attention ops attention_fwd and attention_bwd: argument checks, output allocation, and the
// hand-off to the kernels of the dispatch key's device (op_kernels.h). Written once for every device.
#include "op_kernels.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/empty_like.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/mul.h>

namespace selfattn {

BandArguments band_arguments(const OpArguments& args) {
  const BandArguments band{args.boolean("causal"), args.integer("window_left"), args.integer("window_right")};
  check_window(band.left, band.right);
  return band;
}

void score_mod_arguments(const OpArguments& args, const at::Tensor& q, const char* q_name, const c10::SymInt& batch,
                         const c10::SymInt& heads, const char* batch_name, AttentionMask* mask) {
  const double softcap = args.real("softcap");
  const std::optional<at::Tensor> alibi_slopes = args.optional_tensor("alibi_slopes");
  const std::optional<at::Tensor> sinks = args.optional_tensor("sinks");
  check_score_mods(softcap, alibi_slopes, sinks, q, q_name, batch, heads, batch_name);
  if (mask != nullptr) {
    mask->set_scores(softcap, alibi_slopes, sinks, accumulate_type(q.scalar_type()));
  }
}

namespace {

// Reduced-precision tensors widened to float32 before a product (float32 and float64 as they are).
at::Tensor widened(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf ? t.to(at::kFloat) : t;
}

// exp(sink[h] - lse[b, h, i]) in float64: each row's probability of its sink.
at::Tensor sink_probabilities(const at::Tensor& sinks, const at::Tensor& lse) {
  return (sinks.to(at::kDouble).view({1, -1, 1}) - lse.to(at::kDouble)).exp();
}

}  // namespace

at::Tensor sinks_gradient(const at::Tensor& sinks, const at::Tensor& grad_out, const at::Tensor& out,
                          const at::Tensor& lse) {
  const at::Tensor delta = at::mul(widened(grad_out), widened(out)).sum(-1, false, at::kDouble);
  return (sink_probabilities(sinks, lse) * delta).sum(at::IntArrayRef{0, 2}).neg().to(sinks.scalar_type());
}

void add_sinks_tangent(const at::Tensor& sinks, const at::Tensor& tangent_sinks, const at::Tensor& out,
                       const at::Tensor& lse, const at::Tensor& tangent_out) {
  const at::Tensor share = sink_probabilities(sinks, lse) * tangent_sinks.to(at::kDouble).view({1, -1, 1});
  const at::Tensor acc = widened(tangent_out).to(at::kDouble) - share.unsqueeze(-1) * out.to(at::kDouble);
  tangent_out.copy_(acc);
}

AttentionMask attention_mask_arguments(const OpArguments& args, const AttentionShape& s, const at::Tensor& q,
                                       bool for_kernels) {
  const BandArguments band = band_arguments(args);
  const std::optional<at::Tensor> attn_mask = args.optional_tensor("attn_mask");
  check_mask_inputs(s, q, attn_mask);
  const bool has_dropout = args.has("dropout_p");  // (attention_jvp has none)
  const double dropout_p = has_dropout ? args.real("dropout_p") : 0.0;
  const std::optional<at::Tensor> rng_state = has_dropout ? args.optional_tensor("rng_state") : std::nullopt;
  if (has_dropout) {
    check_dropout(dropout_p, rng_state, q, "q");
  }
  AttentionMask mask;
  score_mod_arguments(args, q, "q", s.batch, s.heads, "B", for_kernels ? &mask : nullptr);
  if (!for_kernels) {
    return mask;
  }
  mask.band = band.with_offset(args.integer("diagonal_offset"));
  if (attn_mask.has_value()) {
    mask.tensor = attn_mask->expand_symint({s.batch, s.heads, s.nq, s.nk});
  }
  mask.set_dropout(dropout_p, rng_state);
  return mask;
}

at::Tensor empty_attention_output(const AttentionShape& s, const at::TensorOptions& options) {
  const c10::SymInt row = s.heads * s.dim_v;
  return at::empty_strided_symint({s.batch, s.heads, s.nq, s.dim_v}, {s.nq * row, s.dim_v, row, 1}, options);
}

namespace {

template <const DeviceKernels& kernels>
void attention_fwd(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const ArgumentNames names(op.schema());
  const OpArguments args(*stack, names);
  const at::Tensor q = args.tensor("q"), k = args.tensor("k"), v = args.tensor("v");
  const double scale = args.real("scale");
  const AttentionShape s = check_attention_inputs(q, k, v, scale);
  const AttentionMask mask = attention_mask_arguments(args, s, q, kernels.runs());
  const at::Tensor out = empty_attention_output(s, q.options());
  const at::Tensor lse =
      at::empty_symint({s.batch, s.heads, s.nq}, q.options().dtype(accumulate_type(q.scalar_type())));
  if constexpr (kernels.runs()) {
    kernels.forward(q, k, v, mask, scale, out, lse);
  }
  set_outputs(stack, names, out, lse);
}

template <const DeviceKernels& kernels>
void attention_bwd(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const ArgumentNames names(op.schema());
  const OpArguments args(*stack, names);
  const at::Tensor q = args.tensor("q"), k = args.tensor("k"), v = args.tensor("v");
  const at::Tensor grad_out = args.tensor("grad_out"), out = args.tensor("out"), lse = args.tensor("lse");
  const double scale = args.real("scale");
  const AttentionShape s = check_attention_inputs(q, k, v, scale);
  const AttentionMask mask = attention_mask_arguments(args, s, q, kernels.runs());
  check_attention_grad_inputs(s, q, grad_out, out, lse);
  const at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  const std::optional<at::Tensor> sinks = args.optional_tensor("sinks");
  at::Tensor grad_sinks = sinks.has_value() ? at::empty_like(*sinks) : at::empty({0}, q.options());
  if constexpr (kernels.runs()) {
    kernels.backward(grad_out, q, k, v, out, lse, mask, scale, grad_q, grad_k, grad_v);
    if (sinks.has_value()) {
      grad_sinks = sinks_gradient(*sinks, grad_out, out, lse);
    }
  }
  set_outputs(stack, names, grad_q, grad_k, grad_v, grad_sinks);
}

void attention_fwd_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  // A float mask follows q into the region's dtype unless it is float32 (which the kernels take
  // with any input dtype), float64 included; a bool mask stays bool.
  static const AutocastCasts casts{{"q", "k", "v"}, /*mask_to_dtype=*/true};
  autocast_kernel(op, casts, stack);
}

template <const DeviceKernels& kernels>
void register_kernels(torch::Library& m) {
  m.impl("attention_fwd", boxed<&attention_fwd<kernels>>());
  m.impl("attention_bwd", boxed<&attention_bwd<kernels>>());
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CPU, m) { register_kernels<kCpuKernels>(m); }

#ifdef SELFATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selfattn, CUDA, m) { register_kernels<kCudaKernels>(m); }
#endif

TORCH_LIBRARY_IMPL(selfattn, Meta, m) { register_kernels<kMetaKernels>(m); }

TORCH_LIBRARY_IMPL(selfattn, AutocastCPU, m) { m.impl("attention_fwd", boxed<&attention_fwd_autocast>()); }

TORCH_LIBRARY_IMPL(selfattn, AutocastCUDA, m) { m.impl("attention_fwd", boxed<&attention_fwd_autocast>()); }

}  // namespace selfattn
