// Tensor-core building blocks of the fp16/bf16 kernels (attention_fwd_tc.cuh,
// attention_bwd_tc.cuh): the PTX instructions mma.sync m16n8k16, ldmatrix, cp.async and
// ex2.approx as inline assembly, and the swizzled shared-memory tiles they read and write.
//
// Under SELFATTN_CUDA_EMULATION every instruction here becomes a call into
// tests/cuda_emulation/emulation.h, which implements the PTX ISA's documented semantics on the
// CPU (fragment layouts exchanged across the warp's threads, zero fill, completion of cp.async
// groups only at wait_group). The layouts this file *assumes* are written down next to each
// helper; the emulation derives its own from the PTX ISA, so a wrong assumption here fails the
// emulation tests instead of agreeing with itself.
//
// Fragment layouts used below (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"; g = lane / 4, t = lane % 4; a 32-bit register holds two 16-bit elements, the first in
// its low half):
//   A (16 x 16, row major)  a[0]: (g, 2t..2t+1)   a[1]: (g+8, 2t..)   a[2]: (g, 2t+8..)   a[3]: (g+8, 2t+8..)
//   B (16 x 8, "col")       b[0]: (k = 2t..2t+1, n = g)                b[1]: (k = 2t+8.., n = g)
//   C, D (16 x 8, float)    c[0], c[1]: (g, 2t), (g, 2t+1)             c[2], c[3]: (g+8, 2t), (g+8, 2t+1)
// ldmatrix .x4: lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m; register m of lane l
// holds row l/4, elements 2(l%4) and 2(l%4)+1 of matrix m (.trans: column l/4, rows 2(l%4) and
// 2(l%4)+1 of the matrix as stored).
#pragma once

#include "common.cuh"

#include <cstdint>

#ifndef SELFATTN_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace selfattn::cuda {

// The tensor-core kernels need sm_80 (bf16 mma, cp.async); older archs compile a stub.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800 || defined(SELFATTN_CUDA_EMULATION)
#define SELFATTN_TC_ARCH 1
#else
#define SELFATTN_TC_ARCH 0
#endif

template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<c10::BFloat16> {
  static constexpr bool value = true;
};

// 16 bytes as one aligned vector (a row chunk of eight 16-bit elements).
struct alignas(16) Chunk16 {
  uint32_t w[4];
};

// Two floats as one register of two 16-bit elements, `lo` in the low half, rounded to nearest.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#ifdef SELFATTN_CUDA_EMULATION
  const T l(lo), h(hi);
  return static_cast<uint32_t>(l.x) | (static_cast<uint32_t>(h.x) << 16);
#else
  uint32_t r;
  if constexpr (IsBf16<T>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&v);
  }
  return r;
#endif
}

// The two 16-bit elements of a register as floats.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x) {
  T lo, hi;
  lo.x = static_cast<uint16_t>(x & 0xffffu);
  hi.x = static_cast<uint16_t>(x >> 16);
  return make_float2(static_cast<float>(lo), static_cast<float>(hi));
}

// d += a * b on the tensor cores: A 16 x 16 (T), B 16 x 8 (T), D 16 x 8 (float).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t* b) {
#ifdef SELFATTN_CUDA_EMULATION
  ::emu::mma_m16n8k16(IsBf16<T>::value, d, a, b);
#elif SELFATTN_TC_ARCH
  if constexpr (IsBf16<T>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

#ifdef SELFATTN_CUDA_EMULATION
using SmemAddr = const char*;  // a shared-memory address as ldmatrix takes it
__device__ __forceinline__ SmemAddr smem_addr(const void* p) { return static_cast<const char*>(p); }
#else
using SmemAddr = uint32_t;
__device__ __forceinline__ SmemAddr smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Four 8 x 8 matrices of 16-bit elements from shared memory (see the layout at the top); `row`
// is this lane's row address, 16-byte aligned.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], SmemAddr row) {
#ifdef SELFATTN_CUDA_EMULATION
  ::emu::ldmatrix_x4(kTrans, r, row);
#elif SELFATTN_TC_ARCH
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
  }
#endif
}

// Asynchronous copy of 16 bytes from global to shared memory, bypassing L1 (cp.async.cg); when
// !valid nothing is read and the 16 bytes are zero-filled (src-size 0).
__device__ __forceinline__ void cp_async_16(SmemAddr dst, const void* src, bool valid) {
#ifdef SELFATTN_CUDA_EMULATION
  ::emu::cp_async(const_cast<char*>(dst), src, 16, valid ? 16 : 0);
#elif SELFATTN_TC_ARCH
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
#endif
}

