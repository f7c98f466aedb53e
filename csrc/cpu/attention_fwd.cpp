// CPU forward of attention: out = softmax(scale * q kᵀ + mask) v, and the logsumexp of each row.
//
// Tiled with online softmax: one work item is one (batch, head, block of queries); key
// blocks stream through it, and only a running max and sum per query are kept, so no
// Nq x Nk matrix ever exists. Scores are held transposed (key rows x query columns):
// the max and sum of each query are then vectors across columns, the softmax needs no
// horizontal reductions, and the tile GEMM (which broadcasts A elements one at a time)
// reads the transposed probabilities for P·V at no cost.
//
// Masks (mask.h): only the key blocks the band reaches are streamed, and of those only the ones a
// tensor mask does not hide entirely (mask_tiles.h); tiles the band cuts at the top skip the
// pairs nobody sees a slab at a time (tile.h). A query that sees no key gets output 0 and lse
// -inf. Grouped-query attention: query head h reads kv head h / (Hq / Hk).
//
// Dropout (philox.h): each tile's probabilities, once the running sum has taken them, are
// multiplied by 1/(1 - p) or 0 (dropout_tiles.h) before P·V, so lse stays the dropout-free one and
// out = (P ∘ keep / (1 - p)) v.
#include "kernels.h"
#include "dropout_tiles.h"
#include "attention_bf16.h"
#include "mask_tiles.h"
#include "score_mods.h"
#include "tile.h"
#include "blocking.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <optional>

