// Entry points of the attention kernels, shared by the device-generic ops
// (attention.cpp, self_attention.cpp) and the per-device kernel files.
//
// Shapes, for every function below:
//   q   (B, H, Nq, D)    k (B, H, Nk, D)    v (B, H, Nk, Dv)    any strides
//   out (B, H, Nq, Dv)   lse (B, H, Nq): natural-log logsumexp of the scaled scores of each row
// The caller has checked every argument (checks.h) and allocated the outputs;
// the kernels only fill them. lse is float32, or float64 for float64 inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace selfattn {

void attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           bool causal, double scale, const at::Tensor& out, const at::Tensor& lse);

// grad_out (B, H, Nq, Dv), any strides; grad_q/k/v have the shapes of q/k/v, any strides
// (the fused op passes views of one packed (B, N, 3, H, D) buffer).
void attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                            bool causal, double scale, const at::Tensor& grad_q,
                            const at::Tensor& grad_k, const at::Tensor& grad_v);

#ifdef SELFATTN_WITH_CUDA
void attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            bool causal, double scale, const at::Tensor& out, const at::Tensor& lse);
void attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             bool causal, double scale, const at::Tensor& grad_q,
                             const at::Tensor& grad_k, const at::Tensor& grad_v);
#endif

// The kernel of the tensors' device (defined in attention.cpp).
void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                       double scale, const at::Tensor& out, const at::Tensor& lse);
void attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                        bool causal, double scale, const at::Tensor& grad_q,
                        const at::Tensor& grad_k, const at::Tensor& grad_v);

}  // namespace selfattn
