// The attention ops: argument checks, output allocation, and the hand-off to the kernel
// of the inputs' device. Written once for every device.
#include "attention.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace selfattn {

void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                       double scale, const at::Tensor& out, const at::Tensor& lse) {
  if (q.is_cuda()) {
#ifdef SELFATTN_WITH_CUDA
    return attention_forward_cuda(q, k, v, causal, scale, out, lse);
#else
    TORCH_CHECK(false, "selfattn was built without CUDA; reinstall it where nvcc is available");
#endif
  }
  attention_forward_cpu(q, k, v, causal, scale, out, lse);
}

void attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                        bool causal, double scale, const at::Tensor& grad_q,
                        const at::Tensor& grad_k, const at::Tensor& grad_v) {
  if (q.is_cuda()) {
#ifdef SELFATTN_WITH_CUDA
    return attention_backward_cuda(grad_out, q, k, v, out, lse, causal, scale, grad_q, grad_k, grad_v);
#else
    TORCH_CHECK(false, "selfattn was built without CUDA; reinstall it where nvcc is available");
#endif
  }
  attention_backward_cpu(grad_out, q, k, v, out, lse, causal, scale, grad_q, grad_k, grad_v);
}

namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, bool causal, double scale) {
  const AttentionShape s = check_attention_inputs(q, k, v, scale);
  // (B, Nq, H, Dv) in memory: heads side by side, so out.transpose(1, 2).flatten(2) is free.
  at::Tensor out = at::empty({s.batch, s.nq, s.heads, s.dim_v}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({s.batch, s.heads, s.nq}, q.options().dtype(accumulate_type(q.scalar_type())));
  attention_forward(q, k, v, causal, scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
  const AttentionShape s = check_attention_inputs(q, k, v, scale);
  check_attention_grad_inputs(s, q, grad_out, out, lse);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  attention_backward(grad_out, q, k, v, out, lse, causal, scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

// Under torch.autocast, float32 q/k/v run in the region's lower-precision dtype, as SDPA does.
std::tuple<at::Tensor, at::Tensor> attention_fwd_autocast(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, bool causal,
                                                          double scale) {
  const c10::DeviceType device_type = q.device().type();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("selfattn::attention_fwd", "")
                       .typed<decltype(attention_fwd)>();
  return op.call(at::autocast::cached_cast(dtype, q, device_type),
                 at::autocast::cached_cast(dtype, k, device_type),
                 at::autocast::cached_cast(dtype, v, device_type), causal, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

#ifdef SELFATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selfattn, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}
#endif

TORCH_LIBRARY_IMPL(selfattn, AutocastCPU, m) {
  m.impl("attention_fwd", &attention_fwd_autocast);
}

TORCH_LIBRARY_IMPL(selfattn, AutocastCUDA, m) {
  m.impl("attention_fwd", &attention_fwd_autocast);
}

}  // namespace selfattn
