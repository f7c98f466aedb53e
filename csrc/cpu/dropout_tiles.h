// Dropout (philox.h) on the CPU kernels' transposed tiles (key rows x query columns): the keep
// decisions of a tile, 8 queries at a time. One Philox call decides 4 consecutive keys of a query,
// so a call's 4 output words are 4 rows of the tile and 8 calls side by side (one per query, in the
// lanes of a GCC vector) fill 4 rows x 8 columns — the tile's own layout, no transposition.
#pragma once

#include "../philox.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace selfattn::SELFATTN_CPU_NS {

// 8 words of 32 bits, each in a 64-bit lane so that Philox's 32 x 32 -> 64 products fit.
typedef uint64_t PhiloxLanes __attribute__((vector_size(64)));

// For key rows j < k_rows (k0 a multiple of 4) and query columns c < width of (b, h), starting at
// query q0: tile[j * ld + c] = keep ? keep_scale : 0 (kMultiply false), or tile[j * ld + c] *=
// that factor (kMultiply true). Rows up to k_rows rounded up to 4 are written; ld >= width.
template <bool kMultiply, typename T>
void dropout_tile(const Dropout& dropout, PhiloxKey key, int64_t b, int64_t h, int64_t q0, int64_t width, int64_t k0,
                  int64_t k_rows, T* tile, int64_t ld) {
  TORCH_INTERNAL_ASSERT(k0 % 4 == 0, "selfattn: dropout tiles start at a multiple of 4 keys");
  const T kept = static_cast<T>(dropout.keep_scale);
  const uint64_t threshold = dropout.threshold;
  const PhiloxLanes lane_index = {0, 1, 2, 3, 4, 5, 6, 7};
  const PhiloxLanes k0_lanes = PhiloxLanes{} + uint64_t(key.k0), k1_lanes = PhiloxLanes{} + uint64_t(key.k1);
  const uint64_t head = static_cast<uint64_t>(h) & 0xFFFFFFFFu;
  const uint64_t batch = static_cast<uint64_t>(b + dropout.batch_offset) & 0xFFFFFFFFu;
  for (int64_t j = 0; j < k_rows; j += 4) {
    const uint64_t key_block = static_cast<uint64_t>((k0 + j) >> 2) & 0xFFFFFFFFu;
    for (int64_t c = 0; c < width; c += 8) {
      PhiloxLanes counter[4] = {PhiloxLanes{} + key_block,
                                ((PhiloxLanes{} + static_cast<uint64_t>(q0 + c)) + lane_index) & 0xFFFFFFFFu,
                                PhiloxLanes{} + head, PhiloxLanes{} + batch};
      philox_rounds<PhiloxLanes>(counter, k0_lanes, k1_lanes);
      const int64_t lanes = std::min<int64_t>(8, width - c);
      for (int r = 0; r < 4; ++r) {
        T* row = tile + (j + r) * ld + c;
        for (int64_t l = 0; l < lanes; ++l) {
          const T factor = counter[r][l] >= threshold ? kept : T(0);
          if constexpr (kMultiply) {
            row[l] *= factor;
          } else {
            row[l] = factor;
          }
        }
      }
    }
  }
}

}  // namespace selfattn::SELFATTN_CPU_NS
