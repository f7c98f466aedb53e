// Reading the ops' arguments by name (op_arguments.h), and their autocast kernels.
#include "op_arguments.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstring>

namespace selfattn {

ArgumentNames::ArgumentNames(const c10::FunctionSchema& schema) {
  for (const c10::Argument& argument : schema.arguments()) {
    names_.push_back(argument.name());
  }
}

int ArgumentNames::find(std::string_view name) const {
  // At most 17 names: a scan costs less than hashing the name; lengths first, as most differ
  // (a kernel looks up ~10 names a call).
  for (size_t i = 0; i < names_.size(); ++i) {
    if (names_[i].size() == name.size() && std::memcmp(names_[i].data(), name.data(), name.size()) == 0) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

const c10::IValue& OpArguments::operator[](std::string_view name) const {
  const int position = names_.find(name);
  TORCH_INTERNAL_ASSERT(position >= 0, "selfattn: the op's schema has no argument ", name);
  return first_[position];
}

void autocast_kernel(const c10::OperatorHandle& op, const AutocastCasts& casts, torch::jit::Stack* stack) {
  const ArgumentNames names(op.schema());  // (only under autocast: not worth a cache per op)
  const size_t first = stack->size() - names.size();
  const auto slot = [&](const char* name) -> c10::IValue& { return (*stack)[first + names.find(name)]; };
  const c10::DeviceType device_type = slot(casts.inputs.front()).toTensor().device().type();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  for (const char* input : casts.inputs) {
    c10::IValue& value = slot(input);
    if (value.isTensor()) {
      value = at::autocast::cached_cast(dtype, value.toTensor(), device_type);
    }
  }
  if (names.find("attn_mask") >= 0 && slot("attn_mask").isTensor()) {
    c10::IValue& value = slot("attn_mask");
    const at::Tensor mask = value.toTensor();
    if (mask.is_floating_point() && mask.scalar_type() != at::kFloat) {
      value = casts.mask_to_dtype ? mask.to(dtype) : at::autocast::cached_cast(dtype, mask, device_type);
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

}  // namespace selfattn
