// Which keys each query sees: the one mask description every kernel (CPU, CUDA tiled, CUDA
// tensor-core) takes. Plain numbers, so it is a kernel argument as it is.
//
// The structural part is a band. Query i sits at key position i + offset and sees key j when
//
//     i + offset - left  <=  j  <=  i + offset + right          (and 0 <= j < Nk)
//
// with left / right = kUnbounded for no bound on that side. The public arguments map onto it:
//   causal (top-left, SDPA's is_causal)    offset 0,        right 0
//   causal="bottom_right" (KV cache)       offset Nk - Nq,  right 0
//   window=(l, r) (FlashAttention)         left l, right r (r clamped to 0 under causal), -1 = unbounded
//   ring attention, chunked prefill        any offset: a block anywhere on the diagonal
// A row whose band holds no key (bottom-right with Nk < Nq, say) sees nothing: output 0, lse -inf.
//
// The tensor part (at most one (B, Hq, Nq, Nk) mask read through its strides, stride 0 on broadcast
// dims) is kernel-specific and travels beside the band.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(SELFATTN_CUDA_EMULATION)
#define SELFATTN_BAND_FN __host__ __device__ inline
#else
#define SELFATTN_BAND_FN inline
#endif

namespace selfattn {

// Far outside any sequence, yet i + offset ± kUnbounded cannot overflow int64.
constexpr int64_t kUnbounded = int64_t(1) << 60;

struct Band {
  int64_t offset = 0;
  int64_t left = kUnbounded;
  int64_t right = kUnbounded;

  // The first and last key query i may see (not clipped to [0, Nk)).
  SELFATTN_BAND_FN int64_t first_key(int64_t i) const { return i + offset - left; }
  SELFATTN_BAND_FN int64_t last_key(int64_t i) const { return i + offset + right; }
  SELFATTN_BAND_FN bool visible(int64_t i, int64_t j) const { return first_key(i) <= j && j <= last_key(i); }
  // Every key of [k0, k1) is visible to every query of [q0, q1) (both ranges non-empty).
  SELFATTN_BAND_FN bool covers(int64_t q0, int64_t q1, int64_t k0, int64_t k1) const {
    return first_key(q1 - 1) <= k0 && k1 - 1 <= last_key(q0);
  }
  // Some key of [k0, k1) is visible to some query of [q0, q1).
  SELFATTN_BAND_FN bool touches(int64_t q0, int64_t q1, int64_t k0, int64_t k1) const {
    return first_key(q0) <= k1 - 1 && k0 <= last_key(q1 - 1);
  }
  // The queries of [0, nq) that see some key of [k0, k1): [first, last], possibly empty.
  SELFATTN_BAND_FN int64_t first_query(int64_t k0) const { return right >= kUnbounded ? 0 : k0 - offset - right; }
  SELFATTN_BAND_FN int64_t last_query(int64_t k1) const {
    return left >= kUnbounded ? kUnbounded : k1 - 1 - offset + left;
  }
  SELFATTN_BAND_FN bool unbounded() const { return left >= kUnbounded && right >= kUnbounded; }
};

// The band of the ops' arguments (causal, the window sides, the query-to-key offset): sides of -1 are unbounded; causal bounds the right
// side at 0 (a window's right > 0 is clamped to 0, as FlashAttention does).
// Offsets and sides past 2^58 mean the same as 2^58 for any real sequence, and clamping them keeps
// i + offset ± kUnbounded inside int64.
inline Band make_band(bool causal, int64_t left, int64_t right, int64_t offset) {
  constexpr int64_t kFarOffset = int64_t(1) << 58;
  Band band;
  band.offset = offset < -kFarOffset ? -kFarOffset : offset > kFarOffset ? kFarOffset : offset;
  band.left = left < 0 || left > kUnbounded ? kUnbounded : left;
  band.right = right < 0 || right > kUnbounded ? kUnbounded : right;
  if (causal && band.right > 0) {
    band.right = 0;
  }
  return band;
}

// The score modifications (FlashAttention's softcap and alibi_slopes, GPT-OSS's sinks), as plain
// numbers and device pointers: a kernel argument as they are. Applied, in this order, to the scaled
// score s = scale·q·kᵀ of query row i and key j of batch b, query head h, before the band, a
// tensor mask or dropout decide anything:
//   softcap > 0     s <- softcap · tanh(s / softcap)                     (Gemma 2)
//   alibi           s <- s - slope(b, h) · |i + band.offset - j|         (BLOOM, MPT)
//   sinks           each row's softmax has one more logit, sink(h), that carries no value (GPT-OSS):
//                   the kernels start a row's running max at sink(h) and its sum at 1, so lse
//                   includes it and a row that sees no key gets output 0, lse sink(h).
// The band's offset is the query-to-key diagonal (0 top-left, Nk - Nq bottom-right, a ring block's
// position), so the ALiBi distance is the one between true positions.
struct ScoreMods {
  double softcap = 0.0;
  const float* alibi_slopes = nullptr;  // slope(b, h) = alibi_slopes[b * alibi_stride_b + h * alibi_stride_h]
  int64_t alibi_stride_b = 0, alibi_stride_h = 0;
  const void* sinks = nullptr;  // (Hq,) in the kernels' accumulation type (float, or double)

  SELFATTN_BAND_FN bool has_softcap() const { return softcap > 0.0; }
  SELFATTN_BAND_FN bool has_alibi() const { return alibi_slopes != nullptr; }
  SELFATTN_BAND_FN bool has_sinks() const { return sinks != nullptr; }
  // Whether a score differs from scale·q·kᵀ (the sinks change only the softmax's sum).
  SELFATTN_BAND_FN bool modify_scores() const { return has_softcap() || has_alibi(); }
  SELFATTN_BAND_FN bool any() const { return modify_scores() || has_sinks(); }
  SELFATTN_BAND_FN float slope(int64_t b, int64_t h) const {
    return alibi_slopes[b * alibi_stride_b + h * alibi_stride_h];
  }
  template <typename T>
  SELFATTN_BAND_FN T sink(int64_t h) const {
    return static_cast<const T*>(sinks)[h];
  }
};

}  // namespace selfattn
