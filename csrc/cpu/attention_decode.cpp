// CPU forward for decoding: a few queries against a long key/value cache (flash-decoding, split-K).
//
// The tiled forward (attention_fwd.cpp) parallelises over (batch, query head, query block): with
// Nq = 1 that is one work item per (batch, head) however long the cache, and every query head of
// a grouped-query group streams the group's k and v again. Here a work item is (batch, kv head,
// split of the keys): it takes all Nq rows of all the group's query heads at once — R = group·Nq
// score columns, column r = g·Nq + i for query i of the group's head g — so each k/v tile is read
// once per group, and splits of the keys keep the threads busy. Each split leaves a partial
// output (normalised) and its lse; a merge in fixed split order combines them by lse, so results
// never depend on which thread ran what. A split with lse -inf saw nothing and weighs 0; a row
// every split misses gets output 0 and lse -inf.
//
// Scores are computed as Sᵀ = Q · Kᵀ (R query rows x a block of keys) with the tiled kernels' GEMM
// (tile.h), the key block read transposed (transposed_block.h): the keys run along the vector
// lanes, so no lane is padding whatever R is. (The first version computed S = K · Qᵀ with the R
// rows as columns padded to the vector width: at R = 4 three quarters of the score FMAs were on
// padding. Removing them saved ~15% of a bfloat16 call's CPU time and nothing measurable in float32:
// the time sits on the k/v loads, BENCHMARKS.md.) Each score is still
// the FMA chain over d of k·q from 0, the order the backward recomputes it in — a dot-product kernel
// along the head dim was tried and dropped: its scores rounded differently from the backward's, and
// the gradients' error grew 3-5x past eager's (P = exp(S - lse) must see the forward's S).
// bfloat16/float16 caches are read in their dtype and converted a tile at a time.
#include "kernels.h"
#include "mask_tiles.h"
#include "score_mods.h"
#include "tile.h"
#include "transposed_block.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

