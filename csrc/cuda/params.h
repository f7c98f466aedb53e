// Kernel arguments of the attention kernels: plain structs, shared by the .cu files (device
// code) and attention_cuda.cpp (which builds them from tensors), so no ATen header is needed
// to launch a kernel and none is parsed by nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(SELFATTN_CUDA_EMULATION)
#define SELFATTN_HOST_DEVICE __host__ __device__
#else
#define SELFATTN_HOST_DEVICE
#endif

#ifndef SELFATTN_CUDA_EMULATION
#include <cuda_runtime_api.h>  // cudaStream_t
#endif

namespace selfattn::cuda {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// A (B, H, N, D) tensor with any strides, as a kernel argument.
template <typename T>
struct Strided4 {
  T* data;
  int64_t stride_b, stride_h, stride_n, stride_d;
  // Elements d0..d0+3 of a row, d0 a multiple of 4, are one aligned vector: unit stride along D,
  // the other strides (of dims longer than 1) multiples of 4, and the base aligned to 4 elements.
  bool vec4;

  SELFATTN_HOST_DEVICE T* row(int64_t b, int64_t h, int64_t n) const {
    return data + b * stride_b + h * stride_h + n * stride_n;
  }
};

// Forward: out = softmax(scale * q kᵀ) v and lse, the logsumexp of each row of scale * q kᵀ.
template <typename T>
struct ForwardParams {
  Strided4<const T> q;  // (B, H, Nq, D)
  Strided4<const T> k;  // (B, H, Nk, D)
  Strided4<const T> v;  // (B, H, Nk, Dv)
  Strided4<T> out;      // (B, H, Nq, Dv)
  acc_t<T>* lse;        // (B, H, Nq), natural log
  int64_t lse_stride_b, lse_stride_h, lse_stride_n;
  int heads, nq, nk, dim, dim_v;
  int64_t batch_heads;  // B * H
  int row_blocks;       // query blocks per (b, h), set by the launcher
  acc_t<T> scale;
  bool causal;
};

// Backward from grad_out (dO), recomputing P from lse.
template <typename T>
struct BackwardParams {
  Strided4<const T> q, k, v;   // as in the forward
  Strided4<const T> grad_out;  // (B, H, Nq, Dv)
  Strided4<const T> out;       // (B, H, Nq, Dv)
  Strided4<T> grad_q, grad_k, grad_v;
  const acc_t<T>* lse;  // (B, H, Nq)
  int64_t lse_stride_b, lse_stride_h, lse_stride_n;
  acc_t<T>* delta;      // (B, H, Nq) contiguous: rowsum(dO ∘ out), written by the delta kernel
  int heads, nq, nk, dim, dim_v;
  int64_t batch_heads;
  int row_blocks;       // blocks of owned rows per (b, h), set by each kernel's launcher
  acc_t<T> scale;
  bool causal;
};

}  // namespace selfattn::cuda
