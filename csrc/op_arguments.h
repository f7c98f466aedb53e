// How the ops read their arguments: by schema name, from the dispatcher's stack. Every op of
// selfattn.cpp is a boxed kernel (void(const OperatorHandle&, DispatchKeySet, Stack*)); it reads
// the arguments it uses by name through OpArguments and builds its argument groups (the mask,
// dropout) in the one builder of its schema family, so an argument is named in its schema, its
// builder and the kernels that use it, not in every function signature on the way.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace selfattn {

// The names of an op's arguments in schema order, read once per op (a function-local static of
// its kernel) from op.schema().
class ArgumentNames {
 public:
  explicit ArgumentNames(const c10::FunctionSchema& schema);

  // The position of `name`, or -1 when the schema has no such argument.
  int find(std::string_view name) const;
  size_t size() const { return names_.size(); }

 private:
  std::vector<std::string> names_;
};

// One call's arguments, the last names.size() values on the stack, read by name. Valid until the
// stack changes (set_outputs).
class OpArguments {
 public:
  OpArguments(const torch::jit::Stack& stack, const ArgumentNames& names)
      : names_(names), first_(stack.data() + (stack.size() - names.size())) {}

  bool has(std::string_view name) const { return names_.find(name) >= 0; }
  // The argument `name`, which the schema must have.
  const c10::IValue& operator[](std::string_view name) const;

  at::Tensor tensor(std::string_view name) const { return (*this)[name].toTensor(); }
  std::optional<at::Tensor> optional_tensor(std::string_view name) const {
    return (*this)[name].toOptional<at::Tensor>();
  }
  bool boolean(std::string_view name) const { return (*this)[name].toBool(); }
  // (A SymInt, as torch.compile may pass for an `int`, is guarded to its value.)
  int64_t integer(std::string_view name) const { return (*this)[name].toInt(); }
  double real(std::string_view name) const { return (*this)[name].toDouble(); }
  c10::List<bool> bool_list(std::string_view name) const { return (*this)[name].toBoolList(); }

 private:
  const ArgumentNames& names_;
  const c10::IValue* first_;
};

// Replaces the op's arguments on the stack with its outputs.
template <typename... Outputs>
void set_outputs(torch::jit::Stack* stack, const ArgumentNames& names, Outputs&&... outputs) {
  torch::jit::drop(*stack, names.size());
  torch::jit::push(*stack, std::forward<Outputs>(outputs)...);
}

// The arguments an op's autocast kernel casts: the floating-point inputs, and whether a float mask
// (attn_mask) that is not float32 follows them with .to() (so float64 too) or with cached_cast
// (which leaves float64 alone, for the check to refuse).
struct AutocastCasts {
  std::vector<const char*> inputs;
  bool mask_to_dtype;
};

// Under torch.autocast: `casts.inputs` (the first of which gives the device) in the region's
// lower-precision dtype, as SDPA does, then the op again below autocast.
void autocast_kernel(const c10::OperatorHandle& op, const AutocastCasts& casts, torch::jit::Stack* stack);

}  // namespace selfattn
