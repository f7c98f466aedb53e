// The plain-eager entry of selfattn.attention (eager.cpp), for the Python module's direct call
// (python_module.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/function_schema.h>
#include <ATen/core/stack.h>

namespace selfattn {

// The schema whose arguments attention_eager takes: attention_fwd's.
const c10::FunctionSchema& attention_eager_schema();

// attention_fwd's out for its arguments `stack` (every one, in schema order), with the reverse-mode
// autograd recorded in C++ when a gradient is wanted.
at::Tensor attention_eager(torch::jit::Stack stack);

}  // namespace selfattn
