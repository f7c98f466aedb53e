// The attention ops: argument checks, output allocation, and the hand-off to the kernel
// of the inputs' device. Written once for every device.
#include "attention.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace selfattn {

namespace {

void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "selfattn: ", name, " is undefined");
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                       dtype == at::kHalf,
                   "selfattn: ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "selfattn: ", name, " and ", ref_name,
                   " must have the same dtype, got ", t.scalar_type(), " and ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "selfattn: ", name, " and ", ref_name,
                    " must be on the same device, got ", t.device(), " and ", ref.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* meaning) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "selfattn: ", name, " must have shape ", meaning, " = ",
                    expected, ", got ", t.sizes());
}

}  // namespace

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_float_tensor(q, "q");
  check_float_tensor(k, "k");
  check_float_tensor(v, "v");
  TORCH_CHECK_VALUE(q.dim() == 4, "selfattn: q must be 4-D (B, H, Nq, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "selfattn: k must be 4-D (B, H, Nk, D), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "selfattn: v must be 4-D (B, H, Nk, Dv), got shape ", v.sizes());
  check_same(k, "k", q, "q");
  check_same(v, "v", q, "q");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                    "selfattn: q, k and v must have the same batch size (dim 0), got ", q.size(0),
                    ", ", k.size(0), " and ", v.size(0));
  TORCH_CHECK_VALUE(k.size(1) == q.size(1) && v.size(1) == q.size(1),
                    "selfattn: q, k and v must have the same number of heads (dim 1), got ",
                    q.size(1), ", ", k.size(1), " and ", v.size(1));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "selfattn: k must have the head dim of q (dim 3), got ",
                    k.size(3), " for k and ", q.size(3), " for q");
  TORCH_CHECK_VALUE(v.size(2) == k.size(2),
                    "selfattn: k and v must have the same sequence length (dim 2), got ", k.size(2),
                    " and ", v.size(2));
}

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
  check_attention_inputs(q, k, v);
  const int64_t batch = q.size(0), heads = q.size(1), nq = q.size(2), dim_v = v.size(3);
  // (B, Nq, H, Dv) in memory: heads side by side, so out.transpose(1, 2).flatten(2) is free.
  at::Tensor out = at::empty({batch, nq, heads, dim_v}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({batch, heads, nq}, q.options().dtype(accumulate_type(q.scalar_type())));
  attention_forward(q, k, v, causal, scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
  check_attention_inputs(q, k, v);
  const std::vector<int64_t> out_shape = {q.size(0), q.size(1), q.size(2), v.size(3)};
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(out, "out");
  check_shape(grad_out, "grad_out", out_shape, "(B, H, Nq, Dv)");
  check_shape(out, "out", out_shape, "(B, H, Nq, Dv)");
  check_shape(lse, "lse", {q.size(0), q.size(1), q.size(2)}, "(B, H, Nq)");
  check_same(grad_out, "grad_out", q, "q");
  check_same(out, "out", q, "q");
  TORCH_CHECK_TYPE(lse.scalar_type() == accumulate_type(q.scalar_type()), "selfattn: lse must be ",
                   accumulate_type(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ",
                   lse.scalar_type());
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
