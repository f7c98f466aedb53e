// The small shared pieces of the CPU kernels: a register-blocked tile GEMM, strided
// tensor access, aligned per-call scratch and vectorized row operations.
//
// Everything here is templated on T, the accumulation type (float, or double for
// float64 inputs). Vector width follows the CPU capability this copy is compiled for
// (CPU_CAPABILITY_AVX512 / CPU_CAPABILITY_AVX2 / neither; capability.h).
#pragma once

#include "capability.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

namespace selfattn::SELFATTN_CPU_NS {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr int64_t kVecWidth = Vec<T>::size();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------------------
// Work items handed out one at a time: each of the intra-op threads takes the next item when it
// finishes one. Items of unequal cost (causal, windows, padding, the lengths of a varlen batch) and
// a core slowed by another process then stay balanced, where at::parallel_for's fixed contiguous
// ranges would leave one thread waiting. Which thread runs an item never changes its result.
//
//   for_each_item(n, [&](ItemQueue& items) { ...per-thread scratch...;
//                                            for (int64_t item; items.next(item);) { ... } });
class ItemQueue {
 public:
  explicit ItemQueue(int64_t n) : n_(n) {}
  bool next(int64_t& item) {
    item = next_.fetch_add(1, std::memory_order_relaxed);
    return item < n_;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_;
};

template <typename Body>
void for_each_item(int64_t n, const Body& body) {
  ItemQueue items(n);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { body(items); });
}

// ---------------------------------------------------------------------------------------
// Register blocking of the micro-kernel: kTileRows rows of C times kTileVecs vectors of
// columns live in registers; rows*vecs accumulators + vecs loads of B + 1 broadcast of A must
// fit the register file (32 zmm with AVX-512, 16 ymm with AVX2). Picked by measurement on
// 64 x 64 x 64 tiles (single thread, AMD EPYC Zen 4): AVX-512 4x4 113 GFLOP/s (6x4: 103-108,
// its 4-row remainder on 64-row tiles costs); AVX2 4x3 98 (6x2: 91).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileRows = 4, kTileVecs = 4;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kTileRows = 4, kTileVecs = 3;
#else
constexpr int kTileRows = 4, kTileVecs = 1;
#endif

// C[i, :] (+)= sum_p A[i, p] * B[p, :] for ROWS rows and VECS vectors of columns.
//   A: element (i, p) at a[i * a_row + p * a_col], any strides (each element is broadcast alone,
//      so a transposed A costs nothing);
//   B: row p at b + p * ldb, VECS * width contiguous elements;
//   C: row i at c + i * ldc.
//
// Written as plain loops under `#pragma GCC unroll`: GCC then keeps acc[][] in registers.
// (The same loops through c10::ForcedUnroll lambdas left the accumulators on the stack,
// with a load and a store around every FMA.)
template <typename T, int ROWS, int VECS>
void micro_kernel(int64_t depth, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc,
                  bool accumulate) {
  constexpr int64_t W = kVecWidth<T>;
  Vec<T> acc[ROWS][VECS];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < VECS; ++j) {
      acc[i][j] = accumulate ? Vec<T>::loadu(c + i * ldc + j * W) : Vec<T>(T(0));
    }
  }
  for (int64_t p = 0; p < depth; ++p) {
    Vec<T> b_row[VECS];
#pragma GCC unroll 8
    for (int j = 0; j < VECS; ++j) {
      b_row[j] = Vec<T>::loadu(b + p * ldb + j * W);
    }
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const Vec<T> a_elem(a[i * a_row + p * a_col]);
#pragma GCC unroll 8
      for (int j = 0; j < VECS; ++j) {
        acc[i][j] = at::vec::fmadd(a_elem, b_row[j], acc[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < VECS; ++j) {
      acc[i][j].store(c + i * ldc + j * W);
    }
  }
}

template <typename T>
using MicroKernel = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, bool);

// kMicroKernels<T>[rows - 1][vecs - 1]: the micro-kernel for a rows x vecs block, so edge
// blocks run register-blocked too.
template <typename T, int ROWS, int... V>
constexpr std::array<MicroKernel<T>, sizeof...(V)> kernels_of_row(std::integer_sequence<int, V...>) {
  return {{&micro_kernel<T, ROWS, V + 1>...}};
}
template <typename T, int... R>
constexpr std::array<std::array<MicroKernel<T>, kTileVecs>, sizeof...(R)> kernel_table(
    std::integer_sequence<int, R...>) {
  return {{kernels_of_row<T, R + 1>(std::make_integer_sequence<int, kTileVecs>{})...}};
}
template <typename T>
inline constexpr auto kMicroKernels = kernel_table<T>(std::make_integer_sequence<int, kTileRows>{});

