// The plain-eager entry of selfattn.attention: attention_fwd with its reverse-mode autograd done
// here in C++, for the calls where the Python autograd (selfattn/_autograd.py) costs more than the
// kernel. A small call (one decode step, a few heads of a few rows) spends ~5 µs in a Python
// autograd.Function and ~1 µs entering the dispatcher below autograd from Python; here that is one
// C++ Function and one C++ guard.
//
// Python takes this entry only in plain eager mode: no torch.compile tracing, torch.func transform,
// autocast region or forward-AD level (those need the Python Autograd kernel, which alone
// implements jvp and the torch.func levels). The graph node it records computes the same
// gradients through the same attention_bwd op; a second derivative still reaches that op's Python
// Autograd kernel, which refuses it.
#include "attention.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace selfattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            bool, double, const OptionalTensor&, int64_t, int64_t,
                                                            int64_t, double, const OptionalTensor&);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool, double, const OptionalTensor&, int64_t, int64_t, int64_t, double, const OptionalTensor&);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("selfattn::attention_fwd", "").typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("selfattn::attention_bwd", "").typed<BackwardSignature>();
  return op;
}

OptionalTensor optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool causal, double scale, const OptionalTensor& attn_mask, int64_t window_left,
                               int64_t window_right, int64_t diagonal_offset, double dropout_p,
                               const OptionalTensor& rng_state) {
    // apply() turned grad mode off, but the call would still enter the Autograd kernel (Python).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = forward_op().call(q, k, v, causal, scale, attn_mask, window_left, window_right,
                                        diagonal_offset, dropout_p, rng_state);
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // no zero tensor for lse's (absent) gradient
    // rng_state is saved: the backward regenerates the same keep mask from it.
    ctx->save_for_backward({q, k, v, out, lse, attn_mask.value_or(at::Tensor()), rng_state.value_or(at::Tensor())});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["diagonal_offset"] = diagonal_offset;
    ctx->saved_data["dropout_p"] = dropout_p;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr size_t kInputs = 11;  // forward's arguments after ctx
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) {
      return variable_list(kInputs);
    }
    const variable_list saved = ctx->get_saved_variables();
    const auto call = [&] {
      return backward_op().call(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4],
                                ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
                                optional(saved[5]), ctx->saved_data["window_left"].toInt(),
                                ctx->saved_data["window_right"].toInt(), ctx->saved_data["diagonal_offset"].toInt(),
                                ctx->saved_data["dropout_p"].toDouble(), optional(saved[6]));
    };
    // A graph of the gradient (create_graph=True) or a torch.func transform over this backward
    // (vmap of autograd.grad) goes through the op's Autograd kernel, which records the refusal of
    // a second derivative and finds the batching rules; otherwise below it, as the forward.
    const bool plain = !at::GradMode::is_enabled() &&
                       !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
    std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
    if (plain) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      result = call();
    } else {
      result = call();
    }
    variable_list input_grads(kInputs);
    input_grads[0] = std::get<0>(result);
    input_grads[1] = std::get<1>(result);
    input_grads[2] = std::get<2>(result);
    return input_grads;
  }
};

// The private op's kernel (schema in selfattn.cpp): out alone (one Python object fewer per call;
// lse stays in the node for the backward). Without a gradient to record it is attention_fwd
// below autograd.
at::Tensor attention_eager(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                           const OptionalTensor& attn_mask, int64_t window_left, int64_t window_right,
                           int64_t diagonal_offset, double dropout_p, const OptionalTensor& rng_state) {
  const bool mask_requires_grad = attn_mask.has_value() && attn_mask->requires_grad();
  const bool record = at::GradMode::is_enabled() &&
                      (q.requires_grad() || k.requires_grad() || v.requires_grad() || mask_requires_grad);
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return std::get<0>(forward_op().call(q, k, v, causal, scale, attn_mask, window_left, window_right,
                                         diagonal_offset, dropout_p, rng_state));
  }
  // (The same words as the Python autograd's refusal.)
  TORCH_CHECK_NOT_IMPLEMENTED(!mask_requires_grad,
                              "selfattn.attention: attn_mask requires grad, but selfattn does not compute the "
                              "gradient of a mask; detach it, or use F.scaled_dot_product_attention for a learned "
                              "additive mask");
  return AttentionFunction::apply(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset,
                                  dropout_p, rng_state)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CompositeImplicitAutograd, m) {
  m.impl("_attention_eager", &attention_eager);
}

}  // namespace selfattn
