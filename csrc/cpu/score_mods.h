// The score modifications (mask.h's ScoreMods) on the CPU kernels' transposed score tiles: key rows x
// query columns, p_t[j * ld + c] the scaled score s = scale·q·kᵀ of key k0 + j and query q0 + c.
// Applied right after the score GEMM, before the band, a tensor mask or dropout (which overwrite or
// add to what this leaves; a pair the band skipped holds an unwritten value until they do).
//
//   softcap > 0   s <- softcap · tanh(s / softcap); with `tanh_t` the tanh is kept there (same
//                 layout) for the backward's factor 1 - tanh² (softcap_backward)
//   alibi         s <- s - slope · |i + offset - j|, the distance from positions (no memory traffic)
//
// The sinks change only the softmax's running max and sum (sink_row_start).
#pragma once

#include "tile.h"

#include <cmath>

namespace selfattn::SELFATTN_CPU_NS {

// tanh for the softcap. float: 1 - 2 / (exp(2|x|) + 1) for |x| >= 0.625, where nothing cancels
// (exp to 1 ulp), and x + x³·P(x²) below, P a least-squares fit of degree 4 (relative error
// 1.2e-8 on [0, 0.625]); |x| is capped at 9, past which tanh is 1 in float. About 2 ulp, and
// cheaper than Sleef's tanh, which cost the forward 1.6x at D = 64. double: Sleef's.
template <typename T>
inline Vec<T> softcap_tanh(const Vec<T>& x) {
  if constexpr (!std::is_same_v<T, float>) {
    return x.tanh();
  } else {
    const Vec<float> one(1.0f), a = at::vec::minimum(x.abs(), Vec<float>(9.0f));
    const Vec<float> far = one - Vec<float>(2.0f) / ((a + a).exp() + one);
    const Vec<float> y = a * a;
    Vec<float> p(-0.005787819704356865f);
    p = at::vec::fmadd(p, y, Vec<float>(0.02071170596540162f));
    p = at::vec::fmadd(p, y, Vec<float>(-0.053761385164922064f));
    p = at::vec::fmadd(p, y, Vec<float>(0.13331692503887832f));
    p = at::vec::fmadd(p, y, Vec<float>(-0.3333329067069097f));
    const Vec<float> near = at::vec::fmadd(a * y, p, a);
    const Vec<float> t = Vec<float>::blendv(far, near, a < Vec<float>(0.625f));
    return Vec<float>::blendv(t, Vec<float>(0.0f) - t, x < Vec<float>(0.0f));
  }
}

// Every column c in [0, cols) of rows [0, k_rows); cols a multiple of the vector width W.
template <typename T>
void modify_scores(const ScoreMods& mods, int64_t b, int64_t h, int64_t offset, int64_t q0, int64_t cols, int64_t k0,
                   int64_t k_rows, T* p_t, int64_t ld, T* tanh_t = nullptr) {
  constexpr int64_t W = kVecWidth<T>;
  if (mods.has_softcap()) {
    const T cap = static_cast<T>(mods.softcap);
    const Vec<T> cap_vec(cap), inv_cap(T(1) / cap);
    for (int64_t j = 0; j < k_rows; ++j) {
      T* row = p_t + j * ld;
      T* t_row = tanh_t != nullptr ? tanh_t + j * ld : nullptr;
      for (int64_t c = 0; c < cols; c += W) {
        const Vec<T> t = softcap_tanh<T>(Vec<T>::loadu(row + c) * inv_cap);
        if (t_row != nullptr) {
          t.store(t_row + c);
        }
        (t * cap_vec).store(row + c);
      }
    }
  }
  if (mods.has_alibi()) {
    const Vec<T> minus_slope(-static_cast<T>(mods.slope(b, h)));
    alignas(64) T iota[W];
    for (int64_t c = 0; c < W; ++c) {
      iota[c] = static_cast<T>(c);
    }
    const Vec<T> lanes = Vec<T>::loadu(iota);
    for (int64_t j = 0; j < k_rows; ++j) {
      T* row = p_t + j * ld;
      // Column c's distance: (q0 + c + offset) - (k0 + j), exact in T for any real sequence.
      const int64_t first = q0 + offset - (k0 + j);
      for (int64_t c = 0; c < cols; c += W) {
        const Vec<T> distance = (Vec<T>(static_cast<T>(first + c)) + lanes).abs();
        at::vec::fmadd(minus_slope, distance, Vec<T>::loadu(row + c)).store(row + c);
      }
    }
  }
}

// The same along one query row of `count` keys (the decode path's layout: keys along the
// vector): key j at distance distance0 - j from the query, `slope` the row's ALiBi slope.
template <typename T>
void modify_score_row(const ScoreMods& mods, T slope, int64_t distance0, int64_t count, T* row) {
  constexpr int64_t W = kVecWidth<T>;
  if (mods.has_softcap()) {
    const T cap = static_cast<T>(mods.softcap);
    const Vec<T> cap_vec(cap), inv_cap(T(1) / cap);
    for (int64_t j = 0; j < count; j += W) {
      (softcap_tanh<T>(Vec<T>::loadu(row + j) * inv_cap) * cap_vec).store(row + j);
    }
  }
  if (mods.has_alibi()) {
    alignas(64) T iota[W];
    for (int64_t l = 0; l < W; ++l) {
      iota[l] = static_cast<T>(l);
    }
    const Vec<T> lanes = Vec<T>::loadu(iota), minus_slope(-slope);
    for (int64_t j = 0; j < count; j += W) {
      const Vec<T> distance = (Vec<T>(static_cast<T>(distance0 - j)) - lanes).abs();
      at::vec::fmadd(minus_slope, distance, Vec<T>::loadu(row + j)).store(row + j);
    }
  }
}

// The softcap's chain rule on a tile of dS (same layout as the scores): ds *= 1 - tanh², with the
// tanh kept by modify_scores.
template <typename T>
void softcap_backward(int64_t cols, int64_t k_rows, const T* tanh_t, T* ds_t, int64_t ld) {
  constexpr int64_t W = kVecWidth<T>;
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < k_rows; ++j) {
    for (int64_t c = 0; c < cols; c += W) {
      const Vec<T> t = Vec<T>::loadu(tanh_t + j * ld + c);
      (Vec<T>::loadu(ds_t + j * ld + c) * (one - t * t)).store(ds_t + j * ld + c);
    }
  }
}

// A row's running max and sum before its first key: the sink's logit with weight exp(0) = 1
// (a key whose value is 0), or -inf and 0 without sinks.
template <typename T>
void sink_row_start(const ScoreMods& mods, int64_t h, int64_t count, T* row_max, T* row_sum) {
  const bool sink = mods.has_sinks();
  fill(row_max, count, sink ? mods.sink<T>(h) : -std::numeric_limits<T>::infinity());
  fill(row_sum, count, sink ? T(1) : T(0));
}

}  // namespace selfattn::SELFATTN_CPU_NS