// C (m x n) (+)= A (m x depth) * B (depth x n), strides as in micro_kernel.
// n must be a multiple of the vector width (callers pad their buffers to it).
template <typename T>
void gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
          int64_t ldc, bool accumulate) {
  constexpr int64_t W = kVecWidth<T>;
  TORCH_INTERNAL_ASSERT(n % W == 0, "selfattn: gemm width ", n, " is not a multiple of ", W);
  for (int64_t n0 = 0; n0 < n; n0 += kTileVecs * W) {
    const int vecs = static_cast<int>(std::min<int64_t>(kTileVecs, (n - n0) / W));
    for (int64_t m0 = 0; m0 < m; m0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - m0));
      const MicroKernel<T> kernel = kMicroKernels<T>[rows - 1][vecs - 1];
      kernel(depth, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tiles that a band (mask.h) cuts: key row j (of the tile) is visible to query columns
// [first + j, last + j], where first = k0 - last_key(q0) and last = k0 - first_key(q0)
// (MaskCut below). Work on pairs nobody sees is skipped a slab of kTileRows rows at a time, which
// brings a tile cut by the causal diagonal close to half the cost of a full one, and a sliding
// window's far-edge tile likewise.
struct MaskCut {
  int64_t first, last;
};

// Rows are keys, columns queries (score tiles): a slab of keys covers the vectors of columns that
// hold a query seeing one of its keys. Columns outside are left unwritten (the caller masks them).
template <typename T>
void gemm_keys_x_queries(MaskCut cut, int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                         const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t W = kVecWidth<T>;
  for (int64_t m0 = 0; m0 < m; m0 += kTileRows) {
    const int64_t rows = std::min<int64_t>(kTileRows, m - m0);
    const int64_t lo = std::clamp<int64_t>(cut.first + m0, 0, n) / W * W;
    const int64_t hi = round_up(std::clamp<int64_t>(cut.last + m0 + rows, 0, n), W);
    if (lo < hi) {
      gemm(rows, hi - lo, depth, a + m0 * a_row, a_row, a_col, b + lo, ldb, c + m0 * ldc + lo, ldc, accumulate);
    }
  }
}

// Rows are queries, the depth runs over keys (P·V, dS·K): a slab of queries runs over the keys its
// queries see, from the first its first query sees to the last its last query sees.
template <typename T>
void gemm_queries_x_keys(MaskCut cut, int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                         const T* b, int64_t ldb, T* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < m; m0 += kTileRows) {
    const int64_t rows = std::min<int64_t>(kTileRows, m - m0);
    const int64_t first = std::clamp<int64_t>(m0 - cut.last, 0, depth);
    const int64_t end = std::clamp<int64_t>(m0 + rows - cut.first, 0, depth);
    if (first < end) {
      gemm(rows, n, end - first, a + m0 * a_row + first * a_col, a_row, a_col, b + first * ldb, ldb, c + m0 * ldc, ldc,
           /*accumulate=*/true);
    }
  }
}

// Rows are keys, the depth runs over queries (Pᵀ·dO, dSᵀ·Q): a slab of keys runs over the queries
// that see one of its keys.
template <typename T>
void gemm_keys_x_queries_depth(MaskCut cut, int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row,
                               int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < m; m0 += kTileRows) {
    const int64_t rows = std::min<int64_t>(kTileRows, m - m0);
    const int64_t first = std::clamp<int64_t>(cut.first + m0, 0, depth);
    const int64_t end = std::clamp<int64_t>(cut.last + m0 + rows, 0, depth);
    if (first < end) {
      gemm(rows, n, end - first, a + m0 * a_row + first * a_col, a_row, a_col, b + first * ldb, ldb, c + m0 * ldc, ldc,
           /*accumulate=*/true);
    }
  }
}

// ---------------------------------------------------------------------------------------
// A (B, H, N, D) tensor with any strides, seen through a raw pointer.
template <typename scalar_t>
struct Strided4 {
  scalar_t* data;
  int64_t stride_b, stride_h, stride_n, stride_d;

  explicit Strided4(const at::Tensor& t)
      : data(static_cast<scalar_t*>(t.data_ptr())),
        stride_b(t.stride(0)),
        stride_h(t.stride(1)),
        stride_n(t.stride(2)),
        stride_d(t.stride(3)) {}

  scalar_t* row(int64_t b, int64_t h, int64_t n) const { return data + b * stride_b + h * stride_h + n * stride_n; }
};

