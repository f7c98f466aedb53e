// The masks of mask.h on the CPU kernels' transposed score tiles (key rows x query columns):
// which tiles a tensor mask hides entirely (skipped: never loaded, never exponentiated), and the
// element-by-element masking of the tiles that are only partly visible.
#pragma once

#include "../attention.h"
#include "tile.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <limits>
#include <vector>

namespace selfattn::SELFATTN_CPU_NS {

enum class TileState : uint8_t {
  kHidden,   // the mask hides every pair: skip the tile
  kPartial,  // some pairs are hidden or carry a bias: mask element by element
  kOpen,     // every pair takes part unchanged (bool all true, float all 0)
};

// A tensor mask (B, Hq, Nq, Nk), any strides, summarised per (block_q x block_k) tile. Dims the
// mask broadcasts over (stride 0) are summarised once: a key-padding mask (B, 1, 1, Nk) costs
// B·Nk reads, not B·H·Nq·Nk.
class MaskTiles {
 public:
  MaskTiles() = default;  // no tensor mask: every tile open

  MaskTiles(const at::Tensor& mask, int64_t block_q, int64_t block_k)
      : mask_(mask), data_(static_cast<const char*>(mask.data_ptr())), dtype_(mask.scalar_type()) {
    const int64_t nq = mask.size(2), nk = mask.size(3);
    for (int d = 0; d < 4; ++d) {
      extent_[d] = mask.stride(d) == 0 ? 1 : mask.size(d);
      stride_[d] = mask.stride(d);
    }
    block_[0] = block_[1] = 1;
    block_[2] = mask.stride(2) == 0 ? std::max<int64_t>(nq, 1) : block_q;
    block_[3] = mask.stride(3) == 0 ? std::max<int64_t>(nk, 1) : block_k;
    counts_[0] = extent_[0], counts_[1] = extent_[1];
    counts_[2] = ceil_div(extent_[2], block_[2]), counts_[3] = ceil_div(extent_[3], block_[3]);
    states_.assign(counts_[0] * counts_[1] * counts_[2] * counts_[3], uint8_t(TileState::kOpen));
    at::parallel_for(0, counts_[0] * counts_[1] * counts_[2], 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t qb = row % counts_[2], h = row / counts_[2] % counts_[1], b = row / counts_[2] / counts_[1];
        for (int64_t kb = 0; kb < counts_[3]; ++kb) {
          states_[row * counts_[3] + kb] = uint8_t(classify(b, h, qb * block_[2], kb * block_[3]));
        }
      }
    });
  }

  bool defined() const { return mask_.defined(); }

  // The state of the tile of queries [q0, q0 + block_q) x keys [k0, k0 + block_k) of (b, h),
  // q0 and k0 multiples of the kernel's block sizes.
  TileState state(int64_t b, int64_t h, int64_t q0, int64_t k0) const {
    if (!mask_.defined()) {
      return TileState::kOpen;
    }
    const int64_t index = (((extent_[0] == 1 ? 0 : b) * counts_[1] + (extent_[1] == 1 ? 0 : h)) * counts_[2] +
                           (extent_[2] == 1 ? 0 : q0 / block_[2])) *
                              counts_[3] +
                          (extent_[3] == 1 ? 0 : k0 / block_[3]);
    return TileState(states_[index]);
  }

  // Applies the mask to a transposed score tile: tile[j * ld + c] is the scaled score of query
  // q0 + c and key k0 + j (c < q_rows, j < k_rows). bool: false -> -inf; float: += mask.
  template <typename T>
  void apply(int64_t b, int64_t h, int64_t q0, int64_t q_rows, int64_t k0, int64_t k_rows, T* tile, int64_t ld) const {
    switch (dtype_) {
      case at::kBool:
        return apply_typed<bool>(b, h, q0, q_rows, k0, k_rows, tile, ld);
      case at::kFloat:
        return apply_typed<float>(b, h, q0, q_rows, k0, k_rows, tile, ld);
      case at::kDouble:
        return apply_typed<double>(b, h, q0, q_rows, k0, k_rows, tile, ld);
      case at::kBFloat16:
        return apply_typed<c10::BFloat16>(b, h, q0, q_rows, k0, k_rows, tile, ld);
      case at::kHalf:
        return apply_typed<c10::Half>(b, h, q0, q_rows, k0, k_rows, tile, ld);
      default:
        TORCH_CHECK(false, "selfattn: no CPU mask kernel for ", dtype_);
    }
  }

 private:
  // (Pointer and strides are kept as plain numbers: going through the tensor per element costs
  // more than the masking itself.)
  template <typename M>
  const M* element(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return reinterpret_cast<const M*>(data_) + b * stride_[0] + h * stride_[1] + i * stride_[2] + j * stride_[3];
  }

  template <typename M>
  static bool takes_part(M m) {
    if constexpr (std::is_same_v<M, bool>) {
      return m;
    } else {
      return static_cast<double>(m) != -std::numeric_limits<double>::infinity();
    }
  }

  template <typename M>
  static bool unchanged(M m) {
    if constexpr (std::is_same_v<M, bool>) {
      return m;
    } else {
      return static_cast<double>(m) == 0.0;
    }
  }

  template <typename M>
  TileState classify_typed(int64_t b, int64_t h, int64_t q0, int64_t k0) const {
    const int64_t q1 = std::min(extent_[2], q0 + block_[2]), k1 = std::min(extent_[3], k0 + block_[3]);
    bool any_part = false, all_unchanged = true;
    for (int64_t i = q0; i < q1; ++i) {
      const M* row = element<M>(b, h, i, k0);
      for (int64_t j = 0; j < k1 - k0; ++j) {
        const M m = row[j * stride_[3]];
        any_part = any_part || takes_part(m);
        all_unchanged = all_unchanged && unchanged(m);
      }
    }
    return !any_part ? TileState::kHidden : all_unchanged ? TileState::kOpen : TileState::kPartial;
  }

  TileState classify(int64_t b, int64_t h, int64_t q0, int64_t k0) const {
    switch (dtype_) {
      case at::kBool:
        return classify_typed<bool>(b, h, q0, k0);
      case at::kFloat:
        return classify_typed<float>(b, h, q0, k0);
      case at::kDouble:
        return classify_typed<double>(b, h, q0, k0);
      case at::kBFloat16:
        return classify_typed<c10::BFloat16>(b, h, q0, k0);
      case at::kHalf:
        return classify_typed<c10::Half>(b, h, q0, k0);
      default:
        TORCH_CHECK(false, "selfattn: no CPU mask kernel for ", dtype_);
    }
  }

  // The mask is read query by query, along its rows (keys), into a small buffer laid out like the
  // tile (key rows), which the tile's rows then take in contiguous, vectorisable loops.
  template <typename M, typename T>
  void apply_typed(int64_t b, int64_t h, int64_t q0, int64_t q_rows, int64_t k0, int64_t k_rows, T* tile,
                   int64_t ld) const {
    // The kernels' largest tiles: 64 keys (every kernel's key block), 128 queries (the forward's
    // largest query block, blocking.h).
    constexpr int64_t kMaxK = 64, kMaxQ = 128;
    TORCH_INTERNAL_ASSERT(q_rows <= kMaxQ && k_rows <= kMaxK, "selfattn: mask tile larger than 64 keys x 128 queries");
    using Held = std::conditional_t<std::is_same_v<M, bool>, uint8_t, T>;
    Held held[kMaxK * kMaxQ];  // (k_rows, q_rows): the mask's entries, transposed
    const int64_t stride_j = stride_[3];
    for (int64_t c = 0; c < q_rows; ++c) {
      const M* m = element<M>(b, h, q0 + c, k0);
      for (int64_t j = 0; j < k_rows; ++j) {
        held[j * q_rows + c] = static_cast<Held>(m[j * stride_j]);
      }
    }
    for (int64_t j = 0; j < k_rows; ++j) {
      T* row = tile + j * ld;
      const Held* entries = held + j * q_rows;
      for (int64_t c = 0; c < q_rows; ++c) {
        if constexpr (std::is_same_v<M, bool>) {
          row[c] = entries[c] ? row[c] : -std::numeric_limits<T>::infinity();
        } else {
          row[c] += entries[c];
        }
      }
    }
  }

  at::Tensor mask_;
  const char* data_ = nullptr;
  at::ScalarType dtype_ = at::kBool;
  int64_t stride_[4] = {0, 0, 0, 0};
  int64_t extent_[4] = {0, 0, 0, 0};  // the mask's sizes, 1 on broadcast dims
  int64_t block_[4] = {1, 1, 1, 1};   // tile extent per dim
  int64_t counts_[4] = {0, 0, 0, 0};  // tiles per dim
  std::vector<uint8_t> states_;
};

