// A block of key rows read transposed, for the decode path's score GEMM (attention_decode.cpp).
//
// With few query rows (R = group · Nq ≤ a handful) the score tile is computed as Sᵀ = Q · Kᵀ:
// the R query rows are the GEMM's A operand (broadcast element by element) and the keys run along
// the vector lanes, so no lane is padding and every k element is used by one FMA per query row.
// The GEMM's B operand must then be Kᵀ (D x keys): this reads a block of k rows (any dtype,
// converted to T on the way) into that layout. Each score is still the FMA chain over d = 0..D-1
// of k[j][d] · q[r][d] from 0, as the tiled kernels and the backward compute it, so the scores are
// bitwise those of the backward's recomputation.
#pragma once

#include "tile.h"

#include <immintrin.h>

namespace selfattn::SELFATTN_CPU_NS {

#if defined(CPU_CAPABILITY_AVX512)
// Row d0 + dd (dd < 16) of one 16-key column strip of Kᵀ, loaded from 16 (or fewer) key rows.
// Loads up to `count` elements of a row at `src`, converted to float; the rest are 0.
template <typename scalar_t>
inline __m512 load_as_float(const scalar_t* src, int64_t count) {
  const __mmask16 mask = count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(mask, src);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i bits = _mm256_maskz_loadu_epi16(mask, src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src));
  }
}

#endif

#if defined(CPU_CAPABILITY_AVX2)
// The AVX2 copy's counterpart: up to `count` (<= 8) elements of a row as floats, the rest 0.
template <typename scalar_t>
inline __m256 load_as_float8(const scalar_t* src, int64_t count) {
  if (count < 8) {  // a strip's last columns: through a zeroed buffer (AVX2 has no masked 16-bit loads)
    alignas(32) float lanes[8] = {};
    for (int64_t i = 0; i < count; ++i) {
      lanes[i] = static_cast<float>(src[i]);
    }
    return _mm256_load_ps(lanes);
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(src);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
}

// r[0..7] (rows) -> r[0..7] (columns): r[c][i] becomes r[i][c].
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {  // within 128-bit lanes: pairs of rows interleaved
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // lane L of r[4i + c]: column 4L + c of rows 4i..4i+3
    const __m256d a = _mm256_castps_pd(t[4 * i]), b = _mm256_castps_pd(t[4 * i + 1]);
    const __m256d c = _mm256_castps_pd(t[4 * i + 2]), d = _mm256_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // the 128-bit lanes gathered: column c from the low lanes, 4 + c from the high
    const __m256 top = r[c], bottom = r[4 + c];
    r[c] = _mm256_permute2f128_ps(top, bottom, 0x20);
    r[4 + c] = _mm256_permute2f128_ps(top, bottom, 0x31);
  }
}
#endif

// r[0..15] (rows) -> r[0..15] (columns): r[c][i] becomes r[i][c]. Its own target attribute: the
// bf16 kernels (brgemm_bf16.h) call it from a library copy built without AVX-512 flags too.
__attribute__((target("avx512f"))) inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // within 128-bit lanes: pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: column 4L + c of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // gather the 128-bit lanes: column 4L + c of all 16 rows
    const __m512 even_ab = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88),
                 odd_ab = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    const __m512 even_cd = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 odd_cd = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_f32x4(even_ab, even_cd, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(even_ab, even_cd, 0xdd);
    t[4 + c] = _mm512_shuffle_f32x4(odd_ab, odd_cd, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(odd_ab, odd_cd, 0xdd);
  }
  for (int i = 0; i < 16; ++i) {
    r[i] = t[i];
  }
}

// Asks for rows [n0, n0 + rows) of (b, h) to be brought into L2 (contiguous rows only): the next
// block's k and v, so that their loads are in flight while this block is computed on. (Into L2, not
// L1: a block of k and v in float32 is 64 KiB, more than L1 holds beside the working tiles.)
template <typename scalar_t>
inline void prefetch_rows(const Strided4<const scalar_t>& src, int64_t b, int64_t h, int64_t n0, int64_t rows,
                          int64_t dim) {
  if (src.stride_d != 1) {
    return;
  }
  for (int64_t j = 0; j < rows; ++j) {
    const char* row = reinterpret_cast<const char*>(src.row(b, h, n0 + j));
    for (int64_t byte = 0; byte < dim * int64_t(sizeof(scalar_t)); byte += 64) {
      __builtin_prefetch(row + byte, 0, 2);
    }
  }
}

