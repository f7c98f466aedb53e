// The launchers of the attention kernels, each defined (and instantiated for the dtypes it
// serves) in its own .cu file so that the files compile in parallel; attention_cuda.cpp calls
// them. Only kernel-argument structs cross this line, no tensors: the .cu files stay free of
// ATen's heavy headers (compile time).
//
//   attention_fwd.cu        forward_tiled       float, half, bfloat16
//   attention_bwd.cu        launch_delta        all four dtypes
//   attention_bwd_dkdv.cu   backward_dkdv_tiled float, half, bfloat16
//   attention_bwd_dq.cu     backward_dq_tiled   float, half, bfloat16
//   attention_generic.cu    forward_generic, backward_generic   double
//   attention_jvp.cu        jvp_generic         all four dtypes
//   attention_fwd_tc_hd{64,128}_{f16,bf16}.cu   forward_tc        half, bfloat16 (tensor cores)
//   attention_bwd_tc_hd{64,128}_{f16,bf16}.cu   backward_tc       half, bfloat16 (tensor cores)
//
// Every kernel takes the band, the tensor mask and grouped-query attention of params.h. All launch on `stream` and return without synchronising.
#pragma once

#include "params.h"

namespace selfattn::cuda {

// Tiled kernels (float32 accumulation); head dims up to 256.
template <typename T>
void forward_tiled(const ForwardParams<T>& p, cudaStream_t stream);
template <typename T>
void backward_dkdv_tiled(const BackwardParams<T>& p, cudaStream_t stream);
template <typename T>
void backward_dq_tiled(const BackwardParams<T>& p, cudaStream_t stream);

// p.delta = rowsum(grad_out ∘ out), which both backward kernels read.
template <typename T>
void launch_delta(const BackwardParams<T>& p, cudaStream_t stream);

// Tensor-core kernels (sm_80+, mma.sync): T = c10::Half or c10::BFloat16, D = Dv = kDim = 64 or
// 128, every tensor with unit stride along D, its other strides multiples of 8 elements and a
// 16-byte aligned base; scale > 0; the band, the tensor mask (any strides) and grouped-query
// attention.
// backward_tc computes delta itself (no launch_delta).
template <typename T, int kDim>
void forward_tc(const ForwardParams<T>& p, cudaStream_t stream);
template <typename T, int kDim>
void backward_tc(const BackwardParams<T>& p, cudaStream_t stream);

// A warp per row, for float64; head dims up to 256.
template <typename T>
void forward_generic(const ForwardParams<T>& p, cudaStream_t stream);
template <typename T>
void backward_generic(const BackwardParams<T>& p, cudaStream_t stream);

// Forward-mode derivative, a warp per row (A = acc_t<T> accumulation); head dims up to 256. Every
// dtype and mask; the tensor-core and tiled kernels have no jvp of their own.
template <typename T>
void jvp_generic(const JvpParams<T>& p, cudaStream_t stream);

}  // namespace selfattn::cuda