// The band's cut of the tile of queries [q0, ...) and keys [k0, ...) (tile.h's MaskCut): key row j
// is visible to query columns [first + j, last + j].
inline MaskCut band_cut(const Band& band, int64_t q0, int64_t k0) {
  return {k0 - band.last_key(q0), k0 - band.first_key(q0)};
}

// Whether the band hides some pair of the tile (q_rows x k_rows): then the tile takes the band
// GEMMs of tile.h and mask_band.
inline bool band_cuts(const Band& band, int64_t q0, int64_t q_rows, int64_t k0, int64_t k_rows) {
  return !band.covers(q0, q0 + q_rows, k0, k0 + k_rows);
}

// The band's hidden pairs on a transposed score tile (key rows j < k_rows, query columns < width)
// set to `hidden`.
template <typename T>
void mask_band(MaskCut cut, int64_t k_rows, int64_t width, T* tile, int64_t ld, T hidden) {
  for (int64_t j = 0; j < k_rows; ++j) {
    T* row = tile + j * ld;
    const int64_t lo = std::clamp<int64_t>(cut.first + j, 0, width);
    const int64_t hi = std::clamp<int64_t>(cut.last + j + 1, lo, width);
    fill(row, lo, hidden);
    fill(row + hi, width - hi, hidden);
  }
}

}  // namespace selfattn::SELFATTN_CPU_NS
