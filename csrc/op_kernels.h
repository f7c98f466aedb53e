// The ops' kernels by dispatch key, and the argument builder of the attention ops' schema family.
//
// Each op is one function template over the kernels of a device: TORCH_LIBRARY_IMPL(selfattn, CPU)
// registers it with kCpuKernels, (…, CUDA) with kCudaKernels, (…, Meta) with kMetaKernels, which
// has none: there the op checks its arguments and allocates its outputs, nothing more. Fake
// tensors (torch.compile, opcheck) run the Meta kernels, so the checks of checks.h serve them too.
#pragma once

#include "attention.h"
#include "op_arguments.h"

#include <torch/library.h>

namespace selfattn {

struct DeviceKernels {
  decltype(&attention_forward_cpu) forward = nullptr;
  decltype(&attention_backward_cpu) backward = nullptr;
  decltype(&attention_jvp_cpu) jvp = nullptr;
  // Whether the op runs kernels on this device (not Meta). A flag of its own: under the
  // sanitizers, GCC does not fold `forward != nullptr` to a constant.
  bool has_kernels = false;

  constexpr bool runs() const { return has_kernels; }
};

inline constexpr DeviceKernels kCpuKernels{&attention_forward_cpu, &attention_backward_cpu, &attention_jvp_cpu, true};
#ifdef SELFATTN_WITH_CUDA
inline constexpr DeviceKernels kCudaKernels{&attention_forward_cuda, &attention_backward_cuda, &attention_jvp_cuda,
                                            true};
#endif
inline constexpr DeviceKernels kMetaKernels{};

using BoxedKernel = void(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack*);

template <BoxedKernel* kernel>
torch::CppFunction boxed() {
  return torch::CppFunction::makeFromBoxedFunction<kernel>();
}

// The band group of every op that takes one (causal and the window sides), read by name and
// checked in one place (attention.cpp); each op adds its query-to-key offset (attention: the
// diagonal_offset argument; varlen: per sequence; the layer: 0).
struct BandArguments {
  bool causal;
  int64_t left, right;

  Band with_offset(int64_t offset) const { return make_band(causal, left, right, offset); }
};
BandArguments band_arguments(const OpArguments& args);

// The score-modification group (softcap, alibi_slopes, sinks) of the ops whose schema has it, read
// by name and checked (check_score_mods) in one place (attention.cpp); set into `mask` as the
// kernels take it when `mask` is not null (the ops' builders; Meta passes null). batch: B, or the
// number of sequences S for varlen (batch_name says which); heads: Hq.
void score_mod_arguments(const OpArguments& args, const at::Tensor& q, const char* q_name, const c10::SymInt& batch,
                         const c10::SymInt& heads, const char* batch_name, AttentionMask* mask);

// sinks.grad (Hq,), in the dtype of sinks, from the forward's out and lse and the gradient of out
// (each (B, Hq, Nq, ·) / (B, Hq, Nq) views): the sink is a logit whose value is 0, so
// d loss / d sink[h] = -Σ_{b,i} exp(sink[h] - lse[b,h,i]) · rowsum(grad_out ∘ out)[b,h,i], summed in
// float64 by ATen (deterministic, on every device).
at::Tensor sinks_gradient(const at::Tensor& sinks, const at::Tensor& grad_out, const at::Tensor& out,
                          const at::Tensor& lse);

// The forward-mode term of the sinks: tangent_out -= exp(sink - lse) · tangent_sinks · out, per
// row (the sink's share of d lse), written into tangent_out (views as sinks_gradient's).
void add_sinks_tangent(const at::Tensor& sinks, const at::Tensor& tangent_sinks, const at::Tensor& out,
                       const at::Tensor& lse, const at::Tensor& tangent_out);

// The argument builder of attention_fwd, attention_bwd and attention_jvp (attention.cpp): their
// band and tensor mask and, where the schema has them, dropout's arguments, checked against the
// shape of q, k and v, as the kernels take them. With `for_kernels` false (Meta) they are only
// checked, and the mask comes back empty.
AttentionMask attention_mask_arguments(const OpArguments& args, const AttentionShape& s, const at::Tensor& q,
                                       bool for_kernels);

// An attention output (B, Hq, Nq, Dv) laid out (B, Nq, Hq, Dv) in memory: heads side by side, so
// out.transpose(1, 2).flatten(2) is free. (One op: empty and transpose cost a small call ~0.5 µs more.)
at::Tensor empty_attention_output(const AttentionShape& s, const at::TensorOptions& options);

}  // namespace selfattn