// The same for 4 bytes (one float; cp.async.ca, the only variant for sizes below 16).
__device__ __forceinline__ void cp_async_4(SmemAddr dst, const void* src, bool valid) {
#ifdef SELFATTN_CUDA_EMULATION
  ::emu::cp_async(const_cast<char*>(dst), src, 4, valid ? 4 : 0);
#elif SELFATTN_TC_ARCH
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef SELFATTN_CUDA_EMULATION
  ::emu::cp_async_commit();
#elif SELFATTN_TC_ARCH
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight. Other
// threads see the data after a barrier that follows the wait.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef SELFATTN_CUDA_EMULATION
  ::emu::cp_async_wait(kPending);
#elif SELFATTN_TC_ARCH
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
#endif
}

// 2^x, one MUFU.EX2 (relative error about 2^-22; denormal results flush to zero, which is what
// a probability below 2^-126 deserves).
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef SELFATTN_CUDA_EMULATION
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// ---------------------------------------------------------------------------------------------
// Swizzled tiles: kRows x kDim 16-bit elements, row-major, rows of kDim * 2 bytes, each row split
// into 16-byte chunks (8 elements) and chunk c of row r stored at chunk c ^ (r % 8) of that row.
// ldmatrix reads one chunk from each of 8 consecutive rows per 8 x 8 matrix: after the XOR those
// are 8 different chunks of a 128-byte span, so all 32 banks once, conflict-free; cp.async writes
// whole rows from consecutive threads, also conflict-free. (kDim = 64 or 128: a row is one or two
// 128-byte spans, and XOR with r % 8 never leaves its span.) The tile's base is 128-byte aligned.
template <int kDim>
struct Swizzle {
  static_assert(kDim == 64 || kDim == 128, "swizzled tiles hold rows of 64 or 128 elements");
  static constexpr int kChunks = kDim / 8;
  static constexpr int kRowBytes = kDim * 2;

  __device__ __forceinline__ static int offset(int row, int chunk) {
    return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
  }
};

// Copies rows row0 .. row0 + kRows - 1 of a (N, kDim) matrix (row stride `stride`, unit column
// stride, 16-byte aligned rows) into a swizzled tile with cp.async; rows at or past `nrows` are
// zero-filled. All kThreads threads of the block take part; the caller commits the group.
// Thread i copies chunk i % kChunks of rows i / kChunks + k * kRowStep: as kRowStep is a
// multiple of 8, its chunk's swizzled position is the same in every row it copies, and its
// shared addresses are one base plus constants.
template <int kRows, int kDim, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(char* tile, const T* src, int64_t stride, int row0, int nrows) {
  using S = Swizzle<kDim>;
  constexpr int kRowStep = kThreads / S::kChunks;
  static_assert(kThreads % S::kChunks == 0 && kRowStep % 8 == 0 && kRows % kRowStep == 0,
                "every thread copies the same chunk of kRows / kRowStep rows");
  const int r = static_cast<int>(threadIdx.x) / S::kChunks, c = static_cast<int>(threadIdx.x) % S::kChunks;
  SmemAddr dst = smem_addr(tile + S::offset(r, c));
#ifndef SELFATTN_CUDA_EMULATION
  asm volatile("" : "+r"(dst));  // keep dst + constant next to each copy (see FragOffsets)
#endif
  // Walked by one 64-bit add per row (the compiler would otherwise multiply per row); rows past
  // nrows read nothing (src-size 0) but still get an address inside the tensor.
  const int64_t step = kRowStep * stride;
  const T* from = src + (row0 + r) * stride + c * 8;
  int row = row0 + r;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const bool valid = row < nrows;
    cp_async_16(dst + i * kRowStep * S::kRowBytes, valid ? from : src, valid);
    from += step;
    row += kRowStep;
  }
}

// ldmatrix addresses. Each lane gives one row address per x4 load: row r0 + lane_row of the tile
// (r0 a multiple of 16) at chunk 2 s + lane_hi, where (lane_row, lane_hi) depend on the fragment
// kind only:
//   A, rows r0.. x columns 16 s..      matrices rows 0-7 / 8-15 of columns 0-7, then 8-15
//                                      -> a[0], a[1], a[2], a[3]              lane_row = lane % 16, lane_hi = lane / 16
//   B from a tile of B's columns (B = tileᵀ: keys for q kᵀ), rows r0.. as n, columns 16 s.. as k
//                                      -> b[0..1] n-tile rows 0-7, b[2..3] rows 8-15
//                                                                             lane_row = lane % 8 + 8 (lane / 16), lane_hi = lane / 8 % 2
//   B from a tile of B's rows (B = tile: values for P v), rows r0.. as k, columns 16 s.. as n,
//     with ldmatrix.trans              -> b[0..1] columns 16s..16s+7, b[2..3] 16s+8..16s+15
//                                                                             lane_row = lane % 8 + 8 (lane / 8 % 2), lane_hi = lane / 16
// Since r0 % 8 = 0 the swizzle XOR sees lane_row % 8 only, and it changes only the low 3 bits of
// the chunk, so the offset is one of four per-lane values (by s % 4) plus r0 * row bytes +
// 128 (s / 4): a constant once loops are unrolled. The kernels compute the four values once and
// re-launder them every tile (`refresh`), so that the compiler folds the constants into the
// ldmatrix instructions instead of keeping every address of the unrolled loops in a register.
template <int kDim>
struct FragOffsets {
  int v[4];

