// The small shared pieces of the CUDA kernels: loads and stores of 4-element chunks of strided
// tensors (one vector where the layout allows, element by element where it
// does not), warp reductions and the dynamic shared memory.
//
// Every header under csrc/cuda/ also compiles as plain C++ on the CPU when
// SELFATTN_CUDA_EMULATION is defined (tests/cuda_emulation/ runs the kernels there, a fiber per
// thread), so device code here keeps to what that emulation provides: threadIdx/blockIdx,
// __syncthreads, __syncwarp, __shfl_xor_sync, __any_sync, float2/float4, and the C math functions.
#pragma once

#include "params.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#ifndef SELFATTN_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

namespace selfattn::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;  // scores times log2(e): the softmax runs on exp2
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }
// x clipped to [lo, hi] (band positions are int64 and may lie far outside the sequence).
__host__ __device__ constexpr int clip(int64_t x, int lo, int hi) {
  return x < lo ? lo : x > hi ? hi : static_cast<int>(x);
}

// The tensor mask's term of score (b, h, i, j), in A: 0 or -inf for a bool mask, the element
// for an additive one. The caller keeps (i, j) inside (Nq, Nk).
template <typename T, typename A>
__device__ __forceinline__ A mask_bias(const TensorMask& m, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t at = b * m.stride_b + h * m.stride_h + i * m.stride_q + j * m.stride_k;
  if (m.kind == MaskKind::kBool) {
    return static_cast<const uint8_t*>(m.data)[at] != 0 ? A(0) : A(-INFINITY);
  }
  if (m.float32) {
    return static_cast<A>(static_cast<const float*>(m.data)[at]);
  }
  return static_cast<A>(static_cast<const T*>(m.data)[at]);
}

// Dropout (philox.h) in the kernels. DropoutKey holds, per thread, what every decision needs:
// the call's Philox key (derived from the (seed, offset) the kernel reads from device memory once),
// the threshold and the factor of a kept probability.
struct DropoutKey {
  PhiloxKey key;
  uint32_t threshold;
  float keep_scale;
  int64_t batch_offset;
  bool active;
};

__device__ __forceinline__ DropoutKey dropout_key(const Dropout& d) {
  if (!d.active()) {
    return {{0, 0}, 0, 1.f, 0, false};
  }
  return {d.key(), d.threshold, static_cast<float>(d.keep_scale), d.batch_offset, true};
}

// The factor of element (b, h, i, j)'s probability: keep_scale (kept) or 0 (dropped).
__device__ __forceinline__ float dropout_factor(const DropoutKey& d, int64_t b, int64_t h, int64_t i, int64_t j) {
  return dropout_keep(d.key, d.threshold, b + d.batch_offset, h, i, j) ? d.keep_scale : 0.f;
}

// The factors of keys j and j + 1 of row i (j even, so one Philox call decides both).
__device__ __forceinline__ float2 dropout_factor_pair(const DropoutKey& d, int64_t b, int64_t h, int64_t i, int64_t j) {
  const PhiloxWords w = philox_words(d.key, b + d.batch_offset, h, i, j);
  return make_float2(w.w[j & 3] >= d.threshold ? d.keep_scale : 0.f,
                     w.w[(j & 3) + 1] >= d.threshold ? d.keep_scale : 0.f);
}

// The lse the backward subtracts: a row that saw no key has lse -inf, and P = exp(s - lse)
// must be 0 for it, not exp(+inf): -inf becomes +inf, so every such P is exp(-inf) = 0.
template <typename A>
__device__ __forceinline__ A backward_lse(A lse) {
  return lse == -INFINITY ? A(INFINITY) : lse;
}

// In the CPU emulation, a misaligned vector access stops the test instead of being silently
// fine (on the GPU it is a misaligned-address fault).
#ifdef SELFATTN_CUDA_EMULATION
#define SELFATTN_CHECK_ALIGNED(ptr, bytes) ::emu::check_aligned((ptr), (bytes), __FILE__, __LINE__)
#else
#define SELFATTN_CHECK_ALIGNED(ptr, bytes) ((void)0)
#endif

// Four elements of T as one aligned vector (16 bytes of float, 8 bytes of half/bfloat16).
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

// Elements d0..d0+3 of a row as float; zeros at and past `dim`.
template <typename T>
__device__ __forceinline__ float4 load4(const T* row, int64_t stride_d, int d0, int dim, bool vec4) {
  if (vec4 && d0 + 4 <= dim) {
    SELFATTN_CHECK_ALIGNED(row + d0, sizeof(Pack4<T>));
    const Pack4<T> p = *reinterpret_cast<const Pack4<T>*>(row + d0);
    return make_float4(to_float(p.v[0]), to_float(p.v[1]), to_float(p.v[2]), to_float(p.v[3]));
  }
  float e[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    e[i] = d0 + i < dim ? to_float(row[(d0 + i) * stride_d]) : 0.f;
  }
  return make_float4(e[0], e[1], e[2], e[3]);
}

// Writes elements d0..d0+3 of a row (those below `dim`).
template <typename T>
__device__ __forceinline__ void store4(T* row, int64_t stride_d, int d0, int dim, bool vec4, float4 x) {
  if (vec4 && d0 + 4 <= dim) {
    Pack4<T> p;
    p.v[0] = from_float<T>(x.x);
    p.v[1] = from_float<T>(x.y);
    p.v[2] = from_float<T>(x.z);
    p.v[3] = from_float<T>(x.w);
    SELFATTN_CHECK_ALIGNED(row + d0, sizeof(Pack4<T>));
    *reinterpret_cast<Pack4<T>*>(row + d0) = p;
    return;
  }
  const float e[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (d0 + i < dim) {
      row[(d0 + i) * stride_d] = from_float<T>(e[i]);
    }
  }
}

// 16-byte shared-memory accesses (callers keep every such address 16-byte aligned).
__device__ __forceinline__ float4 lds4(const float* p) {
  SELFATTN_CHECK_ALIGNED(p, 16);
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ void sts4(float* p, float4 x) {
  SELFATTN_CHECK_ALIGNED(p, 16);
  *reinterpret_cast<float4*>(p) = x;
}

// ---------------------------------------------------------------------------------------------
// Reductions over groups of kWidth consecutive lanes (a power of two up to 32). A butterfly:
// every lane of the group ends with the same, bitwise identical value, in a fixed order.
template <int kWidth, typename A>
__device__ __forceinline__ A group_sum(A x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

template <int kWidth>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  }
  return x;
}

// The block's dynamic shared memory, 16-byte aligned.
__device__ __forceinline__ float* dynamic_smem() {
#ifdef SELFATTN_CUDA_EMULATION
  return ::emu::dynamic_smem();
#else
  extern __shared__ float4 selfattn_dynamic_smem[];
  return reinterpret_cast<float*>(selfattn_dynamic_smem);
#endif
}

}  // namespace selfattn::cuda
