// The forward-mode derivative op of attention (attention_jvp): argument checks, output allocation,
// and the hand-off to the kernels of the dispatch key's device (op_kernels.h). Written once for
// every device.
#include "op_kernels.h"

#include <ATen/ops/empty.h>

namespace selfattn {
namespace {

template <const DeviceKernels& kernels>
void attention_jvp(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const ArgumentNames names(op.schema());
  const OpArguments args(*stack, names);
  const at::Tensor q = args.tensor("q"), k = args.tensor("k"), v = args.tensor("v");
  const std::optional<at::Tensor> tangent_q = args.optional_tensor("tangent_q");
  const std::optional<at::Tensor> tangent_k = args.optional_tensor("tangent_k");
  const std::optional<at::Tensor> tangent_v = args.optional_tensor("tangent_v");
  const double scale = args.real("scale");
  const AttentionShape s = check_attention_inputs(q, k, v, scale);
  const AttentionMask mask = attention_mask_arguments(args, s, q, kernels.runs());
  check_attention_tangents(s, q, tangent_q, tangent_k, tangent_v);
  const std::optional<at::Tensor> sinks = args.optional_tensor("sinks");
  const std::optional<at::Tensor> tangent_sinks = args.optional_tensor("tangent_sinks");
  check_sinks_tangent(sinks, tangent_sinks);
  // out and tangent_out as attention_fwd lays out out: (B, Nq, H, Dv) in memory.
  const at::Tensor out = empty_attention_output(s, q.options());
  const at::Tensor tangent_out = empty_attention_output(s, q.options());
  const at::Tensor lse =
      at::empty_symint({s.batch, s.heads, s.nq}, q.options().dtype(accumulate_type(q.scalar_type())));
  if constexpr (kernels.runs()) {
    // (An undefined tangent is a zero one.)
    kernels.jvp(q, k, v, tangent_q.value_or(at::Tensor()), tangent_k.value_or(at::Tensor()),
                tangent_v.value_or(at::Tensor()), mask, scale, out, lse, tangent_out);
    if (tangent_sinks.has_value()) {
      add_sinks_tangent(*sinks, *tangent_sinks, out, lse, tangent_out);
    }
  }
  set_outputs(stack, names, out, lse, tangent_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CPU, m) { m.impl("attention_jvp", boxed<&attention_jvp<kCpuKernels>>()); }

#ifdef SELFATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selfattn, CUDA, m) { m.impl("attention_jvp", boxed<&attention_jvp<kCudaKernels>>()); }
#endif

TORCH_LIBRARY_IMPL(selfattn, Meta, m) { m.impl("attention_jvp", boxed<&attention_jvp<kMetaKernels>>()); }

}  // namespace selfattn
