// The bfloat16 tile GEMM: bf16 operands, float32 accumulation, on AVX512-BF16's vdpbf16ps
// (each instruction: 16 lanes += a[2i]·b[2i] + a[2i+1]·b[2i+1], products exact, sums in float32).
//
// The same shape as tile.h's gemm — A's elements broadcast, B's rows read as whole vectors — but
// the depth runs in pairs: A's element (i, pair p) is the two bf16 of depth 2p, 2p+1 side by side
// (one uint32), and B is VNNI-packed, row p holding depth 2p and 2p+1 of each column interleaved
// (column j at uint32 j). pack_vnni_* below build those layouts; an odd depth is padded with a
// zero.
//
// The functions carry their own target attribute, so this header compiles into a library built
// for plain AVX-512 (or AVX2) and runs only where has_avx512_bf16() says the CPU has the
// instructions; everything else keeps the float32 path of tile.h.
#pragma once

#include "tile.h"

#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace selfattn::SELFATTN_CPU_NS {

// The bf16 kernels are compiled into the AVX-512 build only (their tiles are 16 float32 wide).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kBf16KernelsCompiled = true;
#else
constexpr bool kBf16KernelsCompiled = false;
#endif

// Whether bfloat16 inputs run on the bf16 kernels: the CPU has AVX512-BF16 (asked once), and
// SELFATTN_BF16_KERNELS is not 0 (read at every call: tests and benchmarks compare both paths;
// 0 converts to float32 as float16 does).
inline bool bf16_kernels_enabled() {
  static const bool has_avx512_bf16 = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* setting = std::getenv("SELFATTN_BF16_KERNELS");
  return kBf16KernelsCompiled && has_avx512_bf16 && !(setting != nullptr && std::strcmp(setting, "0") == 0);
}

#define SELFATTN_TARGET_BF16 __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq")))

// Register blocking, picked by measurement on 64-row tiles (AMD EPYC Zen 5, one thread; see
// BENCHMARKS.md): 4 rows x 4 vectors of 16 float32 columns.
constexpr int kBf16TileRows = 4, kBf16TileVecs = 4;
constexpr int64_t kBf16VecWidth = 16;  // float32 columns per vector

// C[i, :] (+)= alpha * sum_p A[i, p] · B[p, :] for ROWS rows and VECS vectors of 16 columns.
//   A: the bf16 pair (i, p) at a + i * a_row + p * a_col (bf16 units: a_col = 2 when the depth
//      runs along A's rows, 2 * ld for the VNNI layout of A's transpose);
//   B: VNNI row p at b + p * ldb (uint32 units), VECS * 16 of them;
//   C: float32, row i at c + i * ldc. alpha scales the product (not what C held).
template <int ROWS, int VECS>
SELFATTN_TARGET_BF16 void micro_kernel_bf16(int64_t pairs, const uint16_t* a, int64_t a_row, int64_t a_col,
                                            const uint32_t* b, int64_t ldb, float* c, int64_t ldc, float alpha,
                                            bool accumulate) {
  __m512 acc[ROWS][VECS];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < VECS; ++j) {
      acc[i][j] = _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b_row[VECS];
#pragma GCC unroll 8
    for (int j = 0; j < VECS; ++j) {
      b_row[j] = (__m512bh)_mm512_loadu_si512(b + p * ldb + j * kBf16VecWidth);
    }
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      int32_t pair;  // memcpy: A's rows need only 2-byte alignment
      std::memcpy(&pair, a + i * a_row + p * a_col, sizeof(pair));
      const __m512bh a_pair = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
      for (int j = 0; j < VECS; ++j) {
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a_pair, b_row[j]);
      }
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < VECS; ++j) {
      float* out = c + i * ldc + j * kBf16VecWidth;
      const __m512 prior = accumulate ? _mm512_loadu_ps(out) : _mm512_setzero_ps();
      _mm512_storeu_ps(out, _mm512_fmadd_ps(acc[i][j], scale, prior));
    }
  }
}

using MicroKernelBf16 = void (*)(int64_t, const uint16_t*, int64_t, int64_t, const uint32_t*, int64_t, float*, int64_t,
                                 float, bool);

template <int ROWS, int... V>
constexpr std::array<MicroKernelBf16, sizeof...(V)> bf16_kernels_of_row(std::integer_sequence<int, V...>) {
  return {{&micro_kernel_bf16<ROWS, V + 1>...}};
}
template <int... R>
constexpr std::array<std::array<MicroKernelBf16, kBf16TileVecs>, sizeof...(R)> bf16_kernel_table(
    std::integer_sequence<int, R...>) {
  return {{bf16_kernels_of_row<R + 1>(std::make_integer_sequence<int, kBf16TileVecs>{})...}};
}
inline constexpr auto kMicroKernelsBf16 = bf16_kernel_table(std::make_integer_sequence<int, kBf16TileRows>{});