  __device__ __forceinline__ FragOffsets(int lane_row, int lane_hi) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[j] = lane_row * Swizzle<kDim>::kRowBytes + (((2 * j + lane_hi) ^ (lane_row & 7)) << 4);
    }
  }

  // Byte offset of this lane's row for the fragment at rows r0.. and chunk pair s.
  __device__ __forceinline__ int operator()(int r0, int s) const {
    return v[s & 3] + r0 * Swizzle<kDim>::kRowBytes + (s >> 2) * 128;
  }

  // Makes the values opaque to the compiler (no code): addresses derived from them are then
  // computed where they are used, not hoisted out of the tile loop into registers.
  __device__ __forceinline__ void refresh() {
#ifndef SELFATTN_CUDA_EMULATION
    asm volatile("" : "+r"(v[0]), "+r"(v[1]), "+r"(v[2]), "+r"(v[3]));
#endif
  }
};

template <int kDim>
__device__ __forceinline__ FragOffsets<kDim> a_offsets(int lane) {
  return FragOffsets<kDim>(lane & 15, lane >> 4);
}
template <int kDim>
__device__ __forceinline__ FragOffsets<kDim> b_offsets(int lane) {
  return FragOffsets<kDim>((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
}
template <int kDim>
__device__ __forceinline__ FragOffsets<kDim> bt_offsets(int lane) {
  return FragOffsets<kDim>((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
}

// A fragment of P = C-layout accumulators of two consecutive n-tiles (16 columns), rounded to T:
// the accumulator of rows (g, g+8) and columns (2t, 2t+1) of n-tile j is exactly the A element
// pair of k-step j / 2 (PTX layouts above), so no data moves between lanes.
template <typename T>
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// Stores C-layout accumulators of n-tiles 0 .. kNTiles-1 (rows r0 + g and r0 + g + 8 of a
// swizzled tile, columns 8j + 2t, +1) times `factor[0]` (row g) and `factor[1]` (row g+8), as T.
// A quad's four 4-byte stores fill one 16-byte chunk; the 8 rows land in 8 different chunk
// positions: conflict-free.
template <typename T, int kDim, int kNTiles>
__device__ __forceinline__ void store_accumulators(char* tile, int r0, const float (&acc)[kNTiles][4],
                                                   const float (&factor)[2], int lane) {
  using S = Swizzle<kDim>;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      char* at = tile + S::offset(r0 + g + 8 * half, j) + 4 * t;
      SELFATTN_CHECK_ALIGNED(at, 4);
      *reinterpret_cast<uint32_t*>(at) = pack2<T>(acc[j][2 * half] * factor[half], acc[j][2 * half + 1] * factor[half]);
    }
  }
}

// Copies rows r0 .. r0 + kRows - 1 of a swizzled tile to rows row0 + r0 .. of a (N, kDim)
// matrix (16-byte aligned rows), those below `nrows`, with 16-byte stores by the 32 lanes of a
// warp (consecutive lanes, consecutive chunks of a row: coalesced).
template <int kRows, int kDim, typename T>
__device__ __forceinline__ void store_rows(T* dst, int64_t stride, int row0, int nrows, const char* tile, int r0,
                                           int lane) {
  using S = Swizzle<kDim>;
  constexpr int kCount = kRows * S::kChunks;
  static_assert(kCount % 32 == 0, "whole warps");
#pragma unroll
  for (int i = 0; i < kCount / 32; ++i) {
    const int idx = lane + 32 * i;
    const int r = r0 + idx / S::kChunks, c = idx % S::kChunks;
    if (row0 + r < nrows) {
      const char* from = tile + S::offset(r, c);
      T* to = dst + (row0 + r) * stride + c * 8;
      SELFATTN_CHECK_ALIGNED(from, 16);
      SELFATTN_CHECK_ALIGNED(to, 16);
      *reinterpret_cast<Chunk16*>(to) = *reinterpret_cast<const Chunk16*>(from);
    }
  }
}

}  // namespace selfattn::cuda
