// Kernel arguments of the attention kernels: plain structs, shared by the .cu files (device
// code) and attention_cuda.cpp (which builds them from tensors), so no ATen header is needed
// to launch a kernel and none is parsed by nvcc.
#pragma once

#include "../mask.h"
#include "../philox.h"

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

// The tensor part of the mask (attention.h's AttentionMask::tensor): none, or a (B, Hq, Nq, Nk)
// view read through its strides (0 on broadcast dims). kBool: nonzero = take part (a false
// element adds -inf to the score); kAdditive: the element is added to the scaled score, stored
// as float32 (`float32`) or as the inputs' dtype T.
enum class MaskKind : int { kNone, kBool, kAdditive };

struct TensorMask {
  const void* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0, stride_k = 0;
  MaskKind kind = MaskKind::kNone;
  bool float32 = false;  // kAdditive: float elements (else T)

  SELFATTN_HOST_DEVICE bool present() const { return kind != MaskKind::kNone; }
};

// The fields every kernel reads. Sizes: q, out, lse, grad_out, grad_q, the tensor mask have
// `heads` (Hq) heads; k, v, grad_k, grad_v have `heads_kv` (Hk): query head h reads kv head
// h / group, group = Hq / Hk (grouped-query attention; 1 for plain multi-head attention).
// A query row sees key j iff band.visible(row, j) (mask.h) and the tensor mask allows it.
// With dropout, the probability of (row, j) is then multiplied by 1/(1 - p) or 0 (philox.h).
template <typename T>
struct SharedParams {
  Strided4<const T> q;  // (B, Hq, Nq, D)
  Strided4<const T> k;  // (B, Hk, Nk, D)
  Strided4<const T> v;  // (B, Hk, Nk, Dv)
  int64_t lse_stride_b, lse_stride_h, lse_stride_n;
  int heads, heads_kv, group, nq, nk, dim, dim_v;
  int64_t batch_heads;  // B * Hq
  int row_blocks;       // blocks of owned rows per (b, h), set by each kernel's launcher
  acc_t<T> scale;
  Band band;
  TensorMask mask;
  ScoreMods scores;  // mask.h: softcap, ALiBi slopes and sinks (device pointers), score_mods.cuh
  Dropout dropout;   // philox.h; rng_state a device pointer, read by the kernels
};

// Forward: out = softmax(scale * q kᵀ + mask) v and lse, the logsumexp of each row of the
// scaled, masked scores (-inf for a row that sees no key; its output is 0).
template <typename T>
struct ForwardParams : SharedParams<T> {
  Strided4<T> out;  // (B, Hq, Nq, Dv)
  acc_t<T>* lse;    // (B, Hq, Nq), natural log
};

// Backward from grad_out (dO), recomputing P from lse (P = 0 where lse = -inf).
template <typename T>
struct BackwardParams : SharedParams<T> {
  Strided4<const T> grad_out;  // (B, Hq, Nq, Dv)
  Strided4<const T> out;       // (B, Hq, Nq, Dv)
  Strided4<T> grad_q;          // (B, Hq, Nq, D)
  Strided4<T> grad_k, grad_v;  // (B, Hk, Nk, D / Dv)
  const acc_t<T>* lse;         // (B, Hq, Nq)
  acc_t<T>* delta;             // (B, Hq, Nq) contiguous: rowsum(dO ∘ out), written by the delta kernel
};

// Decoding forward (attention_decode.cu, flash-decoding): the R = group * Nq query rows of one
// (b, kv head) -- row r is query r % Nq of head hk * group + r / Nq -- against splits of the keys.
// Keys [k_begin, k_end) (the ones some query may see) are cut into k_tiles tiles of
// kDecodeKeys, and split s takes tiles [s * k_tiles / S, (s + 1) * k_tiles / S). With S > 1 each
// split leaves its rows (normalised) and their lse in part_out / part_lse, and a merge kernel
// combines them in split order; with S = 1 the split kernel writes out and lse itself.
template <typename T>
struct DecodeParams : ForwardParams<T> {
  int rows;        // R = group * Nq
  int row_chunks;  // blocks of kDecodeRows rows per (b, kv head)
  int splits;      // S
  int k_begin, k_end, k_tiles;
  int smem_stride;          // elements per row of a shared tile (a multiple of 4, = 4 mod 32)
  acc_t<T>* part_out;       // (B, Hk, S, R, Dv) contiguous, when S > 1
  acc_t<T>* part_lse;       // (B, Hk, S, R) contiguous, when S > 1
};

// Forward-mode derivative (attention_jvp): out and lse as the forward's, and tangent_out, the
// derivative of out along the tangents of q, k, v; an absent tangent (has_* false) is zero and its
// view is not read.
template <typename T>
struct JvpParams : ForwardParams<T> {
  Strided4<const T> tangent_q;  // (B, Hq, Nq, D)
  Strided4<const T> tangent_k;  // (B, Hk, Nk, D)
  Strided4<const T> tangent_v;  // (B, Hk, Nk, Dv)
  Strided4<T> tangent_out;      // (B, Hq, Nq, Dv)
  bool has_tangent_q, has_tangent_k, has_tangent_v;
};

}  // namespace selfattn::cuda
