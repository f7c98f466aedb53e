// The CUDA attention entry points (attention.h): device guard and stream, the cases with nothing
// to compute, kernel arguments from tensors, scratch allocation, and the choice of kernel by
// dtype. Host C++ only; the kernels and their launchers are in the .cu files next to this one
// (kernels.h lists them).
//
//   forward:  float / half / bfloat16 -> forward_tiled      (attention_fwd.cu)
//             double                  -> forward_generic    (attention_generic.cu)
//   backward: delta = rowsum(dO ∘ out) (attention_bwd.cu), then
//             float / half / bfloat16 -> backward_dkdv_tiled, backward_dq_tiled
//             double                  -> backward_generic
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <limits>

#ifndef SELFATTN_CUDA_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../attention.h"
#endif

namespace selfattn::cuda {
namespace {

template <typename T>
Strided4<T> strided4(const at::Tensor& t) {
  Strided4<T> s;
  s.data = static_cast<T*>(const_cast<void*>(t.data_ptr()));
  s.stride_b = t.stride(0);
  s.stride_h = t.stride(1);
  s.stride_n = t.stride(2);
  s.stride_d = t.stride(3);
  // The kernels' 4-element vector accesses need this (see Strided4::vec4); views that break it
  // (odd head dims, sliced last dims, offsets) take the element-wise path instead of a copy.
  bool vec4 = t.size(3) < 4 || t.stride(3) == 1;
  for (int d = 0; d < 3; ++d) {
    vec4 = vec4 && (t.size(d) <= 1 || t.stride(d) % 4 == 0);
  }
  s.vec4 = vec4 && reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * sizeof(T)) == 0;
  return s;
}

// What the CUDA kernels support beyond the ops' own checks: head dims up to 256 (a lane's share
// of a row lives in registers) and sequence lengths that fit an int.
void check_sizes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.size(3) <= 256 && v.size(3) <= 256,
                    "selfattn: the CUDA kernels support head dims up to 256, got D = ", q.size(3),
                    " and Dv = ", v.size(3));
  TORCH_CHECK_VALUE(q.size(2) < INT_MAX && k.size(2) < INT_MAX,
                    "selfattn: sequence lengths must be below 2^31 on CUDA, got Nq = ", q.size(2),
                    " and Nk = ", k.size(2));
}

template <typename T>
ForwardParams<T> forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                bool causal, double scale, const at::Tensor& out,
                                const at::Tensor& lse) {
  ForwardParams<T> p;
  p.q = strided4<const T>(q);
  p.k = strided4<const T>(k);
  p.v = strided4<const T>(v);
  p.out = strided4<T>(out);
  p.lse = static_cast<acc_t<T>*>(lse.data_ptr());
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.lse_stride_n = lse.stride(2);
  p.heads = static_cast<int>(q.size(1));
  p.nq = static_cast<int>(q.size(2));
  p.nk = static_cast<int>(k.size(2));
  p.dim = static_cast<int>(q.size(3));
  p.dim_v = static_cast<int>(v.size(3));
  p.batch_heads = q.size(0) * q.size(1);
  p.row_blocks = 0;
  p.scale = static_cast<acc_t<T>>(scale);
  p.causal = causal;
  return p;
}

template <typename T>
BackwardParams<T> backward_params(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                  const at::Tensor& lse, bool causal, double scale,
                                  const at::Tensor& grad_q, const at::Tensor& grad_k,
                                  const at::Tensor& grad_v, const at::Tensor& delta) {
  BackwardParams<T> p;
  p.q = strided4<const T>(q);
  p.k = strided4<const T>(k);
  p.v = strided4<const T>(v);
  p.grad_out = strided4<const T>(grad_out);
  p.out = strided4<const T>(out);
  p.grad_q = strided4<T>(grad_q);
  p.grad_k = strided4<T>(grad_k);
  p.grad_v = strided4<T>(grad_v);
  p.lse = static_cast<const acc_t<T>*>(lse.data_ptr());
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.lse_stride_n = lse.stride(2);
  p.delta = static_cast<acc_t<T>*>(delta.data_ptr());
  p.heads = static_cast<int>(q.size(1));
  p.nq = static_cast<int>(q.size(2));
  p.nk = static_cast<int>(k.size(2));
  p.dim = static_cast<int>(q.size(3));
  p.dim_v = static_cast<int>(v.size(3));
  p.batch_heads = q.size(0) * q.size(1);
  p.row_blocks = 0;
  p.scale = static_cast<acc_t<T>>(scale);
  p.causal = causal;
  return p;
}

