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
//   attention_decode.cu     plan_decode, forward_decode   all four dtypes (split-K decoding)
//   attention_fwd_tc_hd{64,128}_{f16,bf16}.cu   forward_tc        half, bfloat16 (tensor cores)
//   attention_bwd_tc_hd{64,128}_{f16,bf16}.cu   backward_tc       half, bfloat16 (tensor cores)
//
// Every kernel takes the band, the tensor mask, the score modifications (softcap, ALiBi, sinks:
// score_mods.cuh) and grouped-query attention of params.h. All launch on `stream` and return
// without synchronising.
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

// Decoding (flash-decoding, split-K): few query rows per kv head against many keys. The
// forward's choice between this and the kernels above is attention_cuda.cpp's (use_decode).
constexpr int kDecodeKeys = 32;  // keys per tile; splits are whole tiles
constexpr int kDecodeRows = 16;  // query rows (of R = group * Nq) per block
constexpr int kDecodeMaxRows = 64;  // the decode path takes R <= this ...
constexpr int kDecodeMaxQueries = 16;  // ... and Nq <= this

// Fills p's rows, row_chunks, k_begin, k_end, k_tiles, smem_stride and splits: forced_splits if
// > 0, else enough blocks for about two per SM (sm_count), but at least kDecodeMinTiles tiles per
// split. p's shared fields (sizes, band) must be set.
constexpr int kDecodeMinTiles = 8;  // 256 keys: below that a split's fixed costs dominate
template <typename T>
void plan_decode(DecodeParams<T>& p, int batch, int sm_count, int64_t forced_splits);

// out and lse from p; p.part_out / p.part_lse hold B * Hk * S * R * Dv and B * Hk * S * R
// elements of acc_t<T> when p.splits > 1 (scratch, no initial value needed).
template <typename T>
void forward_decode(const DecodeParams<T>& p, cudaStream_t stream);

// Forward-mode derivative, a warp per row (A = acc_t<T> accumulation); head dims up to 256. Every
// dtype and mask; the tensor-core and tiled kernels have no jvp of their own.
template <typename T>
void jvp_generic(const JvpParams<T>& p, cudaStream_t stream);

}  // namespace selfattn::cuda
