// CUDA forward of attention: out = softmax(scale * q kᵀ) v and the logsumexp of each row.
// With dropout (philox.h) each probability is multiplied by 1/(1 - p) or 0 before P·V.
//
// One block per (query block, batch, head); key/value tiles stream through shared memory and
// each row keeps only a running max and sum (online softmax), so no Nq x Nk matrix exists.
// Scores are kept in natural units (an additive mask is added to them) and exponentiated with exp2
// after the max is subtracted.
// float, half and bfloat16 take the tiled kernel below (float32 accumulation); float64 takes
// the warp-per-row kernel of attention_generic.cu.
#include "kernels.h"
#include "launch.cuh"
#include "score_mods.cuh"
#include "tiles.cuh"

#include <algorithm>

namespace selfattn::cuda {

// q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), out (B, Hq, Nq, Dv): T, any strides;
// lse (B, Hq, Nq) float, any strides; the band and tensor mask of ForwardParams. Grid:
// row_blocks * B * Hq blocks of Cfg::kThreads threads, Cfg's forward_smem_bytes of dynamic shared
// memory. Requires Nk >= 1 and D, Dv <= Cfg::kDMax.
//
// Masks: key tiles that no query of the block can see (by the band) are never loaded, a warp
// skips the tiles none of its rows sees, and only tiles the band does not cover for all the
// warp's rows (or that cross the end of the keys) are masked element by element; the tensor
// mask, when there is one, is read for every score of the tiles that remain. Scores stay in
// natural units (scaled, mask added) until the exponential, so an additive mask of finfo.min
// stays finite: such a row is an ordinary one (uniform softmax), as in float64.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attention_forward_kernel(const ForwardParams<T> p) {
  constexpr int R = Cfg::R, KPL = Cfg::KPL, C = Cfg::kAccCols;
  constexpr int kRows = Cfg::kBlockRows, kCols = Cfg::kBlockCols;
  constexpr int S = Cfg::kStride, kBufStride = Cfg::kWarpBufStride;

  float* const q_s = dynamic_smem();          // (kRows, S): the block's queries
  float* const k_s = q_s + kRows * S;         // (kCols, S): a tile of keys
  float* const v_s = k_s + kCols * S;         // (kCols, S): their values
  float* const p_all = v_s + kCols * S;       // per warp (kCols, kBufStride): its probabilities

  // Heaviest blocks first: under causal masking the last query blocks see the most keys.
  const int64_t bh = blockIdx.x % p.batch_heads;
  const int q_block = p.row_blocks - 1 - static_cast<int>(blockIdx.x / p.batch_heads);
  const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int q0 = q_block * kRows;
  const Lane lane = lane_position();
  const int warp_row0 = lane.warp * 4 * R;  // the warp's first row within the block
  float* const p_buf = p_all + lane.warp * Cfg::kWarpBufSize;
  const int depth_qk = round_up(p.dim, 4);
  const int dim_cols = round_up(p.dim, 32), dim_v_cols = round_up(p.dim_v, 32);
  const Band band = p.band;
  const bool has_mask = p.mask.present();
  const HeadMods<float> mods = head_mods<float>(p.scores, band.offset, b, h);
  const bool modify = mods.active();
  const DropoutKey drop = dropout_key(p.dropout);

  load_tile<kRows, Cfg::kThreads>(p.q, b, h, q0, p.nq, p.dim, dim_cols, q_s, S);

  // The keys some query of the block may see: [k_begin, k_end), in whole tiles from a multiple
  // of kCols; the others are never loaded.
  const int q_last = imin(p.nq, q0 + kRows) - 1;
  const int k_begin = clip(band.first_key(q0), 0, p.nk) / kCols * kCols;
  const int k_end = clip(band.last_key(q_last) + 1, 0, p.nk);
  const int warp_q0 = q0 + warp_row0, warp_q1 = imin(p.nq, warp_q0 + 4 * R);  // the warp's rows
  const bool warp_has_rows = warp_q0 < p.nq;  // else its rows are padding: skip the math