namespace selfattn::SELFATTN_CPU_NS {
namespace {

constexpr int64_t kBlockK = 64;            // keys per step (rows of the score tile); mask tiles use it
constexpr int64_t kMaxRows = 64;           // decode path when Nq · group <= this: even with the tiled
                                           // kernel at 64, ahead below (BENCHMARKS.md)
constexpr int64_t kMinBlocksPerSplit = 4;  // a split streams at least 256 keys (when there are)
// Splits per call: enough work items for this many threads. Fixed rather than read from the thread
// count, so that a result does not depend on how many threads computed it.
constexpr int64_t kTargetItems = 64;

// q: (B, Hq, Nq, D), k: (B, Hk, Nk, D), v: (B, Hk, Nk, Dv), out: (B, Hq, Nq, Dv), any strides;
// lse (B, Hq, Nq) T. T (float, or double for double) is the accumulation type.
template <typename scalar_t, typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask, T scale,
                   int64_t forced_splits, const at::Tensor& out, const at::Tensor& lse) {
  constexpr int64_t W = kVecWidth<T>;
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  const int64_t batch = q.size(0), heads = q.size(1), nq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  const int64_t nk = k.size(2), dim_v = v.size(3);
  const int64_t dim_v_padded = round_up(dim_v, W);
  const int64_t rows = group * nq;  // query rows of a work item
  const Band& band = mask.band;
  // One query block holds all Nq rows: a tile's state is then per (batch, head, key block).
  const MaskTiles mask_tiles = mask.tensor.defined() ? MaskTiles(mask.tensor, nq, kBlockK) : MaskTiles();

  // The keys some query sees, in whole blocks (aligned as the mask tiles are), cut into splits.
  const int64_t k_begin = std::clamp<int64_t>(band.first_key(0), 0, nk) / kBlockK * kBlockK;
  const int64_t k_end = std::clamp<int64_t>(band.last_key(nq - 1) + 1, k_begin, nk);
  const int64_t blocks = ceil_div(k_end - k_begin, kBlockK);
  const int64_t splits = forced_splits > 0 ? forced_splits
                                           : std::clamp<int64_t>(ceil_div(kTargetItems, batch * kv_heads), 1,
                                                                 std::max<int64_t>(1, blocks / kMinBlocksPerSplit));

  const Strided4<const scalar_t> q_view(q);
  const Strided4<const scalar_t> k_view(k);
  // v is read as whole rows (P·V's B operand), in place when it can be.
  const BlockReader<scalar_t, T> v_reader(Strided4<const scalar_t>(v), dim_v, dim_v_padded, /*whole_rows=*/true);
  const Strided4<const scalar_t> v_view(v);
  const Strided4<scalar_t> out_view(out);
  T* const lse_data = lse.data_ptr<T>();
  const int64_t lse_stride_b = lse.stride(0), lse_stride_h = lse.stride(1), lse_stride_n = lse.stride(2);

  // Row r of (b, kv head) written out: output row (b, h, i) and its lse, from `row` (Dv_padded,
  // normalised) — or 0 and -inf.
  const auto write_row = [&](int64_t b, int64_t h_kv, int64_t r, T* row, T row_lse) {
    const int64_t h = h_kv * group + r / nq, i = r % nq;
    store_row(row, out_view.row(b, h, i), out_view.stride_d, dim_v);
    lse_data[b * lse_stride_b + h * lse_stride_h + i * lse_stride_n] = row_lse;
  };

  // With more than one split, each leaves its rows here: (B·Hk·S, R, Dv_padded) and (B·Hk·S, R).
  const int64_t parts = splits > 1 ? batch * kv_heads * splits : 0;
  Scratch<T> part_out(parts * rows * dim_v_padded);
  Scratch<T> part_lse(parts * rows);

  using Carver = ScratchCarver<T>;
  const int64_t scratch_size = Carver::padded(rows * dim) + Carver::padded(dim * kBlockK) +
                               Carver::padded(rows * kBlockK) + Carver::padded(kBlockK * nq) +
                               Carver::padded(rows * dim_v_padded) + 2 * Carver::padded(rows) +
                               Carver::padded(v_reader.scratch_size(kBlockK));

  for_each_item(batch * kv_heads * splits, [&](ItemQueue& items) {
    Scratch<T> scratch(scratch_size);
    Carver carve(scratch.get());
    T* q_s = carve.take(rows * dim);             // (R, D): the group's query rows, times scale
    T* k_t = carve.take(dim * kBlockK);          // (D, block_k): the key block, transposed
    T* s = carve.take(rows * kBlockK);           // (R, block_k): scores, then probabilities
    T* mask_tile = carve.take(kBlockK * nq);     // (block_k, Nq): one head's scores as mask_tiles lays them
    T* acc = carve.take(rows * dim_v_padded);    // (R, Dv_padded): unnormalised output rows
    T* row_max = carve.take(rows);
    T* row_sum = carve.take(rows);
    T* v_scratch = carve.take(v_reader.scratch_size(kBlockK));
    std::vector<TileState> states(group);  // the mask's verdict on the block, per head of the group

    for (int64_t item; items.next(item);) {
      const int64_t split = item % splits, b = item / splits / kv_heads, h_kv = item / splits % kv_heads;
      const int64_t k_first = k_begin + split * blocks / splits * kBlockK;
      const int64_t k_last = std::min(k_end, k_begin + (split + 1) * blocks / splits * kBlockK);

      // Row r = g·Nq + i of q_s is query i of the group's head g.
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* src = q_view.row(b, h_kv * group + r / nq, r % nq);
        for (int64_t d = 0; d < dim; ++d) {
          q_s[r * dim + d] = static_cast<T>(src[d * q_view.stride_d]) * scale;
        }
      }
      // A sink enters once: in the first split's rows (the merge then weighs it with that split).
      fill(row_max, rows, kMinusInf);
      fill(row_sum, rows, T(0));
      if (split == 0 && mask.scores.has_sinks()) {
        for (int64_t r = 0; r < rows; ++r) {
          row_max[r] = mask.scores.sink<T>(h_kv * group + r / nq);
          row_sum[r] = T(1);
        }
      }
      fill(acc, rows * dim_v_padded, T(0));

      for (int64_t k0 = k_first; k0 < k_last; k0 += kBlockK) {
        const int64_t k_rows = std::min(kBlockK, k_last - k0), width = round_up(k_rows, W);
        // Skip a block nobody sees: outside every query's band, or hidden from every head by the mask.
        if (!band.touches(0, nq, k0, k0 + k_rows)) {
          continue;
        }
        bool any_seen = false;
        for (int64_t g = 0; g < group; ++g) {
          states[g] = mask_tiles.state(b, h_kv * group + g, 0, k0);
          any_seen = any_seen || states[g] != TileState::kHidden;
        }
        if (!any_seen) {
          continue;
        }
        // Sᵀ = Q · Kᵀ: the R rows of scores, keys along the vector; keys past k_rows are -inf.
        // While the block is read, the next block's k and v rows are prefetched, a slice at a time.
        const int64_t next = std::min(kBlockK, k_last - k0 - k_rows);  // the next block's keys
        read_transposed(k_view, b, h_kv, k0, k_rows, dim, k_t, kBlockK, [&](int64_t j0, int64_t count) {
          const int64_t ahead = std::clamp<int64_t>(next - j0, 0, count);
          prefetch_rows(k_view, b, h_kv, k0 + k_rows + j0, ahead, dim);
          prefetch_rows(v_view, b, h_kv, k0 + k_rows + j0, ahead, dim_v);
        });
        gemm<T>(rows, width, dim, q_s, dim, 1, k_t, kBlockK, s, kBlockK, /*accumulate=*/false);
        for (int64_t r = 0; r < rows; ++r) {
          if (mask.scores.modify_scores()) {  // row r: query r % Nq of head h_kv·group + r / Nq
            const ScoreMods& mods = mask.scores;
            const T slope = mods.has_alibi() ? static_cast<T>(mods.slope(b, h_kv * group + r / nq)) : T(0);
            modify_score_row(mods, slope, r % nq + band.offset - k0, width, s + r * kBlockK);
          }
          fill(s + r * kBlockK + k_rows, width - k_rows, kMinusInf);
        }
        // The band's hidden pairs, then the tensor mask (which works on transposed tiles), to -inf.
        if (!band.covers(0, nq, k0, k0 + k_rows)) {
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t j = 0; j < k_rows; ++j) {
              if (!band.visible(r % nq, k0 + j)) {
                s[r * kBlockK + j] = kMinusInf;
              }
            }
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          T* head_rows = s + g * nq * kBlockK;
          if (states[g] == TileState::kHidden) {
            fill(head_rows, nq * kBlockK, kMinusInf);
          } else if (states[g] == TileState::kPartial) {
            for (int64_t i = 0; i < nq; ++i) {
              for (int64_t j = 0; j < k_rows; ++j) {
                mask_tile[j * nq + i] = head_rows[i * kBlockK + j];
              }
            }
            mask_tiles.apply(b, h_kv * group + g, 0, nq, k0, k_rows, mask_tile, nq);
            for (int64_t i = 0; i < nq; ++i) {
              for (int64_t j = 0; j < k_rows; ++j) {
                head_rows[i * kBlockK + j] = mask_tile[j * nq + i];
              }
            }
          }
        }

        // Online softmax along each row: a row that has seen only hidden pairs keeps max -inf, and
        // exponentiates against 0 instead (exp gives 0, not NaN).
        for (int64_t r = 0; r < rows; ++r) {
          T* row = s + r * kBlockK;
          Vec<T> top(kMinusInf);
          for (int64_t j = 0; j < width; j += W) {
            top = at::vec::maximum(top, Vec<T>::loadu(row + j));
          }
          T lanes[W];
          top.store(lanes);
          const T new_max = std::max(row_max[r], *std::max_element(lanes, lanes + W));
          const T safe_max = new_max == kMinusInf ? T(0) : new_max;
          Vec<T> block_sum(T(0));
          for (int64_t j = 0; j < width; j += W) {
            const Vec<T> p = vec_exp<T>(Vec<T>::loadu(row + j) - Vec<T>(safe_max));
            p.store(row + j);
            block_sum = block_sum + p;
          }
          const T alpha = std::exp(row_max[r] - safe_max);
          block_sum.store(lanes);
          T total = 0;
          for (int64_t l = 0; l < W; ++l) {  // lanes in order: the sum does not depend on the threads
            total += lanes[l];
          }
          row_sum[r] = alpha * row_sum[r] + total;
          row_max[r] = new_max;
          if (alpha != T(1)) {
            const Vec<T> scale_by(alpha);
            for (int64_t d = 0; d < dim_v_padded; d += W) {
              (Vec<T>::loadu(acc + r * dim_v_padded + d) * scale_by).store(acc + r * dim_v_padded + d);
            }
          }
        }

        // acc (R x Dv) += P (R x k_rows) · v rows.
        const RowBlock<T> v_block = v_reader.read(b, h_kv, k0, k_rows, v_scratch);
        gemm<T>(rows, dim_v_padded, k_rows, s, /*a_row=*/kBlockK, /*a_col=*/1, v_block.data, v_block.row_stride, acc,
                dim_v_padded, /*accumulate=*/true);
      }

      // The split's rows, normalised, with their lse: to the output when it is the only split.
      const int64_t part = item;  // (b, h_kv, split), split fastest
      for (int64_t r = 0; r < rows; ++r) {
        T* acc_row = acc + r * dim_v_padded;
        const bool seen = row_sum[r] > T(0);
        const Vec<T> inv_sum(seen ? T(1) / row_sum[r] : T(0));
        for (int64_t d = 0; d < dim_v_padded; d += W) {
          (Vec<T>::loadu(acc_row + d) * inv_sum).store(acc_row + d);
        }
        const T row_lse = seen ? row_max[r] + std::log(row_sum[r]) : kMinusInf;
        if (splits == 1) {
          write_row(b, h_kv, r, acc_row, row_lse);
        } else {
          std::copy(acc_row, acc_row + dim_v_padded, part_out.get() + (part * rows + r) * dim_v_padded);
          part_lse.get()[part * rows + r] = row_lse;
        }
      }
    }
  });
  if (splits == 1) {
    return;
  }

  // The merge, splits in order: out = Σ_s exp(lse_s - lse) · out_s, lse = log Σ_s exp(lse_s).
  for_each_item(batch * kv_heads, [&](ItemQueue& items) {
    Scratch<T> row_scratch(dim_v_padded);
    T* merged = row_scratch.get();
    for (int64_t item; items.next(item);) {
      const int64_t b = item / kv_heads, h_kv = item % kv_heads;
      const T* lses = part_lse.get() + item * splits * rows;        // [split][r]
      const T* outs = part_out.get() + item * splits * rows * dim_v_padded;
      for (int64_t r = 0; r < rows; ++r) {
        T top = kMinusInf;
        for (int64_t s = 0; s < splits; ++s) {
          top = std::max(top, lses[s * rows + r]);
        }
        fill(merged, dim_v_padded, T(0));
        if (top == kMinusInf) {  // no split saw a key
          write_row(b, h_kv, r, merged, kMinusInf);
          continue;
        }
        T total = 0;
        for (int64_t s = 0; s < splits; ++s) {
          total += std::exp(lses[s * rows + r] - top);  // exp(-inf) = 0: an empty split weighs 0
        }
        for (int64_t s = 0; s < splits; ++s) {
          const T weight = std::exp(lses[s * rows + r] - top) / total;
          if (weight == T(0)) {
            continue;
          }
          const Vec<T> w(weight);
          const T* part = outs + (s * rows + r) * dim_v_padded;
          for (int64_t d = 0; d < dim_v_padded; d += W) {
            at::vec::fmadd(w, Vec<T>::loadu(part + d), Vec<T>::loadu(merged + d)).store(merged + d);
          }
        }
        write_row(b, h_kv, r, merged, top + std::log(total));
      }
    }
  });
}

}  // namespace

bool decode_path_applies(const at::Tensor& q, const at::Tensor& k) {
  return q.size(2) * (q.size(1) / k.size(1)) <= kMaxRows && decode_splits_setting() != 0;
}

void attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                      double scale, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t forced_splits = std::max<int64_t>(decode_splits_setting(), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    decode_kernel<scalar_t, acc_t>(q, k, v, mask, static_cast<acc_t>(scale), forced_splits, out, lse);
  });
}

}  // namespace selfattn::SELFATTN_CPU_NS