// dst (dim x ld): dst[d * ld + j] = src row n0 + j (of (b, h)), element d, in T, for j < rows;
// columns rows..round_up(rows, vector width) - 1 are 0 (keys the score GEMM computes on, the
// caller ignores). on_keys(j0, count) is called before keys [j0, j0 + count) are read (the caller's
// prefetches, spread over the block rather than issued at once).
template <typename scalar_t, typename T, typename OnKeys>
void read_transposed(const Strided4<const scalar_t>& src, int64_t b, int64_t h, int64_t n0, int64_t rows, int64_t dim,
                     T* dst, int64_t ld, const OnKeys& on_keys) {
  constexpr int64_t W = kVecWidth<T>;
  const int64_t width = round_up(rows, W);
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool kVectorized = std::is_same_v<T, float> && !std::is_same_v<scalar_t, double>;
  if constexpr (kVectorized) {
    if (src.stride_d == 1) {
      __m512 r[16];
      const scalar_t* key_rows[16];
      for (int64_t j0 = 0; j0 < width; j0 += 16) {
        const int64_t keys = std::min<int64_t>(16, rows - j0);
        on_keys(j0, keys);
        for (int64_t j = 0; j < keys; ++j) {
          key_rows[j] = src.row(b, h, n0 + j0 + j);
        }
        for (int64_t d0 = 0; d0 < dim; d0 += 16) {
          const int64_t count = std::min<int64_t>(16, dim - d0);
          if (keys == 16 && count == 16) {
            // A whole 16 x 16 square, the common case: fixed trip counts, so the loads need no mask
            // and r[] stays in registers (a runtime count indexes it through a chain of compares).
#pragma GCC unroll 16
            for (int j = 0; j < 16; ++j) {
              r[j] = load_as_float(key_rows[j] + d0, 16);
            }
            transpose16x16(r);
#pragma GCC unroll 16
            for (int dd = 0; dd < 16; ++dd) {
              _mm512_storeu_ps(dst + (d0 + dd) * ld + j0, r[dd]);
            }
            continue;
          }
          for (int64_t j = 0; j < 16; ++j) {
            r[j] = j < keys ? load_as_float(key_rows[j] + d0, count) : _mm512_setzero_ps();
          }
          transpose16x16(r);
          for (int64_t dd = 0; dd < count; ++dd) {
            _mm512_storeu_ps(dst + (d0 + dd) * ld + j0, r[dd]);
          }
        }
      }
      return;
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // bfloat16 / float16 keys: 8 x 8 squares through registers, converted on the way (decode, 4 x 32
  // query heads over 8 kv heads, D 128, Nk 4096, 2 threads, Zen 1: 13.3 -> 12.7 ms in bfloat16).
  // float32 keys stay on the scalar loop below, which row by row measured faster there (14.5 ms
  // against 16.3 ms through the squares: the stream is memory-bound, and 8 rows read at once
  // prefetch worse than one).
  constexpr bool kVectorized =
      std::is_same_v<T, float> && (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>);
  if constexpr (kVectorized) {
    if (src.stride_d == 1) {
      __m256 r[8];
      const scalar_t* key_rows[8];
      on_keys(0, rows);  // (the next block's prefetches at once, as the scalar loop issues them)
      for (int64_t j0 = 0; j0 < width; j0 += 8) {
        const int64_t keys = std::min<int64_t>(8, rows - j0);
        for (int64_t j = 0; j < keys; ++j) {
          key_rows[j] = src.row(b, h, n0 + j0 + j);
        }
        for (int64_t d0 = 0; d0 < dim; d0 += 8) {
          const int64_t count = std::min<int64_t>(8, dim - d0);
          if (keys == 8 && count == 8) {  // fixed trip counts: r[] stays in registers
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) {
              r[j] = load_as_float8(key_rows[j] + d0, 8);
            }
            transpose8x8(r);
#pragma GCC unroll 8
            for (int dd = 0; dd < 8; ++dd) {
              _mm256_storeu_ps(dst + (d0 + dd) * ld + j0, r[dd]);
            }
            continue;
          }
          for (int64_t j = 0; j < 8; ++j) {
            r[j] = j < keys ? load_as_float8(key_rows[j] + d0, count) : _mm256_setzero_ps();
          }
          transpose8x8(r);
          for (int64_t dd = 0; dd < count; ++dd) {
            _mm256_storeu_ps(dst + (d0 + dd) * ld + j0, r[dd]);
          }
        }
      }
      return;
    }
  }
#endif
  on_keys(0, rows);
  for (int64_t j = 0; j < rows; ++j) {
    const scalar_t* row = src.row(b, h, n0 + j);
    for (int64_t d = 0; d < dim; ++d) {
      dst[d * ld + j] = static_cast<T>(row[d * src.stride_d]);
    }
  }
  for (int64_t d = 0; d < dim; ++d) {
    fill(dst + d * ld + rows, width - rows, T(0));
  }
}

}  // namespace selfattn::SELFATTN_CPU_NS
