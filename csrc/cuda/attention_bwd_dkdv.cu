// CUDA backward of attention, part 1: dk and dv (see attention_bwd.cu for the whole).
//
// One block per (key block, batch, kv head) owns its keys' rows of k and v in shared memory and
// their dk and dv in registers, and streams tiles of queries (q, dO, lse, delta). Scores,
// probabilities and dS are computed transposed (keys as rows), so that the tile operations of
// tiles.cuh serve unchanged: dv += Pᵀ dO and dk += dSᵀ q are accumulations over the tile's
// queries. No other block writes these rows: no atomics, a fixed summation order.
#include "kernels.h"
#include "launch.cuh"
#include "score_mods.cuh"
#include "tiles.cuh"

#include <algorithm>

namespace selfattn::cuda {

// dk, dv of a block of keys of one kv head. q, grad_out (B, Hq, Nq, D/Dv), k (B, Hk, Nk, D) T
// any strides; lse (B, Hq, Nq) float any strides; delta (B*Hq*Nq) float; grad_k, grad_v
// (B, Hk, Nk, D/Dv) T any strides, every element of the block's rows written (zeros for keys no
// query sees). Grid: row_blocks (key blocks) * B * Hk blocks of Cfg::kThreads;
// dkdv_smem_bytes<Cfg>().
//
// Grouped-query attention: the block's kv head hk serves query heads hk * G .. hk * G + G - 1;
// it streams the query tiles of each in turn (g = 0 .. G-1, a fixed order) into the same dk, dv
// accumulators, so the sum over the group needs no atomics and no second pass.
// Masks: only the query tiles whose queries may see some key of the block (by the band) are
// loaded; a warp skips the tiles none of its keys is seen by, and masks element by element only
// the tiles the band does not cover; P = 0 for a row with lse = -inf.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attention_backward_dkdv_kernel(const BackwardParams<T> p) {
  constexpr int R = Cfg::R, KPL = Cfg::KPL, C = Cfg::kAccCols;
  constexpr int kKeys = Cfg::kBlockRows, kQueries = Cfg::kBlockCols;
  constexpr int S = Cfg::kStride, kBufStride = Cfg::kWarpBufStride;

  float* const k_s = dynamic_smem();           // (kKeys, S): the block's keys
  float* const v_s = k_s + kKeys * S;          // (kKeys, S): their values
  float* const q_s = v_s + kKeys * S;          // (kQueries, S): a tile of queries
  float* const do_s = q_s + kQueries * S;      // (kQueries, S): their rows of dO
  float* const lse_s = do_s + kQueries * S;    // (kQueries): their lse (+inf for -inf)
  float* const delta_s = lse_s + kQueries;     // (kQueries): their delta
  float* const buf_all = delta_s + kQueries;   // per warp (kQueries, kBufStride): Pᵀ, then dSᵀ

  // Key block 0 first: under causal masking the first key blocks are seen by the most queries.
  const int64_t batch_heads_kv = p.batch_heads / p.group;
  const int64_t bhk = blockIdx.x % batch_heads_kv;
  const int k_block = static_cast<int>(blockIdx.x / batch_heads_kv);
  const int64_t b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int k0 = k_block * kKeys;
  const Lane lane = lane_position();
  const int warp_row0 = lane.warp * 4 * R;
  float* const buf = buf_all + lane.warp * Cfg::kWarpBufSize;
  const int depth_qk = round_up(p.dim, 4), depth_v = round_up(p.dim_v, 4);
  const int dim_cols = round_up(p.dim, 32), dim_v_cols = round_up(p.dim_v, 32);
  const Band band = p.band;
  const bool has_mask = p.mask.present();
  const DropoutKey drop = dropout_key(p.dropout);

  load_tile<kKeys, Cfg::kThreads>(p.k, b, hk, k0, p.nk, p.dim, dim_cols, k_s, S);
  load_tile<kKeys, Cfg::kThreads>(p.v, b, hk, k0, p.nk, p.dim_v, dim_v_cols, v_s, S);

  const int warp_first_key = k0 + warp_row0;
  const int warp_keys_end = imin(p.nk, warp_first_key + 4 * R);
  const bool warp_has_rows = warp_first_key < p.nk;

