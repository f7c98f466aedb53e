// CPU forward-mode derivative of attention: out, lse and tangent_out in one pass.
//
// With S = scale·q kᵀ (+ mask), P = softmax(S) and dS = scale·(dq kᵀ + q dkᵀ), the tangent of
// out = P v is
//
//     tangent_out = P·dv + (P ∘ (dS − rowsum(P ∘ dS)))·v = (acc_t − s_t·out) / l
//
// where, per query row, l = Σ p, acc_t = Σ p·(dv + ds·v) and s_t = Σ p·ds over its keys (p the
// unnormalised exp(s − max)). These are sums like the forward's acc = Σ p·v, so the same online
// softmax carries them: when the running max moves, acc, acc_t, s_t and l are all rescaled by the
// same factor. The structure is attention_fwd.cpp's (read it first): a work item is one (batch,
// head, 64 queries), key blocks of 64 stream through it, scores are held transposed (key rows x
// query columns), masks skip what they hide. Per key block, besides the forward's two GEMMs: the
// tangent scores dS (one GEMM per tangent of q or k), and P·dv and (P ∘ dS)·v into acc_t. An
// undefined tangent is zero: its GEMMs are skipped. A row that sees no key gets out 0, lse -inf
// and tangent 0.
#include "kernels.h"
#include "mask_tiles.h"
#include "score_mods.h"
#include "tile.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace selfattn::SELFATTN_CPU_NS {
namespace {

constexpr int64_t kBlockQ = 64;  // queries per work item (columns of the score tiles)
constexpr int64_t kBlockK = 64;  // keys per step of the stream (rows of the score tiles)

// Tensors as in attention.h; tangent_q/k/v undefined or of q/k/v's shape and dtype, any strides;
// tangent_out (B, Hq, Nq, Dv) scalar_t, any strides. T is the accumulation type.
template <typename scalar_t, typename T>
void jvp_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tangent_q,
                const at::Tensor& tangent_k, const at::Tensor& tangent_v, const AttentionMask& mask, T scale,
                const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out) {
  constexpr int64_t W = kVecWidth<T>;
  const int64_t batch = q.size(0), heads = q.size(1), nq = q.size(2), dim = q.size(3);
  const int64_t group = heads / k.size(1);
  const int64_t nk = k.size(2), dim_v = v.size(3), dim_v_padded = round_up(dim_v, W);
  const int64_t block_q = std::min(kBlockQ, round_up(nq, W));
  const int64_t block_k = kBlockK;
  const int64_t q_blocks = ceil_div(nq, block_q);
  const Band& band = mask.band;
  const MaskTiles mask_tiles = mask.tensor.defined() ? MaskTiles(mask.tensor, block_q, block_k) : MaskTiles();
  const bool uneven = band.right < kUnbounded;
  const bool has_tq = tangent_q.defined(), has_tk = tangent_k.defined(), has_tv = tangent_v.defined();
  const bool has_ds = has_tq || has_tk;  // else dS = 0: only P·dv reaches the tangent

  const Strided4<const scalar_t> q_view(q);
  // A tensor that is not there is read through q's view (never: its reader is not used).
  const Strided4<const scalar_t> tq_view(has_tq ? tangent_q : q);
  const BlockReader<scalar_t, T> k_reader(Strided4<const scalar_t>(k), dim, dim, /*whole_rows=*/false);
  const BlockReader<scalar_t, T> tk_reader(Strided4<const scalar_t>(has_tk ? tangent_k : k), dim, dim, false);
  const BlockReader<scalar_t, T> v_reader(Strided4<const scalar_t>(v), dim_v, dim_v_padded, /*whole_rows=*/true);
  const BlockReader<scalar_t, T> tv_reader(Strided4<const scalar_t>(has_tv ? tangent_v : v), dim_v, dim_v_padded, true);
  const Strided4<scalar_t> out_view(out);
  const Strided4<scalar_t> tangent_out_view(tangent_out);
  T* const lse_data = lse.data_ptr<T>();
  const int64_t lse_stride_b = lse.stride(0), lse_stride_h = lse.stride(1), lse_stride_n = lse.stride(2);

  const bool softcap = mask.scores.has_softcap();
  using Carver = ScratchCarver<T>;
  const int64_t scratch_size =
      2 * Carver::padded(dim * block_q) + (softcap ? 3 : 2) * Carver::padded(block_k * block_q) +
      2 * Carver::padded(block_q * dim_v_padded) + 4 * Carver::padded(block_q) +
      Carver::padded(k_reader.scratch_size(block_k)) + Carver::padded(tk_reader.scratch_size(block_k)) +
      Carver::padded(v_reader.scratch_size(block_k)) + Carver::padded(tv_reader.scratch_size(block_k));

  for_each_item(batch * heads * q_blocks, [&](ItemQueue& items) {
    Scratch<T> scratch(scratch_size);
    Carver carve(scratch.get());
    T* q_t = carve.take(dim * block_q);             // (D, block_q): queries as columns, times scale
    T* tq_t = carve.take(dim * block_q);            // (D, block_q): their tangents, times scale
    T* p_t = carve.take(block_k * block_q);         // (block_k, block_q): scores, then probabilities
    T* ds_t = carve.take(block_k * block_q);        // (block_k, block_q): tangent scores, then P ∘ dS
    T* tanh_t = softcap ? carve.take(block_k * block_q) : nullptr;  // tanh(s / softcap): dS's 1 - tanh²
    T* acc = carve.take(block_q * dim_v_padded);    // Σ p·v per query row
    T* acc_t = carve.take(block_q * dim_v_padded);  // Σ p·(dv + ds·v) per query row
    T* row_max = carve.take(block_q);
    T* row_sum = carve.take(block_q);               // Σ p
    T* row_ds = carve.take(block_q);                // Σ p·ds
    T* rescale = carve.take(block_q);
    T* k_scratch = carve.take(k_reader.scratch_size(block_k));
    T* tk_scratch = carve.take(tk_reader.scratch_size(block_k));
    T* v_scratch = carve.take(v_reader.scratch_size(block_k));
    T* tv_scratch = carve.take(tv_reader.scratch_size(block_k));

    for (int64_t item; items.next(item);) {
      const int64_t bh = item / q_blocks, b = bh / heads, h = bh % heads, h_kv = h / group;
      const int64_t rank = item % q_blocks;
      const int64_t q0 = (uneven ? q_blocks - 1 - rank : rank) * block_q;
      const int64_t q_rows = std::min(block_q, nq - q0);

      pack_columns(q_view, b, h, q0, q_rows, dim, scale, q_t, block_q);
      if (has_tq) {
        pack_columns(tq_view, b, h, q0, q_rows, dim, scale, tq_t, block_q);
      }
      // (A sink enters l here; its share of the tangent, -p_sink·tangent_sink·out, is added by
      // the op: add_sinks_tangent.)
      sink_row_start(mask.scores, h, block_q, row_max, row_sum);
      fill(row_ds, block_q, T(0));
      fill(acc, block_q * dim_v_padded, T(0));
      fill(acc_t, block_q * dim_v_padded, T(0));

      const int64_t k_begin = std::max<int64_t>(0, band.first_key(q0)) / block_k * block_k;
      const int64_t k_end = std::min(nk, band.last_key(q0 + q_rows - 1) + 1);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += block_k) {
        const int64_t k_rows = std::min(block_k, k_end - k0);
        const TileState tile = mask_tiles.state(b, h, q0, k0);
        if (tile == TileState::kHidden) {
          continue;
        }
        const bool cut = band_cuts(band, q0, q_rows, k0, k_rows);
        const MaskCut band_cols = band_cut(band, q0, k0);
        // C (k_rows x block_q) (+)= a's key rows · b's query columns, skipping what the band hides.
        const auto keys_x_queries = [&](const RowBlock<T>& a, const T* columns, T* c, bool accumulate) {
          if (!cut) {
            gemm<T>(k_rows, block_q, dim, a.data, a.row_stride, a.col_stride, columns, block_q, c, block_q, accumulate);
          } else {
            gemm_keys_x_queries<T>(band_cols, k_rows, block_q, dim, a.data, a.row_stride, a.col_stride, columns,
                                   block_q, c, block_q, accumulate);
          }
        };

        // 1. Scores and tangent scores, transposed. Pairs the band hides: score -inf, tangent 0
        //    (the band GEMMs leave them unwritten, and 0 · garbage could be NaN).
        const RowBlock<T> k_block = k_reader.read(b, h_kv, k0, k_rows, k_scratch);
        keys_x_queries(k_block, q_t, p_t, false);
        if (has_tq) {
          keys_x_queries(k_block, tq_t, ds_t, false);
        }
        if (has_tk) {
          keys_x_queries(tk_reader.read(b, h_kv, k0, k_rows, tk_scratch), q_t, ds_t, has_tq);
        }
        // The score modifications; the softcap's derivative scales the tangent scores.
        if (mask.scores.modify_scores()) {
          modify_scores(mask.scores, b, h, band.offset, q0, block_q, k0, k_rows, p_t, block_q, tanh_t);
          if (softcap && has_ds) {
            softcap_backward(block_q, k_rows, tanh_t, ds_t, block_q);
          }
        }
        if (cut) {
          mask_band(band_cols, k_rows, block_q, p_t, block_q, -std::numeric_limits<T>::infinity());
          if (has_ds) {
            mask_band(band_cols, k_rows, block_q, ds_t, block_q, T(0));
          }
        }
        if (tile == TileState::kPartial) {
          mask_tiles.apply(b, h, q0, q_rows, k0, k_rows, p_t, block_q);
        }

        // 2. Online softmax down each column as in the forward, and P ∘ dS with its column sums.
        const Vec<T> minus_inf(-std::numeric_limits<T>::infinity());
        for (int64_t c = 0; c < block_q; c += W) {
          const Vec<T> old_max = Vec<T>::loadu(row_max + c);
          Vec<T> new_max = old_max;
          for (int64_t j = 0; j < k_rows; ++j) {
            new_max = at::vec::maximum(new_max, Vec<T>::loadu(p_t + j * block_q + c));
          }
          const Vec<T> safe_max = Vec<T>::blendv(new_max, Vec<T>(T(0)), new_max == minus_inf);
          Vec<T> block_sum(T(0)), block_ds(T(0));
          for (int64_t j = 0; j < k_rows; ++j) {
            const Vec<T> p = vec_exp<T>(Vec<T>::loadu(p_t + j * block_q + c) - safe_max);
            p.store(p_t + j * block_q + c);
            block_sum = block_sum + p;
            if (has_ds) {
              const Vec<T> p_ds = p * Vec<T>::loadu(ds_t + j * block_q + c);
              p_ds.store(ds_t + j * block_q + c);
              block_ds = block_ds + p_ds;
            }
          }
          const Vec<T> alpha = vec_exp<T>(old_max - safe_max);
          at::vec::fmadd(alpha, Vec<T>::loadu(row_sum + c), block_sum).store(row_sum + c);
          at::vec::fmadd(alpha, Vec<T>::loadu(row_ds + c), block_ds).store(row_ds + c);
          alpha.store(rescale + c);
          new_max.store(row_max + c);
        }
        for (int64_t i = 0; i < q_rows; ++i) {
          if (rescale[i] != T(1)) {
            const Vec<T> alpha(rescale[i]);
            for (int64_t d = 0; d < dim_v_padded; d += W) {
              (Vec<T>::loadu(acc + i * dim_v_padded + d) * alpha).store(acc + i * dim_v_padded + d);
              (Vec<T>::loadu(acc_t + i * dim_v_padded + d) * alpha).store(acc_t + i * dim_v_padded + d);
            }
          }
        }

        // 3. acc += P · v;  acc_t += P · dv + (P ∘ dS) · v; P and P ∘ dS read through their transposes.
        const auto queries_x_keys = [&](const T* a_t, const RowBlock<T>& rows, T* c) {
          if (!cut) {
            gemm<T>(q_rows, dim_v_padded, k_rows, a_t, 1, block_q, rows.data, rows.row_stride, c, dim_v_padded,
                    /*accumulate=*/true);
          } else {
            gemm_queries_x_keys<T>(band_cols, q_rows, dim_v_padded, k_rows, a_t, 1, block_q, rows.data, rows.row_stride,
                                   c, dim_v_padded);
          }
        };
        const RowBlock<T> v_block = v_reader.read(b, h_kv, k0, k_rows, v_scratch);
        queries_x_keys(p_t, v_block, acc);
        if (has_tv) {
          queries_x_keys(p_t, tv_reader.read(b, h_kv, k0, k_rows, tv_scratch), acc_t);
        }
        if (has_ds) {
          queries_x_keys(ds_t, v_block, acc_t);
        }
      }

      // 4. out = acc / l and tangent_out = (acc_t − s_t·out) / l with s_t = Σ p·ds, from out before
      //    rounding; a row that saw no key gets 0, 0 and lse -inf (with a sink: lse the sink's logit).
      for (int64_t i = 0; i < q_rows; ++i) {
        T* acc_row = acc + i * dim_v_padded;
        T* acc_t_row = acc_t + i * dim_v_padded;
        const bool seen = row_sum[i] > T(0);
        const T inv_sum = seen ? T(1) / row_sum[i] : T(0);
        const Vec<T> inv(inv_sum), mean_ds(row_ds[i] * inv_sum);
        for (int64_t d = 0; d < dim_v_padded; d += W) {
          const Vec<T> o = Vec<T>::loadu(acc_row + d) * inv;
          o.store(acc_row + d);
          (Vec<T>::loadu(acc_t_row + d) * inv - mean_ds * o).store(acc_t_row + d);
        }
        store_row(acc_row, out_view.row(b, h, q0 + i), out_view.stride_d, dim_v);
        store_row(acc_t_row, tangent_out_view.row(b, h, q0 + i), tangent_out_view.stride_d, dim_v);
        lse_data[b * lse_stride_b + h * lse_stride_h + (q0 + i) * lse_stride_n] =
            seen ? row_max[i] + std::log(row_sum[i]) : -std::numeric_limits<T>::infinity();
      }
    }
  });
}

}  // namespace

void attention_jvp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tangent_q,
                   const at::Tensor& tangent_k, const at::Tensor& tangent_v, const AttentionMask& mask, double scale,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out) {
  if (q.size(2) == 0 || q.size(0) * q.size(1) == 0) {
    return;
  }
  if (k.size(2) == 0) {  // no key to attend to: an empty sum, and its tangent
    write_empty_rows(mask, out, lse);
    tangent_out.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_jvp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    jvp_kernel<scalar_t, acc_t>(q, k, v, tangent_q, tangent_k, tangent_v, mask, static_cast<acc_t>(scale), out, lse,
                                tangent_out);
  });
}

}  // namespace selfattn::SELFATTN_CPU_NS
