// The plain-eager entry of selfattn.attention: attention_fwd with its reverse-mode autograd done
// here in C++, for the calls where the Python autograd (selfattn/_autograd.py) costs more than the
// kernel. A small call (one decode step, a few heads of a few rows) spends ~5 µs in a Python
// autograd.Function and ~1 µs entering the dispatcher below autograd from Python; here that is one
// C++ Function and one C++ guard.
//
// Python takes this entry only in plain eager mode, through the direct call of python_module.cpp:
// no torch.compile tracing, torch.func transform, autocast region or forward-AD level (those need
// the Python Autograd kernel, which alone implements jvp and the torch.func levels). The graph node
// it records computes the same gradients through the same attention_bwd op; a second derivative
// still reaches that op's Python Autograd kernel, which refuses it.
//
// The node names no argument: it carries attention_fwd's arguments as they came (tensors saved as
// variables, the rest as IValues) and builds attention_bwd's by name from the two schemas
// (EagerPlan), so an argument added to both schemas reaches the backward as it is.
#include "eager.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <string>
#include <vector>

namespace selfattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int position(const std::vector<c10::Argument>& arguments, const std::string& name) {
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (arguments[i].name() == name) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

bool is_tensor(const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::OptionalType) {
    return type->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::TensorType;
  }
  return type->kind() == c10::TypeKind::TensorType;
}

// attention_fwd and attention_bwd, matched by name once: attention_bwd returns grad_<x> for each
// differentiable argument x of attention_fwd; it takes grad_<y> for each differentiable output y,
// the outputs themselves by their names, and the forward's other arguments by theirs.
struct EagerPlan {
  enum class From { kGradient, kOutput, kArgument };
  struct Source {
    From from;
    size_t index;  // of the forward's outputs (kGradient, kOutput) or arguments (kArgument)
  };

  c10::OperatorHandle forward;
  c10::OperatorHandle backward;
  std::vector<bool> argument_is_tensor;      // per forward argument: Tensor or Tensor?, saved as a variable
  std::vector<size_t> tensor_slot;           // per forward argument: its place among the saved variables
  size_t num_tensors = 0;
  std::vector<size_t> differentiable;        // forward positions, in the order of attention_bwd's outputs
  std::vector<size_t> non_differentiable;    // the other tensor arguments (attn_mask, rng_state)
  std::vector<bool> output_differentiable;   // per forward output
  std::vector<Source> backward_arguments;

  EagerPlan()
      : forward(c10::Dispatcher::singleton().findSchemaOrThrow("selfattn::attention_fwd", "")),
        backward(c10::Dispatcher::singleton().findSchemaOrThrow("selfattn::attention_bwd", "")) {
    const std::vector<c10::Argument>& arguments = forward.schema().arguments();
    const std::vector<c10::Argument>& outputs = forward.schema().returns();
    const std::vector<c10::Argument>& backward_inputs = backward.schema().arguments();
    for (const c10::Argument& argument : arguments) {
      argument_is_tensor.push_back(is_tensor(argument.type()));
      tensor_slot.push_back(num_tensors);
      num_tensors += argument_is_tensor.back() ? 1 : 0;
    }
    for (const c10::Argument& gradient : backward.schema().returns()) {
      const int p = gradient.name().rfind("grad_", 0) == 0 ? position(arguments, gradient.name().substr(5)) : -1;
      TORCH_INTERNAL_ASSERT(p >= 0, "selfattn: attention_bwd's output ", gradient.name(),
                            " names no argument of attention_fwd");
      differentiable.push_back(p);
    }
    for (size_t i = 0; i < arguments.size(); ++i) {
      if (argument_is_tensor[i] && std::find(differentiable.begin(), differentiable.end(), i) == differentiable.end()) {
        non_differentiable.push_back(i);
      }
    }
    for (const c10::Argument& output : outputs) {
      output_differentiable.push_back(position(backward_inputs, "grad_" + output.name()) >= 0);
    }
    for (const c10::Argument& input : backward_inputs) {
      const std::string& name = input.name();
      const int gradient_of = name.rfind("grad_", 0) == 0 ? position(outputs, name.substr(5)) : -1;
      if (gradient_of >= 0) {
        backward_arguments.push_back({From::kGradient, size_t(gradient_of)});
      } else if (const int output = position(outputs, name); output >= 0) {
        backward_arguments.push_back({From::kOutput, size_t(output)});
      } else {
        const int argument = position(arguments, name);
        TORCH_INTERNAL_ASSERT(argument >= 0, "selfattn: attention_bwd's argument ", name,
                              " is neither an output nor an argument of attention_fwd");
        backward_arguments.push_back({From::kArgument, size_t(argument)});
      }
    }
  }
};

const EagerPlan& eager_plan() {
  static const EagerPlan plan;
  return plan;
}