  float row_max[R];  // running max of the row's scores, the same in all 8 lanes
  float row_sum[R];  // running sum of exp(score - row_max) over this lane's columns only
  float acc[R][C];   // unnormalized output, the lane's columns
  // A sink starts every row: max sink(h), sum 1 (held by column group 0's lane).
  const float start_max = sink_max<float>(p.scores, h);
  const float start_sum = lane.col_group == 0 ? sink_sum<float>(p.scores) : 0.f;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    row_max[i] = start_max;
    row_sum[i] = start_sum;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      acc[i][c] = 0.f;
    }
  }

  for (int k0 = k_begin; k0 < k_end; k0 += kCols) {
    __syncthreads();  // every warp is done with the previous tile (and q_s is complete)
    load_tile<kCols, Cfg::kThreads>(p.k, b, hk, k0, p.nk, p.dim, dim_cols, k_s, S);
    load_tile<kCols, Cfg::kThreads>(p.v, b, hk, k0, p.nk, p.dim_v, dim_v_cols, v_s, S);
    __syncthreads();
    if (!warp_has_rows || !band.touches(warp_q0, warp_q1, k0, k0 + kCols)) {
      continue;  // the whole tile is masked for this warp's rows: it adds nothing
    }
    // Every score of the tile visible by the band to every row of the warp (padding rows past
    // Nq included: the band is monotone, and they are never stored).
    const bool full = k0 + kCols <= p.nk && band.covers(warp_q0, warp_q0 + 4 * R, k0, k0 + kCols);

    float s[R][KPL];
    tile_scores<R, KPL, S>(q_s + warp_row0 * S, k_s, depth_qk, lane, s);

    // Online softmax: mask, new max per row, probabilities, and the factor that brings what
    // was accumulated under the old max to the new one.
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int row = q0 + warp_row0 + lane.row_group + 4 * i;
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < KPL; ++j) {
        const int key = k0 + lane.col_group + 8 * j;
        const bool visible = full || (key < p.nk && band.visible(row, key));
        float x = s[i][j] * p.scale;
        if (modify) {
          x = mods.apply(x, row, key);
        }
        if (has_mask && visible && row < p.nq) {
          x += mask_bias<T, float>(p.mask, b, h, row, key);
        }
        s[i][j] = visible ? x : -INFINITY;
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      const float new_max = fmaxf(row_max[i], group_max<8>(tile_max));
      const float base = new_max == -INFINITY ? 0.f : new_max;  // no key seen yet: no inf - inf
      const float alpha = exp2f((row_max[i] - base) * kLog2e);  // 0 on the row's first keys
      row_max[i] = new_max;
      float tile_sum = 0.f;
#pragma unroll
      for (int j = 0; j < KPL; ++j) {
        s[i][j] = exp2f((s[i][j] - base) * kLog2e);
        tile_sum += s[i][j];
      }
      row_sum[i] = row_sum[i] * alpha + tile_sum;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        acc[i][c] *= alpha;
      }
      // Dropout after the sum took the probabilities (lse stays dropout-free). A lane's keys are
      // 8 apart, so each decision takes a Philox call of its own (3 of its 4 words unused).
      if (drop.active) {
#pragma unroll
        for (int j = 0; j < KPL; ++j) {
          s[i][j] *= dropout_factor(drop, b, h, row, k0 + lane.col_group + 8 * j);
        }
      }
    }

    // acc += P · v over the tile's keys (those past k_end are masked for every row).
    store_scores<R, KPL, kBufStride>(p_buf, lane, s);
    __syncwarp();
    tile_accumulate<R, C, kBufStride, S>(p_buf, v_s, imin(kCols, k_end - k0), p.dim_v, lane, acc);
    // The next store_scores into p_buf comes after the next __syncthreads.
  }

  // Normalize and write the rows out, with their logsumexp (natural log; -inf and a zero row
  // where the row saw no key).
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const float total = group_sum<8>(row_sum[i]);
    const int row = q0 + warp_row0 + lane.row_group + 4 * i;
    if (row < p.nq) {
      store_acc_row<C>(p.out, b, h, row, p.dim_v, acc[i], total > 0.f ? 1.f / total : 0.f, lane);
      if (lane.col_group == 0) {
        p.lse[b * p.lse_stride_b + h * p.lse_stride_h + row * p.lse_stride_n] =
            total > 0.f ? row_max[i] + logf(total) : -INFINITY;
      }
    }
  }
}

template <typename Cfg>
constexpr int forward_smem_bytes() {
  return ((Cfg::kBlockRows + 2 * Cfg::kBlockCols) * Cfg::kStride + Cfg::kWarps * Cfg::kWarpBufSize) *
         static_cast<int>(sizeof(float));
}

template <typename T, typename Cfg>
void launch_forward(ForwardParams<T> p, cudaStream_t stream) {
  p.row_blocks = static_cast<int>(ceil_div(p.nq, Cfg::kBlockRows));
  launch(attention_forward_kernel<T, Cfg>, p.row_blocks * p.batch_heads, Cfg::kThreads, forward_smem_bytes<Cfg>(),
         stream, p);
}

// Picks the tile configuration by head dim: TileConfig<bucket, rows per lane, score columns per
// lane>, i.e. blocks of 16R queries and key tiles of 8KPL keys; larger head dims take smaller
// tiles to stay within registers (the accumulator is R x bucket/8 floats per lane) and 99 KB of
// shared memory. Requires max(D, Dv) <= 256.
// fp16/bf16 at D = Dv = 64 or 128 with aligned layouts do not come here: attention_cuda.cpp
// gives them the tensor-core kernel (forward_tc) instead, unless SELFATTN_TENSOR_CORES=0.
template <typename T>
void forward_tiled(const ForwardParams<T>& p, cudaStream_t stream) {
  const int dim_max = std::max(p.dim, p.dim_v);
  if (dim_max <= 32) {
    launch_forward<T, TileConfig<32, 4, 8>>(p, stream);
  } else if (dim_max <= 64) {
    launch_forward<T, TileConfig<64, 4, 8>>(p, stream);
  } else if (dim_max <= 128) {
    launch_forward<T, TileConfig<128, 4, 4>>(p, stream);
  } else {
    launch_forward<T, TileConfig<256, 2, 2>>(p, stream);
  }
}

template void forward_tiled<float>(const ForwardParams<float>&, cudaStream_t);
template void forward_tiled<c10::Half>(const ForwardParams<c10::Half>&, cudaStream_t);
template void forward_tiled<c10::BFloat16>(const ForwardParams<c10::BFloat16>&, cudaStream_t);

}  // namespace selfattn::cuda
