// The score modifications (mask.h's ScoreMods: softcap, ALiBi, sinks) in the CUDA kernels, applied
// right after the score computation to the scaled score s = scale·q·kᵀ in natural units, before
// the band, a tensor mask or dropout:
//   softcap > 0   s <- cap · tanh(s / cap); the backward multiplies dS, the jvp the score tangent,
//                 by 1 - tanh² (tanh recomputed from the score: grad_factor)
//   alibi         s <- s - slope(b, h) · |i + band.offset - j|
//   sinks         a row's running max starts at sink(h), its sum at 1 (sink_start); the backward
//                 needs nothing (lse includes the sink), grad_sinks is computed outside.
#pragma once

#include "common.cuh"

namespace selfattn::cuda {

__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// The modifications of one (b, h), the head's slope read once. A zero cap means no softcap, a
// zero slope no ALiBi (a zero slope adds nothing either).
template <typename A>
struct HeadMods {
  A cap, inv_cap, slope;
  int64_t offset;  // the band's query-to-key offset: query i sits at key position i + offset

  __device__ __forceinline__ bool active() const { return cap > A(0) || slope != A(0); }

  // The modified score of query i and key j; with `grad`, also d(modified)/d(s) = 1 - tanh²
  // (1 without softcap).
  __device__ __forceinline__ A apply(A s, int64_t i, int64_t j, A* grad = nullptr) const {
    if (cap > A(0)) {
      const A t = tanh_acc(s * inv_cap);
      s = cap * t;
      if (grad != nullptr) {
        *grad = A(1) - t * t;
      }
    } else if (grad != nullptr) {
      *grad = A(1);
    }
    if (slope != A(0)) {
      const int64_t d = i + offset - j;
      s -= slope * static_cast<A>(d < 0 ? -d : d);
    }
    return s;
  }
};

template <typename A>
__device__ __forceinline__ HeadMods<A> head_mods(const ScoreMods& m, int64_t offset, int64_t b, int64_t h) {
  HeadMods<A> r;
  r.cap = m.has_softcap() ? static_cast<A>(m.softcap) : A(0);
  r.inv_cap = m.has_softcap() ? A(1) / r.cap : A(0);
  r.slope = m.has_alibi() ? static_cast<A>(m.slope(b, h)) : A(0);
  r.offset = offset;
  return r;
}

// A row's running max before its first key: sink(h), or -inf without sinks. Its running sum
// starts at sink_sum (1 with sinks: exp(sink - sink)), held once per row (by one lane where the
// lanes keep partial sums).
template <typename A>
__device__ __forceinline__ A sink_max(const ScoreMods& m, int64_t h) {
  return m.has_sinks() ? m.sink<A>(h) : A(-INFINITY);
}
template <typename A>
__device__ __forceinline__ A sink_sum(const ScoreMods& m) {
  return m.has_sinks() ? A(1) : A(0);
}

}  // namespace selfattn::cuda