// C (m x n) (+)= alpha · A (m x 2·pairs) · B (2·pairs x n), layouts as in micro_kernel_bf16;
// n a multiple of 16.
inline void gemm_bf16(int64_t m, int64_t n, int64_t pairs, const uint16_t* a, int64_t a_row, int64_t a_col,
                      const uint32_t* b, int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  for (int64_t n0 = 0; n0 < n; n0 += kBf16TileVecs * kBf16VecWidth) {
    const int vecs = static_cast<int>(std::min<int64_t>(kBf16TileVecs, (n - n0) / kBf16VecWidth));
    for (int64_t m0 = 0; m0 < m; m0 += kBf16TileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kBf16TileRows, m - m0));
      kMicroKernelsBf16[rows - 1][vecs - 1](pairs, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc,
                                            alpha, accumulate);
    }
  }
}

// The band-cut variants of tile.h (gemm_keys_x_queries and friends), same skips; where the
// depth is cut, its ends widen to whole pairs (the pair's other half is a hidden pair, whose P or
// dS is 0, or the zero padding).
inline void gemm_bf16_keys_x_queries(MaskCut cut, int64_t m, int64_t n, int64_t pairs, const uint16_t* a, int64_t a_row,
                                     int64_t a_col, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                                     float alpha) {
  constexpr int64_t W = kBf16VecWidth;
  for (int64_t m0 = 0; m0 < m; m0 += kBf16TileRows) {
    const int64_t rows = std::min<int64_t>(kBf16TileRows, m - m0);
    const int64_t lo = std::clamp<int64_t>(cut.first + m0, 0, n) / W * W;
    const int64_t hi = round_up(std::clamp<int64_t>(cut.last + m0 + rows, 0, n), W);
    if (lo < hi) {
      gemm_bf16(rows, hi - lo, pairs, a + m0 * a_row, a_row, a_col, b + lo, ldb, c + m0 * ldc + lo, ldc, alpha,
                /*accumulate=*/false);
    }
  }
}

// Rows are queries, the depth (in pairs) runs over keys: each slab over the keys its queries see.
inline void gemm_bf16_queries_x_keys(MaskCut cut, int64_t m, int64_t n, int64_t depth, const uint16_t* a, int64_t a_row,
                                     int64_t a_col, const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < m; m0 += kBf16TileRows) {
    const int64_t rows = std::min<int64_t>(kBf16TileRows, m - m0);
    const int64_t first = std::clamp<int64_t>(m0 - cut.last, 0, depth) / 2;
    const int64_t end = ceil_div(std::clamp<int64_t>(m0 + rows - cut.first, 0, depth), 2);
    if (first < end) {
      gemm_bf16(rows, n, end - first, a + m0 * a_row + first * a_col, a_row, a_col, b + first * ldb, ldb, c + m0 * ldc,
                ldc, 1.0f, /*accumulate=*/true);
    }
  }
}