struct EagerAttention : public torch::autograd::Function<EagerAttention> {
  // differentiable: the tensors at plan.differentiable (the node's inputs); arguments: all of
  // attention_fwd's, consumed by the call.
  static variable_list forward(AutogradContext* ctx, at::TensorList differentiable, torch::jit::Stack* arguments) {
    (void)differentiable;  // (on the stack too; passed for apply() to record the graph's edges)
    const EagerPlan& plan = eager_plan();
    // Tensors (undefined for None) as variables — rng_state too, so the backward regenerates the
    // same keep mask — and the other arguments as IValues, None in the tensors' places.
    variable_list saved;
    saved.reserve(plan.num_tensors + plan.output_differentiable.size());
    c10::impl::GenericList others(c10::AnyType::get());
    others.reserve(arguments->size());
    for (size_t i = 0; i < arguments->size(); ++i) {
      const c10::IValue& value = (*arguments)[i];
      if (plan.argument_is_tensor[i]) {
        saved.push_back(value.isTensor() ? value.toTensor() : at::Tensor());
        others.push_back(c10::IValue());
      } else {
        others.push_back(value);
      }
    }
    {
      // apply() turned grad mode off, but the call would still enter the Autograd kernel (Python).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      plan.forward.callBoxed(arguments);
    }
    variable_list outputs, non_differentiable;
    for (size_t i = 0; i < arguments->size(); ++i) {
      outputs.push_back((*arguments)[i].toTensor());
      if (!plan.output_differentiable[i]) {
        non_differentiable.push_back(outputs.back());
      }
    }
    ctx->mark_non_differentiable(non_differentiable);
    ctx->set_materialize_grads(false);  // no zero tensor for lse's (absent) gradient
    saved.insert(saved.end(), outputs.begin(), outputs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["arguments"] = std::move(others);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const EagerPlan& plan = eager_plan();
    const variable_list saved = ctx->get_saved_variables();
    // One gradient per differentiable argument that was given (the node's inputs; + the stack's: none).
    size_t num_given = 0;
    for (const size_t i : plan.differentiable) {
      num_given += saved[plan.tensor_slot[i]].defined() ? 1 : 0;
    }
    variable_list input_grads(num_given + 1);
    bool any_gradient = false;
    for (size_t i = 0; i < grads.size(); ++i) {
      any_gradient = any_gradient || (plan.output_differentiable[i] && grads[i].defined());
    }
    if (!any_gradient) {
      return input_grads;
    }
    const c10::ArrayRef<c10::IValue> others = ctx->saved_data["arguments"].toListRef();
    torch::jit::Stack stack;
    stack.reserve(plan.backward_arguments.size());
    for (const EagerPlan::Source& source : plan.backward_arguments) {
      if (source.from == EagerPlan::From::kGradient) {
        stack.emplace_back(grads[source.index]);
      } else if (source.from == EagerPlan::From::kOutput) {
        stack.emplace_back(saved[plan.num_tensors + source.index]);
      } else if (!plan.argument_is_tensor[source.index]) {
        stack.push_back(others[source.index]);
      } else if (const at::Tensor& tensor = saved[plan.tensor_slot[source.index]]; tensor.defined()) {
        stack.emplace_back(tensor);
      } else {
        stack.emplace_back();  // None
      }
    }
    // A graph of the gradient (create_graph=True) or a torch.func transform over this backward
    // (vmap of autograd.grad) goes through the op's Autograd kernel, which records the refusal of
    // a second derivative and finds the batching rules; otherwise below it, as the forward.
    const bool plain = !at::GradMode::is_enabled() &&
                       !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
    if (plain) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      plan.backward.callBoxed(&stack);
    } else {
      plan.backward.callBoxed(&stack);
    }
    for (size_t j = 0, given = 0; j < plan.differentiable.size(); ++j) {
      // (An argument that was None has no input: attention_bwd returns an empty grad_sinks then.)
      if (saved[plan.tensor_slot[plan.differentiable[j]]].defined()) {
        input_grads[given++] = stack[j].toTensor();
      }
    }
    return input_grads;
  }
};

}  // namespace

const c10::FunctionSchema& attention_eager_schema() { return eager_plan().forward.schema(); }

at::Tensor attention_eager(torch::jit::Stack stack) {
  const EagerPlan& plan = eager_plan();
  bool record = false;
  if (at::GradMode::is_enabled()) {
    for (size_t i = 0; i < stack.size() && !record; ++i) {
      record = stack[i].isTensor() && stack[i].toTensor().requires_grad();
    }
  }
  if (!record) {  // without a gradient to record: attention_fwd below autograd
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    plan.forward.callBoxed(&stack);
    return std::move(stack[0]).toTensor();
  }
  // attn_mask and alibi_slopes are the floating-point tensor arguments without a gradient. (The
  // same words as the Python autograd's refusals, selfattn/_refusals.py.)
  for (const size_t i : plan.non_differentiable) {
    const bool requires_grad = stack[i].isTensor() && stack[i].toTensor().requires_grad();
    const std::string& name = plan.forward.schema().arguments()[i].name();
    TORCH_CHECK_NOT_IMPLEMENTED(
        !requires_grad || name != "alibi_slopes",
        "selfattn.attention: alibi_slopes requires grad, but ALiBi's slopes are fixed: selfattn "
        "does not compute their derivative; detach it, or build the bias as a float attn_mask "
        "for F.scaled_dot_product_attention");
    TORCH_CHECK_NOT_IMPLEMENTED(!requires_grad, "selfattn.attention: ", name,
                                " requires grad, but selfattn does not compute the gradient of a mask; detach it, "
                                "or use F.scaled_dot_product_attention for a learned additive mask");
  }
  // The differentiable arguments that were given (sinks may be None): the node's inputs.
  std::vector<at::Tensor> differentiable;
  differentiable.reserve(plan.differentiable.size());
  for (const size_t i : plan.differentiable) {
    if (stack[i].isTensor()) {
      differentiable.push_back(stack[i].toTensor());
    }
  }
  return EagerAttention::apply(at::TensorList(differentiable), &stack)[0];
}

}  // namespace selfattn
