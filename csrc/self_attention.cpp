// The fused self-attention layer: projections and attention in one op, written once for
// every device (it calls only ATen and the attention entry points of attention.h).
//
// Forward:  qkv = x · [W_q; W_k; W_v]ᵀ (+ b)       one GEMM into (B, N, 3, H, D)
//           out = attention(q, k, v)              on strided views of qkv, written as (B, N, H, D) = (B, N, M)
// Backward: dq, dk, dv written straight into one (B, N, 3, H, D) buffer dqkv,
//           dx = dqkv · W,  dW = dqkvᵀ · x,  db = sum of dqkv over (B, N).
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

struct LayerShape {
  int64_t batch, seq, embed, model, heads, head_dim;
};

// x (B, N, E), w_qkv (3M, E), b_qkv (3M) or none.
LayerShape check_layer_inputs(const at::Tensor& x, const at::Tensor& w_qkv,
                              const std::optional<at::Tensor>& b_qkv, int64_t num_heads) {
  const auto float_type = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
  };
  TORCH_CHECK_TYPE(float_type(x.scalar_type()),
                   "selfattn: x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3, "selfattn: x must be 3-D (B, N, E), got shape ", x.sizes());
  TORCH_CHECK_VALUE(num_heads >= 1, "selfattn: num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK_VALUE(w_qkv.dim() == 2 && w_qkv.size(0) % 3 == 0 && w_qkv.size(1) == x.size(2),
                    "selfattn: w_qkv must have shape (3 * model_dim, embed_dim) with embed_dim = "
                    "x.size(-1) = ", x.size(2), ", got ", w_qkv.sizes());
  TORCH_CHECK_TYPE(w_qkv.scalar_type() == x.scalar_type(), "selfattn: w_qkv and x must have the "
                   "same dtype, got ", w_qkv.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK_VALUE(w_qkv.device() == x.device(), "selfattn: w_qkv and x must be on the same "
                    "device, got ", w_qkv.device(), " and ", x.device());
  LayerShape s{x.size(0), x.size(1), x.size(2), w_qkv.size(0) / 3, num_heads, 0};
  TORCH_CHECK_VALUE(s.model >= 1, "selfattn: w_qkv must have at least 3 rows, got shape ", w_qkv.sizes());
  TORCH_CHECK_VALUE(s.model % num_heads == 0, "selfattn: model_dim = w_qkv.size(0) / 3 = ", s.model,
                    " must be divisible by num_heads = ", num_heads);
  s.head_dim = s.model / num_heads;
  if (b_qkv.has_value()) {
    const at::Tensor& b = *b_qkv;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == 3 * s.model, "selfattn: b_qkv must have shape "
                      "(3 * model_dim,) = (", 3 * s.model, ",), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), "selfattn: b_qkv and x must have the same "
                     "dtype, got ", b.scalar_type(), " and ", x.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device(), "selfattn: b_qkv and x must be on the same device, "
                      "got ", b.device(), " and ", x.device());
  }
  return s;
}

// (B, H, N, D) views of q, k and v inside a (B, N, 3, H, D) buffer.
std::array<at::Tensor, 3> split_heads(const at::Tensor& packed, const LayerShape& s) {
  const at::Tensor five = packed.view({s.batch, s.seq, 3, s.heads, s.head_dim});
  return {five.select(2, 0).transpose(1, 2), five.select(2, 1).transpose(1, 2),
          five.select(2, 2).transpose(1, 2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_fwd(
    const at::Tensor& x, const at::Tensor& w_qkv, const std::optional<at::Tensor>& b_qkv,
    int64_t num_heads, bool causal, double scale) {
  const LayerShape s = check_layer_inputs(x, w_qkv, b_qkv, num_heads);
  // 1. Query, key and value of every token from one GEMM: (B*N, E) · (E, 3M).
  const at::Tensor x_rows = x.reshape({s.batch * s.seq, s.embed});
  const at::Tensor qkv = b_qkv.has_value() ? at::addmm(*b_qkv, x_rows, w_qkv.t())
                                           : at::mm(x_rows, w_qkv.t());
  const auto [q, k, v] = split_heads(qkv, s);
  // 2-5. Attention on the strided views, written as (B, N, H, D): heads concatenated.
  at::Tensor out = at::empty({s.batch, s.seq, s.heads, s.head_dim}, x.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.seq}, x.options().dtype(accumulate_type(x.scalar_type())));
  attention_forward(q, k, v, causal, scale, out.transpose(1, 2), lse);
  return {out.view({s.batch, s.seq, s.model}), qkv.view({s.batch, s.seq, 3 * s.model}), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_qkv, const at::Tensor& qkv,
    const at::Tensor& out, const at::Tensor& lse, int64_t num_heads, bool causal, double scale,
    std::array<bool, 3> output_mask) {
  const LayerShape s = check_layer_inputs(x, w_qkv, std::nullopt, num_heads);
  const std::vector<int64_t> out_shape = {s.batch, s.seq, s.model};
  TORCH_CHECK_VALUE(grad_out.sizes() == out_shape && out.sizes() == out_shape,
                    "selfattn: grad_out and out must have shape (B, N, M) = ", at::IntArrayRef(out_shape),
                    ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK_VALUE(qkv.sizes() == at::IntArrayRef({s.batch, s.seq, 3 * s.model}),
                    "selfattn: qkv must have shape (B, N, 3M), got ", qkv.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && qkv.scalar_type() == x.scalar_type() &&
                       out.scalar_type() == x.scalar_type(),
                   "selfattn: grad_out, qkv and out must have the dtype of x (", x.scalar_type(), ")");
  const auto [q, k, v] = split_heads(qkv.contiguous(), s);
  const auto per_head = [&](const at::Tensor& t) {  // (B, N, M) -> (B, H, N, D), a view when it can be
    return t.reshape({s.batch, s.seq, s.heads, s.head_dim}).transpose(1, 2);
  };
  // dq, dk, dv straight into one packed buffer: the projection GEMMs then read it as (B*N, 3M).
  const at::Tensor grad_qkv = at::empty({s.batch * s.seq, 3 * s.model}, x.options());
  const auto [grad_q, grad_k, grad_v] = split_heads(grad_qkv, s);
  attention_backward(per_head(grad_out), q, k, v, per_head(out), lse, causal, scale, grad_q, grad_k, grad_v);

  // Outputs must not alias each other, so each skipped gradient gets its own empty tensor.
  const auto nothing = [&] { return at::empty({0}, x.options()); };
  const at::Tensor grad_x = output_mask[0] ? at::mm(grad_qkv, w_qkv).view({s.batch, s.seq, s.embed}) : nothing();
  const at::Tensor grad_w = output_mask[1] ? at::mm(grad_qkv.t(), x.reshape({s.batch * s.seq, s.embed})) : nothing();
  const at::Tensor grad_b = output_mask[2] ? grad_qkv.sum(0) : nothing();
  return {grad_x, grad_w, grad_b};
}

// Under torch.autocast: x, w_qkv and b_qkv run in the region's lower-precision dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_fwd_autocast(
    const at::Tensor& x, const at::Tensor& w_qkv, const std::optional<at::Tensor>& b_qkv,
    int64_t num_heads, bool causal, double scale) {
  const c10::DeviceType device_type = x.device().type();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("selfattn::self_attention_fwd", "")
                       .typed<decltype(self_attention_fwd)>();
  return op.call(at::autocast::cached_cast(dtype, x, device_type),
                 at::autocast::cached_cast(dtype, w_qkv, device_type),
                 at::autocast::cached_cast(dtype, b_qkv, device_type), num_heads, causal, scale);
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