template <typename T>
void backward_tiled(const BackwardParams<T>& p, cudaStream_t stream) {
  launch_delta(p, stream);
  backward_dkdv_tiled(p, stream);
  backward_dq_tiled(p, stream);
}

}  // namespace

// Shapes as in attention.h; the caller has checked them and allocated out and lse.
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                 double scale, const at::Tensor& out, const at::Tensor& lse, cudaStream_t stream) {
  if (q.size(0) * q.size(1) == 0 || q.size(2) == 0) {
    return;
  }
  if (k.size(2) == 0) {  // no key to attend to: an empty sum
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return;
  }
  check_sizes(q, k, v);
  switch (q.scalar_type()) {
    case at::kFloat:
      return forward_tiled(forward_params<float>(q, k, v, causal, scale, out, lse), stream);
    case at::kHalf:
      return forward_tiled(forward_params<c10::Half>(q, k, v, causal, scale, out, lse), stream);
    case at::kBFloat16:
      return forward_tiled(forward_params<c10::BFloat16>(q, k, v, causal, scale, out, lse), stream);
    case at::kDouble:
      return forward_generic(forward_params<double>(q, k, v, causal, scale, out, lse), stream);
    default:
      TORCH_CHECK(false, "selfattn: no CUDA attention kernel for ", q.scalar_type());
  }
}

// Shapes as in attention.h; the caller has checked them and allocated the gradients.
void run_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                  double scale, const at::Tensor& grad_q, const at::Tensor& grad_k,
                  const at::Tensor& grad_v, cudaStream_t stream) {
  if (q.size(0) * q.size(1) == 0) {
    return;
  }
  if (q.size(2) == 0 || k.size(2) == 0) {  // nothing attends to anything: every gradient is zero
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return;
  }
  check_sizes(q, k, v);
  const at::ScalarType acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Scratch for rowsum(dO ∘ out), read by both gradient kernels; on the current stream, so the
  // caching allocator reuses it safely.
  const at::Tensor delta =
      at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_type));
  const auto params = [&](auto type_tag) {
    using T = decltype(type_tag);
    return backward_params<T>(grad_out, q, k, v, out, lse, causal, scale, grad_q, grad_k, grad_v,
                              delta);
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      return backward_tiled(params(float()), stream);
    case at::kHalf:
      return backward_tiled(params(c10::Half()), stream);
    case at::kBFloat16:
      return backward_tiled(params(c10::BFloat16()), stream);
    case at::kDouble: {
      const BackwardParams<double> p = params(double());
      launch_delta(p, stream);
      return backward_generic(p, stream);
    }
    default:
      TORCH_CHECK(false, "selfattn: no CUDA attention kernel for ", q.scalar_type());
  }
}

}  // namespace selfattn::cuda

#ifndef SELFATTN_CUDA_EMULATION
void selfattn::attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      bool causal, double scale, const at::Tensor& out,
                                      const at::Tensor& lse) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  cuda::run_forward(q, k, v, causal, scale, out, lse, c10::cuda::getCurrentCUDAStream());
}

void selfattn::attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& out, const at::Tensor& lse, bool causal,
                                       double scale, const at::Tensor& grad_q,
                                       const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  cuda::run_backward(grad_out, q, k, v, out, lse, causal, scale, grad_q, grad_k, grad_v,
                     c10::cuda::getCurrentCUDAStream());
}
#endif