// Rows are keys, the depth (in pairs) runs over queries: each slab over the queries that see it.
inline void gemm_bf16_keys_x_queries_depth(MaskCut cut, int64_t m, int64_t n, int64_t depth, const uint16_t* a,
                                           int64_t a_row, int64_t a_col, const uint32_t* b, int64_t ldb, float* c,
                                           int64_t ldc) {
  for (int64_t m0 = 0; m0 < m; m0 += kBf16TileRows) {
    const int64_t rows = std::min<int64_t>(kBf16TileRows, m - m0);
    const int64_t first = std::clamp<int64_t>(cut.first + m0, 0, depth) / 2;
    const int64_t end = ceil_div(std::clamp<int64_t>(cut.last + m0 + rows, 0, depth), 2);
    if (first < end) {
      gemm_bf16(rows, n, end - first, a + m0 * a_row + first * a_col, a_row, a_col, b + first * ldb, ldb, c + m0 * ldc,
                ldc, 1.0f, /*accumulate=*/true);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Operand packing. bf16 bits are a float32's high half, rounded to nearest even (as c10::BFloat16
// and vcvtneps2bf16 round). Sources are (B, H, N, D) bf16 tensors (Strided4) or float32 tiles.

using Bf16View = Strided4<const c10::BFloat16>;

inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// An A operand whose depth runs along its rows: pair (j, p) at data + j * row_stride + 2 * p.
struct PairRows {
  const uint16_t* data;
  int64_t row_stride;
};

// Rows n0 .. n0 + rows - 1 of src (b, h) as a PairRows: in place when a row is contiguous and
// of even length (and, for brgemm's lda, rows do not overlap: no stride-0 broadcast), else copied
// into scratch (rows x round_up(dim, 2)) with a zero pad.
inline PairRows pair_rows(const Bf16View& src, int64_t b, int64_t h, int64_t n0, int64_t rows, int64_t dim,
                          uint16_t* scratch, bool disjoint_rows = false) {
  if (src.stride_d == 1 && dim % 2 == 0 && (!disjoint_rows || src.stride_n >= dim)) {
    return {reinterpret_cast<const uint16_t*>(src.row(b, h, n0)), src.stride_n};
  }
  const int64_t even = round_up(dim, 2);
  for (int64_t j = 0; j < rows; ++j) {
    const c10::BFloat16* row = src.row(b, h, n0 + j);
    for (int64_t d = 0; d < dim; ++d) {
      scratch[j * even + d] = row[d * src.stride_d].x;
    }
    std::fill(scratch + j * even + dim, scratch + (j + 1) * even, uint16_t(0));
  }
  return {scratch, even};
}

// A B operand whose depth is the head dim: dst[p * ld + i] = the pair (2p, 2p + 1) of row n0 + i,
// for i < rows; columns rows .. ld - 1 are zero. (Queries and dO as the columns of a score tile.)
inline void vnni_over_dim(const Bf16View& src, int64_t b, int64_t h, int64_t n0, int64_t rows, int64_t dim,
                          uint32_t* dst, int64_t ld) {
  const int64_t pairs = ceil_div(dim, 2);
  for (int64_t p = 0; p < pairs; ++p) {
    std::fill(dst + p * ld + rows, dst + (p + 1) * ld, 0u);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const c10::BFloat16* row = src.row(b, h, n0 + i);
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t hi = 2 * p + 1 < dim ? row[(2 * p + 1) * src.stride_d].x : 0;
      dst[p * ld + i] = bf16_pair(row[2 * p * src.stride_d].x, hi);
    }
  }
}

// A B operand whose depth runs over rows: dst[p * width + d] = (row n0 + 2p, row n0 + 2p + 1)[d]
// for d < dim, zero up to width; an odd last row pairs with zero. (v for P·V, k for dS·K, q and
// dO for the backward's dSᵀ·Q and Pᵀ·dO.)
SELFATTN_TARGET_BF16 inline void vnni_over_rows(const Bf16View& src, int64_t b, int64_t h, int64_t n0, int64_t rows,
                                                int64_t dim, int64_t width, uint32_t* dst) {
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const uint16_t* r0 = reinterpret_cast<const uint16_t*>(src.row(b, h, n0 + 2 * p));
    const uint16_t* r1 = 2 * p + 1 < rows ? reinterpret_cast<const uint16_t*>(src.row(b, h, n0 + 2 * p + 1)) : nullptr;
    uint32_t* out = dst + p * width;
    int64_t d = 0;
    if (src.stride_d == 1) {
      for (; d + 16 <= dim; d += 16) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + d)));
        const __m512i hi = r1 == nullptr
                               ? _mm512_setzero_si512()
                               : _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + d)));
        _mm512_storeu_si512(out + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    for (; d < dim; ++d) {
      out[d] = bf16_pair(r0[d * src.stride_d], r1 == nullptr ? uint16_t(0) : r1[d * src.stride_d]);
    }
    std::fill(out + dim, out + width, 0u);
  }
}

// Float32 tiles rounded to bf16. VNNI over rows: dst[p * n + j] = (src row 2p, row 2p + 1)[j] for
// rows < `rows` (an odd last row pairs with zero); n a multiple of 16. (P and dS read through their
// transpose: A operands of P·V and dS·K, a_row = 2, a_col = 2n.)
SELFATTN_TARGET_BF16 inline void round_vnni_over_rows(const float* src, int64_t ld, int64_t rows, int64_t n,
                                                      uint32_t* dst) {
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const float* r0 = src + 2 * p * ld;
    const float* r1 = 2 * p + 1 < rows ? r0 + ld : nullptr;
    for (int64_t j = 0; j < n; j += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + j)));
      const __m512i hi = r1 == nullptr ? _mm512_setzero_si512()
                                       : _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r1 + j)));
      _mm512_storeu_si512(dst + p * n + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// Row by row: dst[i * n + j] = bf16(src[i * ld + j]), n a multiple of 16. (P and dS as A operands
// whose depth runs along their rows: Pᵀ·dO, dSᵀ·Q.)
SELFATTN_TARGET_BF16 inline void round_rows(const float* src, int64_t ld, int64_t rows, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < n; j += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * n + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i * ld + j)));
    }
  }
}

}  // namespace selfattn::SELFATTN_CPU_NS
