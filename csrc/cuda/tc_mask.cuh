// Masking of the tensor-core kernels' scores (attention_fwd_tc.cuh, attention_bwd_tc.cuh), shared
// by the forward and both backward kernels.
//
// Without an additive mask a score stays raw (q·k): the scale is folded into the exponent, one
// FFMA per probability. An additive mask must be added after the scale, so with one the scores
// the softmax sees are in natural units (scale q·k + element), and the softmax subtracts the max
// (or lse) before multiplying by log2(e): a float32 finfo.min element times log2(e) would
// overflow to -inf and turn a row masked everywhere with finfo.min (Hugging Face's padding), which
// the float64 math treats as an ordinary row, into an empty one. The tiled kernels do the same.
// The score modifications (score_mods.cuh: softcap, ALiBi, sinks) also take natural units: they
// apply to scale q·k, and a sink is a natural-unit logit.
#pragma once

#include "mma.cuh"  // fast_exp2 (and common.cuh: mask_bias)
#include "score_mods.cuh"

namespace selfattn::cuda {

// How a kernel's scores are masked: read once per kernel. kTensor: the kernel may have a tensor
// mask (else the band alone: the forward is instantiated both ways, so that the mask's state takes
// no registers from the unmasked kernel, which is at its register limit at D = 128).
// Score modifications go through the kTensor kernels too (with or without a tensor mask).
template <bool kTensor>
struct TcScoreMask {
  TensorMask tensor;
  Band band;
  int nq, nk;
  float scale;
  bool natural_;        // an additive mask or a score modification: natural units
  bool modify_;         // softcap or ALiBi: mods.apply on every score
  HeadMods<float> mods;  // of the kernel's (b, h); the dk/dv kernel sets mods.slope per query head

  // Scores in natural units (an additive mask, a score modification), else raw.
  __device__ __forceinline__ bool additive() const { return kTensor && natural_; }

  // Every score of a tile needs apply(): a tensor mask or natural units, or keys past Nk, or rows
  // the band does not let see every key of the tile (the callers decide the last two).
  __device__ __forceinline__ bool per_score() const { return kTensor && (tensor.present() || natural_); }

  // Score s = q·k of (row, key) as the softmax takes it: -inf where the row does not see the key
  // (past Nk, outside the band, a false bool element; past Nq with a tensor mask, which is read
  // only inside (Nq, Nk); rows past Nq are otherwise never stored); with an additive mask
  // scale * s + element, else s.
  // With score modifications: mods(scale * s) (+ element), and with `grad` the softcap's
  // 1 - tanh² of the score (left as it is where the score is masked out).
  template <typename T>
  __device__ __forceinline__ float apply(float s, int64_t b, int64_t h, int row, int key, float* grad = nullptr) const {
    if ((kTensor && row >= nq) || key >= nk || !band.visible(row, key)) {
      return -INFINITY;
    }
    if (!per_score()) {
      return s;
    }
    if (kTensor && modify_) {
      const float x = mods.apply(s * scale, row, key, grad);
      return tensor.present() ? x + mask_bias<T, float>(tensor, b, h, row, key) : x;
    }
    if (!tensor.present()) {
      return s * scale;  // natural units for a sink alone
    }
    const float bias = mask_bias<T, float>(tensor, b, h, row, key);  // 0 or -inf for a bool mask
    return additive() ? fmaf(s, scale, bias) : s + bias;
  }
};

// h: the query head whose ALiBi slope mods takes (the dk/dv kernel resets it per head).
template <bool kTensor, typename T>
__device__ __forceinline__ TcScoreMask<kTensor> tc_score_mask(const SharedParams<T>& p, int64_t b, int64_t h) {
  return {kTensor ? p.mask : TensorMask{},
          p.band,
          p.nq,
          p.nk,
          static_cast<float>(p.scale),
          kTensor && (p.mask.kind == MaskKind::kAdditive || p.scores.any()),
          kTensor && p.scores.modify_scores(),
          kTensor ? head_mods<float>(p.scores, p.band.offset, b, h) : HeadMods<float>{}};
}

// What tc_probability subtracts for a row max or lse y in natural units: y itself for natural
// scores, y * log2(e) for raw ones.
template <bool kTensor>
__device__ __forceinline__ float tc_subtrahend(const TcScoreMask<kTensor>& m, float y) {
  return m.additive() ? y : y * kLog2e;
}

// exp(score - y) in base 2 for a masked score x (apply's units) and sub = tc_subtrahend(y): raw
// scores take the scale in one FFMA, natural ones subtract first. x = -inf gives 0, and so does
// sub = +inf (backward_lse of a row that saw no key).
template <bool kTensor>
__device__ __forceinline__ float tc_probability(const TcScoreMask<kTensor>& m, float x, float scale_log2, float sub) {
  return m.additive() ? fast_exp2((x - sub) * kLog2e) : fast_exp2(fmaf(x, scale_log2, -sub));
}

}  // namespace selfattn::cuda
