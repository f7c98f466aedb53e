// The bfloat16 tile GEMMs through oneDNN's brgemm (ATen's at::native::cpublas::brgemm), the way
// to AMX: on a CPU with AMX-BF16 oneDNN runs them on the tile unit (and asks Linux for the tile
// state itself), elsewhere on its own AVX512-BF16 code, which is how this path is tested on a CPU
// without AMX (SELFATTN_BF16_GEMM=brgemm).
//
// brgemm's layouts differ from micro_kernel_bf16's (tile_bf16.h) in two ways:
//   - A is row-major, the depth contiguous: P and dS, held transposed by the kernels, are
//     transposed while they are rounded (round_transposed);
//   - B is VNNI-packed as before, but a packed B for AMX ("pack32") is at most 64 columns wide:
//     its row stride must be 16, 32, 48 or 64. Wider operands (v, k, q, dO over a head dim of
//     128) are packed as column blocks of 64 (vnni_over_rows_blocked), one brgemm call per block.
// Both layouts are plain VNNI, so the same operands serve oneDNN's AVX512-BF16 kernels and its
// AMX kernels.
#pragma once

#include "tile_bf16.h"
#include "transposed_block.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace selfattn::SELFATTN_CPU_NS {

constexpr int64_t kPackedWidth = 64;  // the widest VNNI block an AMX brgemm reads

// ATen declares its bf16 brgemm with this macro (torch ≥ 2.6); an older torch builds without it.
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
constexpr bool kBrgemmCompiled = true;
#else
constexpr bool kBrgemmCompiled = false;
#endif

// The CPU has AMX-BF16, and ATen's oneDNN the ukernel API to drive it (cpublas::could_pack).
inline bool cpu_has_amx_bf16() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  static const bool has_amx_bf16 = at::native::cpublas::could_pack(at::kBFloat16);
  return has_amx_bf16;
#else
  return false;
#endif
}

// C (m x n, row stride ldc) (+)= A (m x k, row-major, row stride lda) · B (VNNI: k/2 rows of
// ldb pairs, n ≤ ldb ∈ {16, 32, 48, 64}); k even.
inline void brgemm_bf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                        float* c, int64_t ldc, bool accumulate) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(b), c, /*is_vnni=*/true);
#endif
}

// Ends this thread's brgemm use (on AMX: releases its tile configuration).
inline void brgemm_bf16_release() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm_release();
#endif
}

// Empty if oneDNN can build a bf16 brgemm kernel here, else why not (asked once, on a tiny
// product): oneDNN cannot where ONEDNN_MAX_CPU_ISA caps it below AVX512-BF16, say, and an older
// torch has no bf16 brgemm at all.
inline const std::string& brgemm_bf16_failure() {
  static const std::string failure = []() -> std::string {
    if (!kBrgemmCompiled) {
      return "this build's torch has no bf16 brgemm (torch >= 2.6 has)";
    }
    try {
      const uint16_t a[2] = {0, 0};
      const uint32_t b[16] = {};
      float c[16];
      brgemm_bf16(1, 16, 2, a, 2, b, 16, c, 16, /*accumulate=*/false);
      brgemm_bf16_release();
      return "";
    } catch (const std::exception& e) {
      return std::string("oneDNN: ") + e.what();
    }
  }();
  return failure;
}

// Whether the bf16 tile GEMMs (where the bf16 kernels run at all) go through brgemm: by default
// where the CPU has AMX-BF16 (cpublas::could_pack) and oneDNN can build the kernel;
// SELFATTN_BF16_GEMM=brgemm or =avx512bf16 chooses (read at every call: tests run both).
inline bool bf16_gemm_uses_brgemm() {
  const char* setting = std::getenv("SELFATTN_BF16_GEMM");
  if (setting == nullptr || *setting == '\0') {
    return cpu_has_amx_bf16() && brgemm_bf16_failure().empty();
  }
  TORCH_CHECK(std::strcmp(setting, "brgemm") == 0 || std::strcmp(setting, "avx512bf16") == 0,
              "SELFATTN_BF16_GEMM: expected 'brgemm' or 'avx512bf16' (or unset), got '", setting, "'");
  if (std::strcmp(setting, "avx512bf16") == 0) {
    return false;
  }
  TORCH_CHECK(brgemm_bf16_failure().empty(), "SELFATTN_BF16_GEMM=brgemm: no bf16 brgemm can run here (",
              brgemm_bf16_failure(), "); unset it to use selfattn's own bf16 kernels");
  return true;
}

// The same product for a B packed in 64-wide column blocks (vnni_over_rows_blocked): block j
// holds columns 64j .. at b + j · 64 · pairs_stride, its rows 64 (or the last block's width) apart;
// the depth starts at its pair first_pair.
inline void brgemm_bf16_blocked(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint32_t* b,
                                int64_t pairs_stride, float* c, int64_t ldc, bool accumulate, int64_t first_pair = 0) {
  for (int64_t n0 = 0; n0 < n; n0 += kPackedWidth) {
    const int64_t width = std::min(kPackedWidth, n - n0);
    brgemm_bf16(m, width, k, a, lda, b + n0 * pairs_stride + first_pair * width, width, c + n0, ldc, accumulate);
  }
}

// vnni_over_rows in column blocks: rows n0 .. n0 + rows - 1 of src as round_up(rows, 2) / 2 pairs,
// columns 0 .. width - 1 (width a multiple of 16; past dim, zero) cut into 64-wide blocks, block j
// at dst + j · 64 · pairs_stride with its own row stride (its width). pairs_stride ≥ the pairs.
SELFATTN_TARGET_BF16 inline void vnni_over_rows_blocked(const Bf16View& src, int64_t b, int64_t h, int64_t n0,
                                                        int64_t rows, int64_t dim, int64_t width, int64_t pairs_stride,
                                                        uint32_t* dst) {
  for (int64_t c0 = 0; c0 < width; c0 += kPackedWidth) {
    Bf16View columns = src;
    columns.data += c0 * src.stride_d;
    const int64_t block_width = std::min(kPackedWidth, width - c0);
    vnni_over_rows(columns, b, h, n0, rows, std::min(block_width, dim - c0), block_width, dst + c0 * pairs_stride);
  }
}

// dst (cols x ld_dst, bf16) = src (rows x cols, float32, row stride ld) transposed and rounded,
// cols a multiple of 16; each dst row's entries rows .. round_up(rows, 16) - 1 are zero (the
// depth brgemm reads is rows rounded up to even).
SELFATTN_TARGET_BF16 inline void round_transposed(const float* src, int64_t ld, int64_t rows, int64_t cols,
                                                  uint16_t* dst, int64_t ld_dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t count = std::min<int64_t>(16, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512 block[16];
      for (int64_t i = 0; i < 16; ++i) {
        block[i] = i < count ? _mm512_loadu_ps(src + (r0 + i) * ld + c0) : _mm512_setzero_ps();
      }
      transpose16x16(block);
      for (int64_t i = 0; i < 16; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c0 + i) * ld_dst + r0),
                            (__m256i)_mm512_cvtneps_pbh(block[i]));
      }
    }
  }
}

// x[i · ld + j] *= factor for i < rows, j < cols (a multiple of 16): brgemm has no alpha.
SELFATTN_TARGET_BF16 inline void scale_tile(float* x, int64_t ld, int64_t rows, int64_t cols, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; j += 16) {
      _mm512_storeu_ps(x + i * ld + j, _mm512_mul_ps(_mm512_loadu_ps(x + i * ld + j), f));
    }
  }
}

}  // namespace selfattn::SELFATTN_CPU_NS