// Uninitialized, 64-byte aligned scratch owned by one thread for one call
// (never static: two Python threads may run the op at once).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t count) : ptr_(static_cast<T*>(c10::alloc_cpu(std::max<int64_t>(count, 1) * sizeof(T)))) {}
  ~Scratch() { c10::free_cpu(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_;
};

// Splits one scratch allocation into consecutive pieces, each rounded up to 64 bytes.
template <typename T>
class ScratchCarver {
 public:
  explicit ScratchCarver(T* base) : next_(base) {}
  T* take(int64_t count) {
    T* piece = next_;
    next_ += round_up(count, 64 / sizeof(T));
    return piece;
  }
  static int64_t padded(int64_t count) { return round_up(count, 64 / sizeof(T)); }

 private:
  T* next_;
};

// ---------------------------------------------------------------------------------------
// Operand preparation.

// Width of a row as the tile GEMM reads it: dim rounded up to the vector width.
inline int64_t gemm_width(int64_t dim, at::ScalarType acc_type) {
  const int64_t vec = acc_type == at::kDouble ? kVecWidth<double> : kVecWidth<float>;
  return round_up(std::max<int64_t>(dim, 1), vec);
}

// A block of rows of a (B, H, N, D) tensor as the tile GEMM reads it: element (j, d) at
// data[j * row_stride + d * col_stride].
template <typename T>
struct RowBlock {
  const T* data;
  int64_t row_stride, col_stride;
};

// bfloat16 or float16: the types at::vec::convert_to_float widens. Newer torch says the same with
// c10::is_reduced_floating_point_v; torch 2.6 has it only as std::is_reduced_floating_point_v, in
// a header (c10/util/BFloat16-math.h) that ATen's vec headers do not include.
template <typename T>
constexpr bool kIsReducedFloat = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// dst[0 .. n) = src[0 .. n) widened to T: bfloat16 and float16 a vector at a time (ATen's
// at::vec::convert widens them one element at a time, which took a third of a float16 forward).
template <typename scalar_t, typename T>
inline void widen_row(const scalar_t* src, T* dst, int64_t n) {
  if constexpr (kIsReducedFloat<scalar_t> && std::is_same_v<T, float>) {
    constexpr int64_t kStep = Vec<scalar_t>::size();  // two float vectors' worth
    int64_t d = 0;
    for (; d + kStep <= n; d += kStep) {
      const auto [low, high] = at::vec::convert_to_float<scalar_t>(Vec<scalar_t>::loadu(src + d));
      low.store(dst + d);
      high.store(dst + d + kStep / 2);
    }
    for (; d < n; ++d) {
      dst[d] = static_cast<T>(src[d]);
    }
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Hands out blocks of rows of `src` in T, read where they lie when they can be and converted
// into the caller's scratch when not — block by block, so that no converted copy of a whole
// tensor ever exists. As the GEMM's A operand (read element by element) any strides do, only
// the dtype must be T; as its B operand (read as whole vectors) a row must also be contiguous
// and `width` long (the head dim rounded up to the vector width; scratch rows are zero-padded).
template <typename scalar_t, typename T>
class BlockReader {
 public:
  BlockReader(const Strided4<const scalar_t>& src, int64_t dim, int64_t width, bool whole_rows)
      : src_(src),
        dim_(dim),
        width_(whole_rows ? width : dim),
        in_place_(std::is_same_v<scalar_t, T> && (!whole_rows || (src.stride_d == 1 && dim == width))) {}

  // Scratch a block of `rows` rows needs (none when read in place).
  int64_t scratch_size(int64_t rows) const { return in_place_ ? 0 : rows * width_; }

  RowBlock<T> read(int64_t b, int64_t h, int64_t n0, int64_t rows, T* scratch) const {
    if constexpr (std::is_same_v<scalar_t, T>) {
      if (in_place_) {
        return {src_.row(b, h, n0), src_.stride_n, src_.stride_d};
      }
    }
    for (int64_t j = 0; j < rows; ++j) {
      const scalar_t* row = src_.row(b, h, n0 + j);
      T* dst = scratch + j * width_;
      if (src_.stride_d == 1) {
        widen_row(row, dst, dim_);
      } else {
        for (int64_t d = 0; d < dim_; ++d) {
          dst[d] = static_cast<T>(row[d * src_.stride_d]);
        }
      }
      std::fill(dst + dim_, dst + width_, T(0));
    }
    return {scratch, width_, 1};
  }

 private:
  Strided4<const scalar_t> src_;
  int64_t dim_, width_;
  bool in_place_;
};

// dst (dim x ld), column i = rows n0 + i of src (b, h) times scale, for i < rows; the
// columns rows..ld-1 are zero (padding that the score GEMM computes on and nobody reads).
template <typename scalar_t, typename T>
void pack_columns(const Strided4<const scalar_t>& src, int64_t b, int64_t h, int64_t n0, int64_t rows, int64_t dim,
                  T scale, T* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = src.row(b, h, n0 + i);
    for (int64_t d = 0; d < dim; ++d) {
      dst[d * ld + i] = static_cast<T>(row[d * src.stride_d]) * scale;
    }
  }
  for (int64_t d = 0; d < dim; ++d) {
    std::fill(dst + d * ld + rows, dst + (d + 1) * ld, T(0));
  }
}

// ---------------------------------------------------------------------------------------
// Vector helpers on rows whose length is a multiple of the vector width.

template <typename T>
inline Vec<T> vec_exp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // ~1e-6 relative error, several times faster than exp()
  } else {
    return x.exp();
  }
}

// dst[d * stride] = src[d] for d < n, converted to scalar_t; vectorized when dst is contiguous.
template <typename T, typename scalar_t>
inline void store_row(const T* src, scalar_t* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    at::vec::convert(src, dst, n);
  } else {
    for (int64_t d = 0; d < n; ++d) {
      dst[d * stride] = static_cast<scalar_t>(src[d]);
    }
  }
}

template <typename T>
inline void fill(T* dst, int64_t n, T value) {
  std::fill(dst, dst + n, value);
}

}  // namespace selfattn::SELFATTN_CPU_NS
