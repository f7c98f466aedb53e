// Dropout's keep decisions: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011; checked against Random123's known-answer vectors in tests/test_dropout.py),
// shared by the CPU kernels, the CUDA kernels and the CPU emulation of the latter.
// selfattn/rng.py computes the same numbers in torch integer arithmetic (dropout_mask).
//
// Element (b, h, i, j) of a (B, Hq, Nq, Nk) attention is kept when
//
//     philox(counter = (j / 4, i, h, b), key = call_key(seed, offset))[j % 4] >= threshold
//
// with threshold = floor(p · 2^32) (dropout_threshold) — a pure function of (seed, offset, b, h,
// i, j), so no tiling or thread count changes it, and one Philox call decides 4 consecutive keys.
// The key of a call is itself a Philox output, of (offset, 0, 0) under the seed, so that two
// offsets give unrelated masks. For varlen attention b is the sequence index, i and j the row and
// key within the sequence. Kept probabilities are multiplied by 1 / (1 - p).
//
// The rounds are written once over a word type U that holds 32-bit values in wider lanes: a
// scalar uint64_t, or (CPU kernels) a GCC vector of them, so 8 counters go through at once.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(SELFATTN_CUDA_EMULATION)
#define SELFATTN_PHILOX_FN __host__ __device__ inline
#else
#define SELFATTN_PHILOX_FN inline
#endif

namespace selfattn {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Philox4x32-10 on words of type U (32-bit values in 64-bit lanes; the products of two 32-bit
// values then fit). c: the counter, in and out; k0, k1: the key.
template <typename U>
SELFATTN_PHILOX_FN void philox_rounds(U (&c)[4], U k0, U k1) {
  const U mask = U{} + 0xFFFFFFFFu;
  for (int round = 0; round < 10; ++round) {
    const U p0 = c[0] * kPhiloxM0, p1 = c[2] * kPhiloxM1;
    const U next0 = ((p1 >> 32) ^ c[1] ^ k0) & mask;
    const U next2 = ((p0 >> 32) ^ c[3] ^ k1) & mask;
    c[0] = next0;
    c[1] = p1 & mask;
    c[2] = next2;
    c[3] = p0 & mask;
    k0 = (k0 + kPhiloxW0) & mask;
    k1 = (k1 + kPhiloxW1) & mask;
  }
}

// The Philox key of one call: (seed, offset) as two 32-bit words.
struct PhiloxKey {
  uint32_t k0, k1;
};

SELFATTN_PHILOX_FN PhiloxKey call_key(int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  uint64_t c[4] = {o & 0xFFFFFFFFu, o >> 32, 0, 0};
  philox_rounds<uint64_t>(c, s & 0xFFFFFFFFu, s >> 32);
  return {static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1])};
}

// Drop probability p in [0, 1) as the 32-bit threshold: a random word below it drops its element.
SELFATTN_PHILOX_FN uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The 4 random words of keys 4·(j / 4) .. 4·(j / 4) + 3 of row i of (b, h).
struct PhiloxWords {
  uint32_t w[4];
};

SELFATTN_PHILOX_FN PhiloxWords philox_words(PhiloxKey key, int64_t b, int64_t h, int64_t i, int64_t j) {
  uint64_t c[4] = {static_cast<uint64_t>(j >> 2) & 0xFFFFFFFFu, static_cast<uint64_t>(i) & 0xFFFFFFFFu,
                   static_cast<uint64_t>(h) & 0xFFFFFFFFu, static_cast<uint64_t>(b) & 0xFFFFFFFFu};
  philox_rounds<uint64_t>(c, key.k0, key.k1);
  return {{static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]), static_cast<uint32_t>(c[2]),
           static_cast<uint32_t>(c[3])}};
}

// Whether element (b, h, i, j) is kept (one Philox call; the kernels that visit 4 consecutive keys
// of a row share one call among them instead).
SELFATTN_PHILOX_FN bool dropout_keep(PhiloxKey key, uint32_t threshold, int64_t b, int64_t h, int64_t i, int64_t j) {
  return philox_words(key, b, h, i, j).w[j & 3] >= threshold;
}

// Dropout as a kernel argument (plain numbers, like mask.h's Band). rng_state points at the op's
// int64 (seed, offset) on the inputs' device — the CUDA kernels read it there, with no host
// synchronisation; null means no dropout.
struct Dropout {
  const int64_t* rng_state = nullptr;
  uint32_t threshold = 0;     // dropout_threshold(p)
  double keep_scale = 1.0;    // 1 / (1 - p), applied to the kept probabilities
  int64_t batch_offset = 0;   // added to the batch index b (varlen: the sequence's index)

  SELFATTN_PHILOX_FN bool active() const { return rng_state != nullptr; }
  SELFATTN_PHILOX_FN PhiloxKey key() const { return call_key(rng_state[0], rng_state[1]); }
};

}  // namespace selfattn
