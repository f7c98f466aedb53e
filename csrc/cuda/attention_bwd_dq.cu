// CUDA backward of attention, part 2: dq (see attention_bwd.cu for the whole).
//
// One block per (query block, batch, head) owns its queries' rows of q and dO in shared memory,
// their lse and delta and their dq in registers, and streams tiles of keys (k, v), recomputing
// P and dP: dq += dS k is an accumulation over the tile's keys, summed by one block in a fixed
// order (no atomics).
#include "kernels.h"
#include "launch.cuh"
#include "score_mods.cuh"
#include "tiles.cuh"

#include <algorithm>

namespace selfattn::cuda {

// dq of a block of queries. Tensors as for the dk/dv kernel; grad_q (B, Hq, Nq, D) T any strides.
// Grid: row_blocks (query blocks) * B * Hq blocks of Cfg::kThreads; dq_smem_bytes<Cfg>().
// Masks as in the forward (attention_fwd.cu): key tiles no query of the block sees are never
// loaded, partly visible ones masked element by element; P = 0 for a row with lse = -inf.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attention_backward_dq_kernel(const BackwardParams<T> p) {
  constexpr int R = Cfg::R, KPL = Cfg::KPL, C = Cfg::kAccCols;
  constexpr int kRows = Cfg::kBlockRows, kCols = Cfg::kBlockCols;
  constexpr int S = Cfg::kStride, kBufStride = Cfg::kWarpBufStride;

  float* const q_s = dynamic_smem();       // (kRows, S): the block's queries
  float* const do_s = q_s + kRows * S;     // (kRows, S): their rows of dO
  float* const k_s = do_s + kRows * S;     // (kCols, S): a tile of keys
  float* const v_s = k_s + kCols * S;      // (kCols, S): their values
  float* const buf_all = v_s + kCols * S;  // per warp (kCols, kBufStride): dS, transposed

  const int64_t bh = blockIdx.x % p.batch_heads;
  const int q_block = p.row_blocks - 1 - static_cast<int>(blockIdx.x / p.batch_heads);
  const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int q0 = q_block * kRows;
  const Lane lane = lane_position();
  const int warp_row0 = lane.warp * 4 * R;
  float* const buf = buf_all + lane.warp * Cfg::kWarpBufSize;
  const int depth_qk = round_up(p.dim, 4), depth_v = round_up(p.dim_v, 4);
  const int dim_cols = round_up(p.dim, 32), dim_v_cols = round_up(p.dim_v, 32);
  const Band band = p.band;
  const bool has_mask = p.mask.present();
  const HeadMods<float> mods = head_mods<float>(p.scores, band.offset, b, h);
  const bool modify = mods.active();
  const DropoutKey drop = dropout_key(p.dropout);

  load_tile<kRows, Cfg::kThreads>(p.q, b, h, q0, p.nq, p.dim, dim_cols, q_s, S);
  load_tile<kRows, Cfg::kThreads>(p.grad_out, b, h, q0, p.nq, p.dim_v, dim_v_cols, do_s, S);