namespace selfattn::SELFATTN_CPU_NS {
namespace {

// Keys per step of the stream (rows of the score tile): the split of the softmax reduction, so a
// constant. The queries per work item (columns) come from the caches (blocking.h).
constexpr int64_t kBlockK = 64;
constexpr int64_t kMaxBlockQ = 128;
constexpr int64_t kMaxBlockQBf16 = 64;  // the bf16 GEMMs' packed operands (brgemm: B at most 64 wide)

// q: (B, Hq, Nq, D), k: (B, Hk, Nk, D), v: (B, Hk, Nk, Dv), out: (B, Hq, Nq, Dv): scalar_t, any strides
// lse: (B, Hq, Nq) T, any strides. T (float, or double for double) is the accumulation type.
template <typename scalar_t, typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask, T scale,
                    const at::Tensor& out, const at::Tensor& lse) {
  constexpr int64_t W = kVecWidth<T>;
  const int64_t batch = q.size(0), heads = q.size(1), nq = q.size(2), dim = q.size(3);
  const int64_t group = heads / k.size(1);  // query heads per kv head
  const int64_t nk = k.size(2), dim_v = v.size(3), dim_v_padded = round_up(dim_v, W);
  const int64_t block_k = kBlockK;
  const Band& band = mask.band;
  // Under a bounded right side later query blocks see more keys: they go first, so the cheap ones
  // fill the threads' last gaps (for_each_item hands items out in order).
  const bool uneven = band.right < kUnbounded;
  const Dropout& dropout = mask.dropout;
  const PhiloxKey dropout_key = dropout.active() ? dropout.key() : PhiloxKey{0, 0};

  const Strided4<const scalar_t> q_view(q);
  // bfloat16 on a CPU with AVX512-BF16: the two GEMMs run on bf16 operands (attention_bf16.h);
  // otherwise they run in T on blocks converted to it.
  constexpr bool kMayUseBf16 = std::is_same_v<scalar_t, c10::BFloat16> && kBf16KernelsCompiled;
  const bool use_bf16 = kMayUseBf16 && bf16_kernels_enabled();
  const bool bf16_brgemm = use_bf16 && bf16_gemm_uses_brgemm();
  const int64_t cache_block_q = forward_query_block(cpu_caches(), dim, dim_v_padded, sizeof(T), W, block_k,
                                                    use_bf16 ? kMaxBlockQBf16 : kMaxBlockQ);
  const int64_t block_q = balanced_query_block(std::max<int64_t>(nq, 1), cache_block_q, W);
  const int64_t q_blocks = ceil_div(nq, block_q);
  const MaskTiles mask_tiles = mask.tensor.defined() ? MaskTiles(mask.tensor, block_q, block_k) : MaskTiles();
  // k is read element by element (the score GEMM's A operand), v as whole rows (P·V's B operand).
  const BlockReader<scalar_t, T> k_reader(Strided4<const scalar_t>(k), dim, dim, /*whole_rows=*/false);
  const BlockReader<scalar_t, T> v_reader(Strided4<const scalar_t>(v), dim_v, dim_v_padded, /*whole_rows=*/true);
  const Strided4<scalar_t> out_view(out);
  T* const lse_data = lse.data_ptr<T>();
  const int64_t lse_stride_b = lse.stride(0), lse_stride_h = lse.stride(1), lse_stride_n = lse.stride(2);

  using Carver = ScratchCarver<T>;
  const int64_t scratch_size = Carver::padded(dim * block_q) + Carver::padded(block_k * block_q) +
                               Carver::padded(block_q * dim_v_padded) + 3 * Carver::padded(block_q) +
                               Carver::padded(k_reader.scratch_size(block_k)) +
                               Carver::padded(v_reader.scratch_size(block_k));

  for_each_item(batch * heads * q_blocks, [&](ItemQueue& items) {
    Scratch<T> scratch(scratch_size);
    Carver carve(scratch.get());
    T* q_t = carve.take(dim * block_q);           // (D, block_q): the block's queries as columns, times scale
    T* p_t = carve.take(block_k * block_q);       // (block_k, block_q): scores, then probabilities
    T* acc = carve.take(block_q * dim_v_padded);  // (block_q, Dv_padded): unnormalized output rows
    T* row_max = carve.take(block_q);             // running max of each query's scores
    T* row_sum = carve.take(block_q);             // running sum of exp(score - row_max)
    T* rescale = carve.take(block_q);             // exp(old max - new max), per query
    T* k_scratch = carve.take(k_reader.scratch_size(block_k));  // a key block in T, if k is not
    T* v_scratch = carve.take(v_reader.scratch_size(block_k));  // a value block, padded rows
    std::optional<ForwardBf16> bf16;
    if (use_bf16) {
      bf16.emplace(dim, dim_v, dim_v_padded, block_q, block_k, bf16_brgemm);
    }

    for (int64_t item; items.next(item);) {
      const int64_t bh = item / q_blocks, b = bh / heads, h = bh % heads, h_kv = h / group;
      const int64_t rank = item % q_blocks;
      const int64_t q0 = (uneven ? q_blocks - 1 - rank : rank) * block_q;
      const int64_t q_rows = std::min(block_q, nq - q0);

      // 1. The block's queries as columns, with the scale folded in; padding columns are zero.
      if (use_bf16) {
        if constexpr (kMayUseBf16) {
          bf16->pack_queries(Bf16View(q), b, h, q0, q_rows);
        }
      } else {
        pack_columns(q_view, b, h, q0, q_rows, dim, scale, q_t, block_q);
      }
      sink_row_start(mask.scores, h, block_q, row_max, row_sum);
      fill(acc, block_q * dim_v_padded, T(0));

      // Only the key blocks (aligned to block_k, as the mask's tiles are) that the band reaches.
      const int64_t k_begin = std::max<int64_t>(0, band.first_key(q0)) / block_k * block_k;
      const int64_t k_end = std::min(nk, band.last_key(q0 + q_rows - 1) + 1);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += block_k) {
        const int64_t k_rows = std::min(block_k, k_end - k0);
        const TileState tile = mask_tiles.state(b, h, q0, k0);
        if (tile == TileState::kHidden) {
          continue;
        }

        // 2. Scores, transposed: p_t (k_rows x block_q) = k rows · q_t. A tile that the band cuts
        //    (the causal diagonal, a window's far edge) skips the pairs nobody sees, a slab at a
        //    time; then every hidden pair is set to -inf.
        const bool cut = band_cuts(band, q0, q_rows, k0, k_rows);
        const MaskCut band_cols = band_cut(band, q0, k0);
        if (use_bf16) {
          if constexpr (kMayUseBf16) {
            bf16->scores(Bf16View(k), b, h_kv, k0, k_rows, cut ? &band_cols : nullptr, scale, p_t);
          }
        } else if (!cut) {
          const RowBlock<T> k_block = k_reader.read(b, h_kv, k0, k_rows, k_scratch);
          gemm<T>(k_rows, block_q, dim, k_block.data, k_block.row_stride, k_block.col_stride, q_t, block_q, p_t,
                  block_q, /*accumulate=*/false);
        } else {
          const RowBlock<T> k_block = k_reader.read(b, h_kv, k0, k_rows, k_scratch);
          gemm_keys_x_queries<T>(band_cols, k_rows, block_q, dim, k_block.data, k_block.row_stride, k_block.col_stride,
                                 q_t, block_q, p_t, block_q, /*accumulate=*/false);
        }
        if (mask.scores.modify_scores()) {
          modify_scores(mask.scores, b, h, band.offset, q0, block_q, k0, k_rows, p_t, block_q);
        }
        if (cut) {
          mask_band(band_cols, k_rows, block_q, p_t, block_q, -std::numeric_limits<T>::infinity());
        }
        if (tile == TileState::kPartial) {
          mask_tiles.apply(b, h, q0, q_rows, k0, k_rows, p_t, block_q);
        }

        // 3. Online softmax down each column: new max, probabilities, and the factor
        //    that brings what was accumulated under the old max to the new one. A column that has
        //    seen only hidden pairs keeps max -inf; 0 stands in for it, so exp gives 0, not NaN.
        const Vec<T> minus_inf(-std::numeric_limits<T>::infinity());
        for (int64_t c = 0; c < block_q; c += W) {
          const Vec<T> old_max = Vec<T>::loadu(row_max + c);
          Vec<T> new_max = old_max;
          for (int64_t j = 0; j < k_rows; ++j) {
            new_max = at::vec::maximum(new_max, Vec<T>::loadu(p_t + j * block_q + c));
          }
          const Vec<T> safe_max = Vec<T>::blendv(new_max, Vec<T>(T(0)), new_max == minus_inf);
          Vec<T> block_sum(T(0));
          for (int64_t j = 0; j < k_rows; ++j) {
            const Vec<T> p = vec_exp<T>(Vec<T>::loadu(p_t + j * block_q + c) - safe_max);
            p.store(p_t + j * block_q + c);
            block_sum = block_sum + p;
          }
          const Vec<T> alpha = vec_exp<T>(old_max - safe_max);  // 0 on the first block
          at::vec::fmadd(alpha, Vec<T>::loadu(row_sum + c), block_sum).store(row_sum + c);
          alpha.store(rescale + c);
          new_max.store(row_max + c);
        }
        for (int64_t i = 0; i < q_rows; ++i) {
          if (rescale[i] != T(1)) {
            const Vec<T> alpha(rescale[i]);
            for (int64_t d = 0; d < dim_v_padded; d += W) {
              (Vec<T>::loadu(acc + i * dim_v_padded + d) * alpha).store(acc + i * dim_v_padded + d);
            }
          }
        }

        // Dropout: the kept probabilities scaled by 1/(1 - p), the others 0 (after the sum above).
        if (dropout.active()) {
          dropout_tile</*kMultiply=*/true>(dropout, dropout_key, b, h, q0, q_rows, k0, k_rows, p_t, block_q);
        }

        // 4-5. Weight each value row by its probability and sum per query:
        //      acc (q_rows x Dv) += P (q_rows x k_rows) · v rows, P read through p_t's transpose.
        if (use_bf16) {
          if constexpr (kMayUseBf16) {
            bf16->add_probs_times_values(p_t, k_rows, q_rows, Bf16View(v), b, h_kv, k0, cut ? &band_cols : nullptr,
                                         acc);
          }
          continue;
        }
        const RowBlock<T> v_block = v_reader.read(b, h_kv, k0, k_rows, v_scratch);
        if (!cut) {
          gemm<T>(q_rows, dim_v_padded, k_rows, p_t, /*a_row=*/1, /*a_col=*/block_q, v_block.data, v_block.row_stride,
                  acc, dim_v_padded, /*accumulate=*/true);
        } else {
          gemm_queries_x_keys<T>(band_cols, q_rows, dim_v_padded, k_rows, p_t, 1, block_q, v_block.data,
                                 v_block.row_stride, acc, dim_v_padded);
        }
      }

      // 6. Normalize and write the rows out, with their logsumexp.
      //    A row that saw no key (sum 0) is written as 0 with lse -inf (with a sink: sum 1, acc 0, so
      //    output 0 and lse the sink's logit).
      for (int64_t i = 0; i < q_rows; ++i) {
        T* acc_row = acc + i * dim_v_padded;
        const bool seen = row_sum[i] > T(0);
        const Vec<T> inv_sum(seen ? T(1) / row_sum[i] : T(0));
        for (int64_t d = 0; d < dim_v_padded; d += W) {
          (Vec<T>::loadu(acc_row + d) * inv_sum).store(acc_row + d);
        }
        store_row(acc_row, out_view.row(b, h, q0 + i), out_view.stride_d, dim_v);
        lse_data[b * lse_stride_b + h * lse_stride_h + (q0 + i) * lse_stride_n] =
            seen ? row_max[i] + std::log(row_sum[i]) : -std::numeric_limits<T>::infinity();
      }
    }
  });
}

}  // namespace

std::string bf16_tile_gemm() {
  if (!kBf16KernelsCompiled || !bf16_kernels_enabled()) {
    return "float32";
  }
  if (!bf16_gemm_uses_brgemm()) {
    return "avx512bf16";
  }
  return cpu_has_amx_bf16() ? "onednn-brgemm (AMX)" : "onednn-brgemm (AVX512-BF16)";
}

void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                       double scale, const at::Tensor& out, const at::Tensor& lse) {
  if (q.size(2) == 0 || q.size(0) * q.size(1) == 0) {
    return;
  }
  if (k.size(2) == 0) {  // no key to attend to: an empty sum
    write_empty_rows(mask, out, lse);
    return;
  }
  // Few query rows, a long cache: split the keys instead. Dropout stays on the tiled path, whose
  // keep mask the backward regenerates tile by tile.
  if (!mask.dropout.active() && decode_path_applies(q, k)) {
    return attention_decode(q, k, v, mask, scale, out, lse);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(q, k, v, mask, static_cast<acc_t>(scale), out, lse);
  });
}

}  // namespace selfattn::SELFATTN_CPU_NS
