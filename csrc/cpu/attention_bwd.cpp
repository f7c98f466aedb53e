// CPU backward of attention: dq, dk, dv from dout, recomputing the probabilities from
// the forward's logsumexp (P = exp(scale * q kᵀ - lse)), never storing an Nq x Nk matrix.
//
// With S = scale * q kᵀ, P = softmax(S), out = P v:
//   dv = Pᵀ dout
//   dP = dout vᵀ,  dS = P ∘ (dP - rowsum(dout ∘ out))
//   dq = scale * dS k,   dk = scale * dSᵀ q
// (the kernels fold `scale` into dS, so nothing is rescaled afterwards).
// With dropout (philox.h; keep mask Z regenerated from the saved rng_state, M = Z / (1 - p)),
// out = (P ∘ M) v, so
//   dv = (P ∘ M)ᵀ dout,  dS = P ∘ (M ∘ dP - rowsum(dout ∘ out))
// (rowsum(dout ∘ out) is still rowsum((M ∘ dP) ∘ P), FlashAttention's delta, with out dropped).
//
// Work item: one (batch, kv head, share of the key blocks). The key blocks' dk and dv are
// summed over every query block of every query head of the kv head's group (grouped-query
// attention: query head h reads kv head h / (Hq / Hk)), in a fixed order, in scratch, and
// written once; dq is summed into a buffer per work item and query head, and the buffers of one
// (batch, head) are added in a fixed order at the end (deterministic). A (batch, kv head) is split
// over several work items only when there are fewer of them than threads.
// As in the forward, score tiles are transposed: key rows x query columns, and masks (mask.h)
// skip the tiles nobody sees. A row whose lse is -inf (it saw no key) has P = 0.
#include "kernels.h"
#include "dropout_tiles.h"
#include "attention_bf16.h"
#include "mask_tiles.h"
#include "score_mods.h"
#include "tile.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace selfattn::SELFATTN_CPU_NS {
namespace {

constexpr int64_t kBlockQ = 64;  // queries per tile (columns)
constexpr int64_t kBlockK = 64;  // keys per tile (rows), the unit of work splitting

enum class Packed : uint8_t { kNo, kYes };  // whether a query block's operands are prepared

struct BackwardShape {
  int64_t batch, heads, heads_kv, group, nq, nk, dim, dim_v;
  int64_t dim_padded, dim_v_padded;  // row widths of the GEMM operands
  int64_t block_q, block_k, q_blocks, k_blocks;
  int64_t splits;          // work items per (batch, kv head)
  int64_t blocks_per_split;
};

// grad_out (dO), out: (B, Hq, Nq, Dv), q: (B, Hq, Nq, D), k: (B, Hk, Nk, D), v: (B, Hk, Nk, Dv):
//          scalar_t, any strides;  lse: (B, Hq, Nq) T, any strides
// dq_sums: (B, Hq, splits, Nq, D_padded) T, unit last stride, zeroed: where each work item sums
//          its dq (grad_q itself when its rows can take that); undefined when one work item
//          covers a (batch, kv head) but grad_q cannot: it then sums in scratch and writes grad_q.
// grad_q, grad_k, grad_v: the shapes of q, k, v, scalar_t, any strides
template <typename scalar_t, typename T>
void backward_kernel(const BackwardShape& s, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask,
                     T scale, const at::Tensor& dq_sums, const at::Tensor& grad_q, const at::Tensor& grad_k,
                     const at::Tensor& grad_v) {
  constexpr int64_t W = kVecWidth<T>;
  const Strided4<const scalar_t> do_view(grad_out), q_view(q), k_view(k), v_view(v), out_view(out);
  // Rows in T for the tile GEMMs (tile.h): q, k and dO are read as whole rows (B operands), v
  // element by element; each is converted a block at a time unless it can be read in place.
  const BlockReader<scalar_t, T> q_reader(q_view, s.dim, s.dim_padded, /*whole_rows=*/true);
  const BlockReader<scalar_t, T> k_reader(k_view, s.dim, s.dim_padded, /*whole_rows=*/true);
  const BlockReader<scalar_t, T> do_reader(do_view, s.dim_v, s.dim_v_padded, /*whole_rows=*/true);
  const BlockReader<scalar_t, T> v_reader(v_view, s.dim_v, s.dim_v, /*whole_rows=*/false);
  const Strided4<scalar_t> dq_view(grad_q), dk_view(grad_k), dv_view(grad_v);
  const T* lse_data = lse.data_ptr<T>();
  const bool dq_in_scratch = !dq_sums.defined();
  T* const dq_data = dq_in_scratch ? nullptr : dq_sums.data_ptr<T>();
  const int64_t dq_stride_n = dq_in_scratch ? s.dim_padded : dq_sums.stride(3);
  const int64_t block_q = s.block_q, block_k = s.block_k;
  const int64_t nq_padded = s.q_blocks * block_q;
  const int64_t split_keys = s.blocks_per_split * block_k;  // dk/dv rows one work item sums
  const Band& band = mask.band;
  const MaskTiles mask_tiles = mask.tensor.defined() ? MaskTiles(mask.tensor, block_q, block_k) : MaskTiles();
  const Dropout& dropout = mask.dropout;
  const PhiloxKey dropout_key = dropout.active() ? dropout.key() : PhiloxKey{0, 0};
  // bfloat16 on a CPU with AVX512-BF16: the five GEMMs run on bf16 operands (attention_bf16.h).
  constexpr bool kMayUseBf16 = std::is_same_v<scalar_t, c10::BFloat16> && kBf16KernelsCompiled;
  const bool use_bf16 = kMayUseBf16 && bf16_kernels_enabled();
  const bool bf16_brgemm = use_bf16 && bf16_gemm_uses_brgemm();
  const bool softcap = mask.scores.has_softcap();

  using Carver = ScratchCarver<T>;
  const int64_t scratch_size =
      Carver::padded(s.dim * nq_padded) + Carver::padded(s.dim_v * nq_padded) + 2 * Carver::padded(nq_padded) +
      (2 + (dropout.active() ? 1 : 0) + (softcap ? 1 : 0)) * Carver::padded(block_k * block_q) +
      Carver::padded(split_keys * s.dim_padded) + Carver::padded(split_keys * s.dim_v_padded) +
      Carver::padded(q_reader.scratch_size(block_q)) + Carver::padded(do_reader.scratch_size(block_q)) +
      Carver::padded(k_reader.scratch_size(block_k)) + Carver::padded(v_reader.scratch_size(block_k)) +
      (dq_in_scratch ? Carver::padded(s.nq * s.dim_padded) : 0);

  for_each_item(s.batch * s.heads_kv * s.splits, [&](ItemQueue& items) {
    Scratch<T> scratch(scratch_size);
    Carver carve(scratch.get());
    // Query blocks as columns, block after block: block qb is a (D, block_q) panel at
    // q_t + qb * D * block_q (a tile's GEMM then reads 64 contiguous rows, where columns of one
    // (D, Nq) matrix lay Nq apart and met in the same few L1 sets).
    T* q_t = carve.take(s.dim * nq_padded);      // queries times scale
    T* do_t = carve.take(s.dim_v * nq_padded);   // rows of dO
    T* lse_row = carve.take(nq_padded);          // lse per query; +inf on padding so P = 0 there
    T* delta = carve.take(nq_padded);            // rowsum(dO ∘ out) per query
    T* p_t = carve.take(block_k * block_q);      // (block_k, block_q): P, transposed
    T* ds_t = carve.take(block_k * block_q);     // (block_k, block_q): dP, then dS, transposed
    T* keep_t = dropout.active() ? carve.take(block_k * block_q) : nullptr;  // M = keep / (1 - p)
    T* tanh_t = softcap ? carve.take(block_k * block_q) : nullptr;  // tanh(s / softcap), for dS's 1 - tanh²
    T* dk_sums = carve.take(split_keys * s.dim_padded);    // the work item's keys' dk, summed
    T* dv_sums = carve.take(split_keys * s.dim_v_padded);  // over the group's query heads
    T* q_scratch = carve.take(q_reader.scratch_size(block_q));  // blocks converted to T, when needed
    T* do_scratch = carve.take(do_reader.scratch_size(block_q));
    T* k_scratch = carve.take(k_reader.scratch_size(block_k));
    T* v_scratch = carve.take(v_reader.scratch_size(block_k));
    T* dq_scratch = dq_in_scratch ? carve.take(s.nq * s.dim_padded) : nullptr;  // (Nq, D_padded)
    // Query blocks of the current head packed so far. (An enum of this copy's namespace, not uint8_t:
    // std::vector<uint8_t>'s members compiled here for AVX-512 could be the ones the linker keeps
    // for the baseline code too; tests/test_dispatch.py checks.)
    std::vector<Packed> prepared(s.q_blocks);
    std::optional<BackwardBf16> bf16;
    if (use_bf16) {
      bf16.emplace(s.dim, s.dim_v, s.dim_padded, s.dim_v_padded, nq_padded, block_q, block_k, bf16_brgemm);
    }

    for (int64_t item; items.next(item);) {
      const int64_t bh_kv = item / s.splits, b = bh_kv / s.heads_kv, h_kv = bh_kv % s.heads_kv;
      const int64_t split = item % s.splits;
      const int64_t kb_begin = split * s.blocks_per_split;
      const int64_t kb_end = std::min(s.k_blocks, kb_begin + s.blocks_per_split);
      const int64_t key_base = kb_begin * block_k;  // row 0 of dk_sums / dv_sums
      fill(dk_sums, split_keys * s.dim_padded, T(0));
      fill(dv_sums, split_keys * s.dim_v_padded, T(0));

      for (int64_t h = h_kv * s.group; h < (h_kv + 1) * s.group; ++h) {  // the group, in order
        T* dq_acc = dq_scratch;
        if (dq_in_scratch) {
          fill(dq_scratch, s.nq * s.dim_padded, T(0));
        } else {
          dq_acc = dq_data + b * dq_sums.stride(0) + h * dq_sums.stride(1) + split * dq_sums.stride(2);
        }
        if (use_bf16) {
          if constexpr (kMayUseBf16) {
            bf16->pack_head(Bf16View(q), Bf16View(grad_out), b, h, s.nq);
          }
        }
        // A query block's operands, lse and delta, prepared when a tile first needs them: a work
        // item (a window's, a split's) then touches only the queries its keys meet.
        std::fill(prepared.begin(), prepared.end(), Packed::kNo);
        const auto prepare = [&](int64_t qb) {
          const int64_t q0 = qb * block_q, q_rows = std::min(block_q, s.nq - q0);
          if (!use_bf16) {
            pack_columns(q_view, b, h, q0, q_rows, s.dim, scale, q_t + qb * s.dim * block_q, block_q);
            pack_columns(do_view, b, h, q0, q_rows, s.dim_v, T(1), do_t + qb * s.dim_v * block_q, block_q);
          }
          for (int64_t i = q0; i < q0 + block_q; ++i) {
            // +inf stands in for padding and for rows that saw no key (lse -inf): P = 0 there.
            const T row_lse = i < s.nq ? lse_data[b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2)] : T(0);
            if (i < s.nq && row_lse > -std::numeric_limits<T>::infinity()) {
              lse_row[i] = row_lse;
              const scalar_t* do_row = do_view.row(b, h, i);
              const scalar_t* out_row = out_view.row(b, h, i);
              // In double: delta's rounding is not damped by P in dS = P ∘ (dP - delta), and it
              // is the float32 gradient's largest error where a row sees one or two keys.
              double dot = 0;
              for (int64_t d = 0; d < s.dim_v; ++d) {
                dot += static_cast<double>(do_row[d * do_view.stride_d]) *
                       static_cast<double>(out_row[d * out_view.stride_d]);
              }
              delta[i] = static_cast<T>(dot);
            } else {
              lse_row[i] = std::numeric_limits<T>::infinity();
              delta[i] = 0;
            }
          }
          prepared[qb] = Packed::kYes;
        };

        for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
          const int64_t k0 = kb * block_k, k_rows = std::min(block_k, s.nk - k0);
          T* dk_acc = dk_sums + (k0 - key_base) * s.dim_padded;
          T* dv_acc = dv_sums + (k0 - key_base) * s.dim_v_padded;
          RowBlock<T> k_block{}, v_block{};
          if (use_bf16) {
            if constexpr (kMayUseBf16) {
              bf16->pack_keys(Bf16View(k), Bf16View(v), b, h_kv, k0, k_rows);
            }
          } else {
            k_block = k_reader.read(b, h_kv, k0, k_rows, k_scratch);
            v_block = v_reader.read(b, h_kv, k0, k_rows, v_scratch);
          }

          // Only the query blocks that see some key of this block (the band's reach).
          const int64_t i_first = std::max<int64_t>(0, band.first_query(k0));
          const int64_t i_last = std::min(s.nq - 1, band.last_query(k0 + k_rows));
          for (int64_t qb = i_first / block_q; qb * block_q <= i_last; ++qb) {
            const int64_t q0 = qb * block_q, q_rows = std::min(block_q, s.nq - q0);
            // Keys past the query block's last query's reach are hidden for all of it.
            const int64_t kv_rows = std::min(k_rows, band.last_key(q0 + q_rows - 1) - k0 + 1);
            const TileState tile = mask_tiles.state(b, h, q0, k0);
            if (kv_rows <= 0 || !band.touches(q0, q0 + q_rows, k0, k0 + kv_rows) || tile == TileState::kHidden) {
              continue;
            }
            if (prepared[qb] == Packed::kNo) {
              prepare(qb);
            }
            const T* q_cols = q_t + qb * s.dim * block_q;  // (D, block_q), ld block_q
            const T* do_cols = do_t + qb * s.dim_v * block_q;
            RowBlock<T> q_block{}, do_block{};
            if (!use_bf16) {
              q_block = q_reader.read(b, h, q0, q_rows, q_scratch);
              do_block = do_reader.read(b, h, q0, q_rows, do_scratch);
            }
            // A tile the band cuts skips the pairs nobody sees (tile.h); every hidden pair's P and
            // dS is then set to 0.
            const bool cut = band_cuts(band, q0, q_rows, k0, kv_rows);
            const MaskCut band_cols = band_cut(band, q0, k0);

            // P (transposed) = exp(k · q_t + mask - lse), recomputed from the forward's logsumexp.
            if (use_bf16) {
              if constexpr (kMayUseBf16) {
                bf16->scores(cut ? &band_cols : nullptr, kv_rows, q0, scale, p_t);
              }
            } else if (!cut) {
              gemm<T>(kv_rows, block_q, s.dim, k_block.data, k_block.row_stride, 1, q_cols, block_q, p_t, block_q,
                      /*accumulate=*/false);
            } else {
              gemm_keys_x_queries<T>(band_cols, kv_rows, block_q, s.dim, k_block.data, k_block.row_stride, 1, q_cols,
                                     block_q, p_t, block_q, /*accumulate=*/false);
            }
            if (mask.scores.modify_scores()) {
              modify_scores(mask.scores, b, h, band.offset, q0, block_q, k0, kv_rows, p_t, block_q, tanh_t);
            }
            if (cut) {
              mask_band(band_cols, kv_rows, block_q, p_t, block_q, -std::numeric_limits<T>::infinity());
            }
            if (tile == TileState::kPartial) {
              mask_tiles.apply(b, h, q0, q_rows, k0, kv_rows, p_t, block_q);
            }
            for (int64_t j = 0; j < kv_rows; ++j) {
              T* p_row = p_t + j * block_q;
              for (int64_t c = 0; c < block_q; c += W) {
                vec_exp<T>(Vec<T>::loadu(p_row + c) - Vec<T>::loadu(lse_row + q0 + c)).store(p_row + c);
              }
            }

            // dP (transposed) = v · dO_t, then dS = P ∘ (dP - delta).
            if (use_bf16) {
              if constexpr (kMayUseBf16) {
                bf16->dprobs(cut ? &band_cols : nullptr, kv_rows, q0, ds_t);
              }
            } else if (!cut) {
              gemm<T>(kv_rows, block_q, s.dim_v, v_block.data, v_block.row_stride, v_block.col_stride, do_cols, block_q,
                      ds_t, block_q, /*accumulate=*/false);
            } else {
              gemm_keys_x_queries<T>(band_cols, kv_rows, block_q, s.dim_v, v_block.data, v_block.row_stride,
                                     v_block.col_stride, do_cols, block_q, ds_t, block_q, /*accumulate=*/false);
            }
            const Vec<T> scale_vec(scale);
            if (!dropout.active()) {
              for (int64_t j = 0; j < kv_rows; ++j) {
                for (int64_t c = 0; c < block_q; c += W) {
                  const Vec<T> p = Vec<T>::loadu(p_t + j * block_q + c);
                  const Vec<T> dp = Vec<T>::loadu(ds_t + j * block_q + c);
                  (p * (dp - Vec<T>::loadu(delta + q0 + c)) * scale_vec).store(ds_t + j * block_q + c);
                }
              }
            } else {
              // dS = P ∘ (M ∘ dP - delta); then P becomes P ∘ M for dv.
              dropout_tile</*kMultiply=*/false>(dropout, dropout_key, b, h, q0, block_q, k0, kv_rows, keep_t, block_q);
              for (int64_t j = 0; j < kv_rows; ++j) {
                for (int64_t c = 0; c < block_q; c += W) {
                  const Vec<T> p = Vec<T>::loadu(p_t + j * block_q + c);
                  const Vec<T> dp = Vec<T>::loadu(ds_t + j * block_q + c);
                  const Vec<T> m = Vec<T>::loadu(keep_t + j * block_q + c);
                  (p * (m * dp - Vec<T>::loadu(delta + q0 + c)) * scale_vec).store(ds_t + j * block_q + c);
                  (p * m).store(p_t + j * block_q + c);
                }
              }
            }
            if (softcap) {  // d softcap·tanh(s / softcap) / ds = 1 - tanh²
              softcap_backward(block_q, kv_rows, tanh_t, ds_t, block_q);
            }
            if (cut) {  // the skipped dP entries were never written: 0 * garbage may be NaN
              mask_band(band_cols, kv_rows, block_q, ds_t, block_q, T(0));
            }

            // dv (kv_rows x Dv) += Pᵀ · dO rows;  dk (kv_rows x D) += dSᵀ · q rows;
            // dq (q_rows x D) += dS · k rows (dS read through ds_t's transpose). dS includes scale.
            if (use_bf16) {
              if constexpr (kMayUseBf16) {
                bf16->add_gradients(cut ? &band_cols : nullptr, kv_rows, q_rows, q0, p_t, ds_t, dv_acc, dk_acc,
                                    dq_acc + q0 * dq_stride_n, dq_stride_n);
              }
            } else if (!cut) {
              gemm<T>(kv_rows, s.dim_v_padded, q_rows, p_t, block_q, 1, do_block.data, do_block.row_stride, dv_acc,
                      s.dim_v_padded, /*accumulate=*/true);
              gemm<T>(kv_rows, s.dim_padded, q_rows, ds_t, block_q, 1, q_block.data, q_block.row_stride, dk_acc,
                      s.dim_padded, /*accumulate=*/true);
              gemm<T>(q_rows, s.dim_padded, kv_rows, ds_t, 1, block_q, k_block.data, k_block.row_stride,
                      dq_acc + q0 * dq_stride_n, dq_stride_n, /*accumulate=*/true);
            } else {
              gemm_keys_x_queries_depth<T>(band_cols, kv_rows, s.dim_v_padded, q_rows, p_t, block_q, 1, do_block.data,
                                           do_block.row_stride, dv_acc, s.dim_v_padded);
              gemm_keys_x_queries_depth<T>(band_cols, kv_rows, s.dim_padded, q_rows, ds_t, block_q, 1, q_block.data,
                                           q_block.row_stride, dk_acc, s.dim_padded);
              gemm_queries_x_keys<T>(band_cols, q_rows, s.dim_padded, kv_rows, ds_t, 1, block_q, k_block.data,
                                     k_block.row_stride, dq_acc + q0 * dq_stride_n, dq_stride_n);
            }
          }
        }
        if (dq_in_scratch) {
          for (int64_t i = 0; i < s.nq; ++i) {
            store_row(dq_scratch + i * s.dim_padded, dq_view.row(b, h, i), dq_view.stride_d, s.dim);
          }
        }
      }

      for (int64_t j = key_base; j < std::min(s.nk, kb_end * block_k); ++j) {
        store_row(dk_sums + (j - key_base) * s.dim_padded, dk_view.row(b, h_kv, j), dk_view.stride_d, s.dim);
        store_row(dv_sums + (j - key_base) * s.dim_v_padded, dv_view.row(b, h_kv, j), dv_view.stride_d, s.dim_v);
      }
    }
  });
}

