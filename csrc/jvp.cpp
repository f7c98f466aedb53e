// The forward-mode derivative op of attention (attention_jvp): argument checks, output allocation,
// and the hand-off to the kernel of the inputs' device. Written once for every device.
#include "attention.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

namespace selfattn {
namespace {

void attention_jvp_device(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& tangent_q, const at::Tensor& tangent_k, const at::Tensor& tangent_v,
                          const AttentionMask& mask, double scale, const at::Tensor& out, const at::Tensor& lse,
                          const at::Tensor& tangent_out) {
  if (q.is_cuda()) {
#ifdef SELFATTN_WITH_CUDA
    return attention_jvp_cuda(q, k, v, tangent_q, tangent_k, tangent_v, mask, scale, out, lse, tangent_out);
#else
    TORCH_CHECK(false, "selfattn was built without CUDA; reinstall it where nvcc is available");
#endif
  }
  attention_jvp_cpu(q, k, v, tangent_q, tangent_k, tangent_v, mask, scale, out, lse, tangent_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jvp(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tangent_q,
    const std::optional<at::Tensor>& tangent_k, const std::optional<at::Tensor>& tangent_v, bool causal,
    double scale, const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right,
    int64_t diagonal_offset) {
  const AttentionShape s = check_attention_inputs(q, k, v, scale);
  check_mask_inputs(s, q, attn_mask, window_left, window_right);
  check_attention_tangents(s, q, tangent_q, tangent_k, tangent_v);
  // out and tangent_out as attention_fwd lays out out: (B, Nq, H, Dv) in memory.
  at::Tensor out = at::empty({s.batch, s.nq, s.heads, s.dim_v}, q.options()).transpose(1, 2);
  at::Tensor tangent_out = at::empty({s.batch, s.nq, s.heads, s.dim_v}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({s.batch, s.heads, s.nq}, q.options().dtype(accumulate_type(q.scalar_type())));
  const auto or_undefined = [](const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
  attention_jvp_device(q, k, v, or_undefined(tangent_q), or_undefined(tangent_k), or_undefined(tangent_v),
                       make_mask(s, causal, attn_mask, window_left, window_right, diagonal_offset), scale, out,
                       lse, tangent_out);
  return {out, lse, tangent_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CPU, m) {
  m.impl("attention_jvp", &attention_jvp);
}

#ifdef SELFATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selfattn, CUDA, m) {
  m.impl("attention_jvp", &attention_jvp);
}
#endif

}  // namespace selfattn