  float dk[R][C], dv[R][C];
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      dk[i][c] = 0.f;
      dv[i][c] = 0.f;
    }
  }

  // The queries that may see some key of the block: [q_begin, q_end), in whole tiles from a
  // multiple of kQueries.
  const int k_last = imin(p.nk, k0 + kKeys) - 1;
  const int q_begin = clip(band.first_query(k0), 0, p.nq) / kQueries * kQueries;
  const int q_end = clip(band.last_query(k_last + 1) + 1, 0, p.nq);
  for (int g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g;
    const int64_t bh = b * p.heads + h;
    const HeadMods<float> mods = head_mods<float>(p.scores, band.offset, b, h);
    const bool modify = mods.active();
    for (int q0 = q_begin; q0 < q_end; q0 += kQueries) {
      __syncthreads();  // every warp is done with the previous tile (and k_s, v_s are complete)
      load_tile<kQueries, Cfg::kThreads>(p.q, b, h, q0, p.nq, p.dim, dim_cols, q_s, S);
      load_tile<kQueries, Cfg::kThreads>(p.grad_out, b, h, q0, p.nq, p.dim_v, dim_v_cols, do_s, S);
      for (int c = threadIdx.x; c < kQueries; c += Cfg::kThreads) {
        const int query = q0 + c;
        const bool valid = query < p.nq;
        lse_s[c] = valid ? backward_lse(p.lse[b * p.lse_stride_b + h * p.lse_stride_h + query * p.lse_stride_n]) : 0.f;
        delta_s[c] = valid ? p.delta[bh * p.nq + query] : 0.f;
      }
      __syncthreads();
      const int q1 = imin(p.nq, q0 + kQueries);
      if (!warp_has_rows || !band.touches(q0, q1, warp_first_key, warp_keys_end)) {
        continue;  // no query of the tile sees a key of the warp
      }
      const int queries = q1 - q0;
      // Every (key, query) of the warp and the tile visible by the band (the warp's padding
      // keys past Nk included: they are never stored).
      const bool full = q0 + kQueries <= p.nq && band.covers(q0, q0 + kQueries, warp_first_key, warp_first_key + 4 * R);

      // Pᵀ (keys x queries) from the scores and the forward's lse; with dropout, keep holds
      // M = keep / (1 - p) and Pᵀ ∘ Mᵀ goes into dv.
      // grad: the softcap's 1 - tanh², for dSᵀ.
      float pt[R][KPL], keep[R][KPL], grad[R][KPL];
      tile_scores<R, KPL, S>(k_s + warp_row0 * S, q_s, depth_qk, lane, pt);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int key = warp_first_key + lane.row_group + 4 * i;
#pragma unroll
        for (int j = 0; j < KPL; ++j) {
          const int col = lane.col_group + 8 * j;
          const int query = q0 + col;
          const bool visible = key < p.nk && (full || (query < p.nq && band.visible(query, key)));
          float x = pt[i][j] * p.scale;
          grad[i][j] = 1.f;
          if (modify) {
            x = mods.apply(x, query, key, &grad[i][j]);
          }
          if (has_mask && visible) {
            x += mask_bias<T, float>(p.mask, b, h, query, key);
          }
          pt[i][j] = visible ? exp2f((x - lse_s[col]) * kLog2e) : 0.f;
          keep[i][j] = drop.active ? dropout_factor(drop, b, h, query, key) : 1.f;
        }
      }

      // dv += (Pᵀ ∘ Mᵀ) dO.
      if (drop.active) {
        float kept[R][KPL];
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
          for (int j = 0; j < KPL; ++j) {
            kept[i][j] = pt[i][j] * keep[i][j];
          }
        }
        store_scores<R, KPL, kBufStride>(buf, lane, kept);
      } else {
        store_scores<R, KPL, kBufStride>(buf, lane, pt);
      }
      __syncwarp();
      tile_accumulate<R, C, kBufStride, S>(buf, do_s, queries, p.dim_v, lane, dv);

      // dSᵀ = Pᵀ ∘ (v dOᵀ - delta);  dk += dSᵀ q  (times scale at the end).
      float dst[R][KPL];
      tile_scores<R, KPL, S>(v_s + warp_row0 * S, do_s, depth_v, lane, dst);
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int j = 0; j < KPL; ++j) {
          dst[i][j] = pt[i][j] * (keep[i][j] * dst[i][j] - delta_s[lane.col_group + 8 * j]) * grad[i][j];
        }
      }
      __syncwarp();  // every lane has read Pᵀ from buf
      store_scores<R, KPL, kBufStride>(buf, lane, dst);
      __syncwarp();
      tile_accumulate<R, C, kBufStride, S>(buf, q_s, queries, p.dim, lane, dk);
    }
  }

#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int key = warp_first_key + lane.row_group + 4 * i;
    if (key < p.nk) {
      store_acc_row<C>(p.grad_k, b, hk, key, p.dim, dk[i], p.scale, lane);
      store_acc_row<C>(p.grad_v, b, hk, key, p.dim_v, dv[i], 1.f, lane);
    }
  }
}

template <typename Cfg>
constexpr int dkdv_smem_bytes() {
  return ((2 * Cfg::kBlockRows + 2 * Cfg::kBlockCols) * Cfg::kStride + 2 * Cfg::kBlockCols +
          Cfg::kWarps * Cfg::kWarpBufSize) *
         static_cast<int>(sizeof(float));
}

template <typename T, typename Cfg>
void launch_dkdv(BackwardParams<T> p, cudaStream_t stream) {
  p.row_blocks = static_cast<int>(ceil_div(p.nk, Cfg::kBlockRows));
  launch(attention_backward_dkdv_kernel<T, Cfg>, p.row_blocks * (p.batch_heads / p.group), Cfg::kThreads,
         dkdv_smem_bytes<Cfg>(), stream, p);
}

// The tile configuration by head dim: with_backward_tile_config (tiles.cuh). The tensor-core
// kernels for fp16/bf16 at D = Dv = 64 or 128 are chosen ahead of these (attention_cuda.cpp).
template <typename T>
void backward_dkdv_tiled(const BackwardParams<T>& p, cudaStream_t stream) {
  with_backward_tile_config(std::max(p.dim, p.dim_v), [&](auto cfg) { launch_dkdv<T, decltype(cfg)>(p, stream); });
}

template void backward_dkdv_tiled<float>(const BackwardParams<float>&, cudaStream_t);
template void backward_dkdv_tiled<c10::Half>(const BackwardParams<c10::Half>&, cudaStream_t);
template void backward_dkdv_tiled<c10::BFloat16>(const BackwardParams<c10::BFloat16>&, cudaStream_t);

}  // namespace selfattn::cuda
