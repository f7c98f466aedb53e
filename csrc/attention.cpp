// The attention ops attention_fwd and attention_bwd: argument checks, output allocation, and the
// hand-off to the kernels of the dispatch key's device (op_kernels.h). Written once for every device.
#include "op_kernels.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/empty_like.h>

namespace selfattn {

BandArguments band_arguments(const OpArguments& args) {
  const BandArguments band{args.boolean("causal"), args.integer("window_left"), args.integer("window_right")};
  check_window(band.left, band.right);
  return band;
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
  if constexpr (kernels.runs()) {
    kernels.backward(grad_out, q, k, v, out, lse, mask, scale, grad_q, grad_k, grad_v);
  }
  set_outputs(stack, names, grad_q, grad_k, grad_v);
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
