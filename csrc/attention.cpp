// The attention ops: argument checks, output allocation, and the hand-off to the kernel
// of the inputs' device. Written once for every device.
#include "attention.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace selfattn {

void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const AttentionMask& mask, double scale, const at::Tensor& out,
                       const at::Tensor& lse) {
  if (q.is_cuda()) {
#ifdef SELFATTN_WITH_CUDA
    return attention_forward_cuda(q, k, v, mask, scale, out, lse);
#else
    TORCH_CHECK(false, "selfattn was built without CUDA; reinstall it where nvcc is available");
#endif
  }
  attention_forward_cpu(q, k, v, mask, scale, out, lse);
}

void attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                        const AttentionMask& mask, double scale, const at::Tensor& grad_q,
                        const at::Tensor& grad_k, const at::Tensor& grad_v) {
  if (q.is_cuda()) {
#ifdef SELFATTN_WITH_CUDA
    return attention_backward_cuda(grad_out, q, k, v, out, lse, mask, scale, grad_q, grad_k, grad_v);
#else
    TORCH_CHECK(false, "selfattn was built without CUDA; reinstall it where nvcc is available");
#endif
  }
  attention_backward_cpu(grad_out, q, k, v, out, lse, mask, scale, grad_q, grad_k, grad_v);
}

namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, bool causal, double scale,
                                                 const std::optional<at::Tensor>& attn_mask,
                                                 int64_t window_left, int64_t window_right,
                                                 int64_t diagonal_offset, double dropout_p,
                                                 const std::optional<at::Tensor>& rng_state) {
  const AttentionShape s = check_attention_inputs(q, k, v, scale);
  check_mask_inputs(s, q, attn_mask, window_left, window_right);
  check_dropout(dropout_p, rng_state, q, "q");
  // (B, Nq, H, Dv) in memory: heads side by side, so out.transpose(1, 2).flatten(2) is free.
  at::Tensor out = at::empty({s.batch, s.nq, s.heads, s.dim_v}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({s.batch, s.heads, s.nq}, q.options().dtype(accumulate_type(q.scalar_type())));
  attention_forward(q, k, v,
                    make_mask(s, causal, attn_mask, window_left, window_right, diagonal_offset, dropout_p, rng_state),
                    scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right,
    int64_t diagonal_offset, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  const AttentionShape s = check_attention_inputs(q, k, v, scale);
  check_mask_inputs(s, q, attn_mask, window_left, window_right);
  check_dropout(dropout_p, rng_state, q, "q");
  check_attention_grad_inputs(s, q, grad_out, out, lse);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  attention_backward(grad_out, q, k, v, out, lse,
                     make_mask(s, causal, attn_mask, window_left, window_right, diagonal_offset, dropout_p,
                               rng_state),
                     scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

// Under torch.autocast, float32 q/k/v run in the region's lower-precision dtype, as SDPA does.
// A float mask follows q into the region's dtype unless it is float32 (which the kernels take
// with any input dtype); a bool mask stays bool.
std::tuple<at::Tensor, at::Tensor> attention_fwd_autocast(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, bool causal, double scale,
                                                          const std::optional<at::Tensor>& attn_mask,
                                                          int64_t window_left, int64_t window_right,
                                                          int64_t diagonal_offset, double dropout_p,
                                                          const std::optional<at::Tensor>& rng_state) {
  const c10::DeviceType device_type = q.device().type();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("selfattn::attention_fwd", "")
                       .typed<decltype(attention_fwd)>();
  std::optional<at::Tensor> mask = attn_mask;
  if (mask.has_value() && mask->is_floating_point() && mask->scalar_type() != at::kFloat) {
    mask = mask->to(dtype);  // (cached_cast leaves float64 alone; the kernels would refuse it)
  }
  return op.call(at::autocast::cached_cast(dtype, q, device_type),
                 at::autocast::cached_cast(dtype, k, device_type),
                 at::autocast::cached_cast(dtype, v, device_type), causal, scale, mask, window_left,
                 window_right, diagonal_offset, dropout_p, rng_state);
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