// dq[b, h, i] = the sum of the work items' partial sums, in split order (deterministic).
template <typename scalar_t, typename T>
void reduce_grad_q(const BackwardShape& s, const at::Tensor& dq_sums, const at::Tensor& grad_q) {
  constexpr int64_t W = kVecWidth<T>;
  const T* partial = dq_sums.data_ptr<T>();  // contiguous (B, H, splits, Nq, D_padded)
  const Strided4<scalar_t> dq_view(grad_q);
  at::parallel_for(0, s.batch * s.heads * s.nq, 64, [&](int64_t begin, int64_t end) {
    Scratch<T> row_sum(s.dim_padded);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / s.nq, i = row % s.nq;
      const T* first = partial + (bh * s.splits * s.nq + i) * s.dim_padded;
      for (int64_t d = 0; d < s.dim_padded; d += W) {
        Vec<T> sum = Vec<T>::loadu(first + d);
        for (int64_t split = 1; split < s.splits; ++split) {
          sum = sum + Vec<T>::loadu(first + split * s.nq * s.dim_padded + d);
        }
        sum.store(row_sum.get() + d);
      }
      store_row(row_sum.get(), dq_view.row(bh / s.heads, bh % s.heads, i), dq_view.stride_d, s.dim);
    }
  });
}

}  // namespace

void attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask, double scale,
                        const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v) {
  BackwardShape s;
  s.batch = q.size(0), s.heads = q.size(1), s.heads_kv = k.size(1), s.nq = q.size(2), s.nk = k.size(2);
  s.dim = q.size(3), s.dim_v = v.size(3);
  if (s.batch * s.heads == 0) {
    return;
  }
  if (s.nq == 0 || s.nk == 0) {  // nothing attends to anything: every gradient is zero
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return;
  }
  s.group = s.heads / s.heads_kv;
  const at::ScalarType acc_type = accumulate_type(q.scalar_type());
  s.dim_padded = gemm_width(s.dim, acc_type);
  s.dim_v_padded = gemm_width(s.dim_v, acc_type);
  const int64_t vec = acc_type == at::kDouble ? kVecWidth<double> : kVecWidth<float>;
  s.block_q = std::min(kBlockQ, round_up(s.nq, vec));
  s.block_k = kBlockK;
  s.q_blocks = ceil_div(s.nq, s.block_q);
  s.k_blocks = ceil_div(s.nk, s.block_k);
  // Split a (batch, kv head) over several work items only to give every thread work.
  const int64_t threads = at::get_num_threads();
  s.splits = std::min(s.k_blocks, ceil_div(threads, s.batch * s.heads_kv));
  s.blocks_per_split = ceil_div(s.k_blocks, s.splits);
  s.splits = ceil_div(s.k_blocks, s.blocks_per_split);

  // dq is summed over key blocks: straight into grad_q when one work item covers a (batch, head)
  // and grad_q's rows can take the GEMM's output; with one work item but other rows (bfloat16, a
  // padded head dim), in a thread's scratch; with several, into per-item sums added up afterwards.
  at::Tensor dq_sums;
  if (s.splits == 1) {
    if (grad_q.scalar_type() == acc_type && grad_q.stride(3) == 1 && s.dim == s.dim_padded) {
      grad_q.zero_();
      dq_sums = grad_q.unsqueeze(2);
    }
  } else {
    dq_sums = at::zeros({s.batch, s.heads, s.splits, s.nq, s.dim_padded}, q.options().dtype(acc_type));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(s, grad_out, q, k, v, out, lse, mask, static_cast<acc_t>(scale), dq_sums, grad_q,
                                     grad_k, grad_v);
    if (s.splits > 1) {
      reduce_grad_q<scalar_t, acc_t>(s, dq_sums, grad_q);
    }
  });
}

}  // namespace selfattn::SELFATTN_CPU_NS