  float lse[R], delta[R], dq[R][C];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = q0 + warp_row0 + lane.row_group + 4 * i;
    const bool valid = row < p.nq;
    lse[i] = valid ? backward_lse(p.lse[b * p.lse_stride_b + h * p.lse_stride_h + row * p.lse_stride_n]) : 0.f;
    delta[i] = valid ? p.delta[bh * p.nq + row] : 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      dq[i][c] = 0.f;
    }
  }

  // The keys some query of the block may see, in whole tiles (as in the forward).
  const int q_last = imin(p.nq, q0 + kRows) - 1;
  const int k_begin = clip(band.first_key(q0), 0, p.nk) / kCols * kCols;
  const int k_end = clip(band.last_key(q_last) + 1, 0, p.nk);
  const int warp_q0 = q0 + warp_row0, warp_q1 = imin(p.nq, warp_q0 + 4 * R);
  const bool warp_has_rows = warp_q0 < p.nq;

  for (int k0 = k_begin; k0 < k_end; k0 += kCols) {
    __syncthreads();  // every warp is done with the previous tile (and q_s, do_s are complete)
    load_tile<kCols, Cfg::kThreads>(p.k, b, hk, k0, p.nk, p.dim, dim_cols, k_s, S);
    load_tile<kCols, Cfg::kThreads>(p.v, b, hk, k0, p.nk, p.dim_v, dim_v_cols, v_s, S);
    __syncthreads();
    if (!warp_has_rows || !band.touches(warp_q0, warp_q1, k0, k0 + kCols)) {
      continue;
    }
    const bool full = k0 + kCols <= p.nk && band.covers(warp_q0, warp_q0 + 4 * R, k0, k0 + kCols);

    float ds[R][KPL], dp[R][KPL];
    tile_scores<R, KPL, S>(q_s + warp_row0 * S, k_s, depth_qk, lane, ds);
    tile_scores<R, KPL, S>(do_s + warp_row0 * S, v_s, depth_v, lane, dp);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int row = q0 + warp_row0 + lane.row_group + 4 * i;
#pragma unroll
      for (int j = 0; j < KPL; ++j) {
        const int key = k0 + lane.col_group + 8 * j;
        const bool visible = row < p.nq && (full || (key < p.nk && band.visible(row, key)));
        float x = ds[i][j] * p.scale;
        float grad = 1.f;  // the softcap's 1 - tanh²
        if (modify) {
          x = mods.apply(x, row, key, &grad);
        }
        if (has_mask && visible) {
          x += mask_bias<T, float>(p.mask, b, h, row, key);
        }
        const float prob = visible ? exp2f((x - lse[i]) * kLog2e) : 0.f;
        // Dropout: dS = P ∘ (M ∘ dP - delta), M = keep / (1 - p); softcap: times 1 - tanh².
        const float keep = drop.active ? dropout_factor(drop, b, h, row, key) : 1.f;
        ds[i][j] = prob * (keep * dp[i][j] - delta[i]) * grad;
      }
    }

    // dq += dS k  (times scale at the end).
    store_scores<R, KPL, kBufStride>(buf, lane, ds);
    __syncwarp();
    tile_accumulate<R, C, kBufStride, S>(buf, k_s, imin(kCols, k_end - k0), p.dim, lane, dq);
  }

#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = q0 + warp_row0 + lane.row_group + 4 * i;
    if (row < p.nq) {
      store_acc_row<C>(p.grad_q, b, h, row, p.dim, dq[i], p.scale, lane);
    }
  }
}

template <typename Cfg>
constexpr int dq_smem_bytes() {
  return ((2 * Cfg::kBlockRows + 2 * Cfg::kBlockCols) * Cfg::kStride + Cfg::kWarps * Cfg::kWarpBufSize) *
         static_cast<int>(sizeof(float));
}

template <typename T, typename Cfg>
void launch_dq(BackwardParams<T> p, cudaStream_t stream) {
  p.row_blocks = static_cast<int>(ceil_div(p.nq, Cfg::kBlockRows));
  launch(attention_backward_dq_kernel<T, Cfg>, p.row_blocks * p.batch_heads, Cfg::kThreads, dq_smem_bytes<Cfg>(),
         stream, p);
}

// The tile configuration by head dim: with_backward_tile_config (tiles.cuh). The tensor-core
// kernels for fp16/bf16 at D = Dv = 64 or 128 are chosen ahead of these (attention_cuda.cpp).
template <typename T>
void backward_dq_tiled(const BackwardParams<T>& p, cudaStream_t stream) {
  with_backward_tile_config(std::max(p.dim, p.dim_v), [&](auto cfg) { launch_dq<T, decltype(cfg)>(p, stream); });
}

template void backward_dq_tiled<float>(const BackwardParams<float>&, cudaStream_t);
template void backward_dq_tiled<c10::Half>(const BackwardParams<c10::Half>&, cudaStream_t);
template void backward_dq_tiled<c10::BFloat16>(const BackwardParams<c10::BFloat16>&, cudaStream_t);

}  // namespace selfattn::cuda
