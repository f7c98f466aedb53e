// CUDA forward of attention: out = softmax(scale * q kᵀ) v and the logsumexp of each row.
//
// One block per (query block, batch, head); key/value tiles stream through shared memory and
// each row keeps only a running max and sum (online softmax), so no Nq x Nk matrix exists.
// Scores are kept in base-2 units (times log2 e) so every exponential is one exp2.
// float, half and bfloat16 take the tiled kernel below (float32 accumulation); float64 takes
// the warp-per-row kernel of attention_generic.cu.
#include "kernels.h"
#include "launch.cuh"
#include "tiles.cuh"

#include <algorithm>

namespace selfattn::cuda {

// q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), out (B, H, Nq, Dv): T, any strides;
// lse (B, H, Nq) float, any strides. Grid: row_blocks * B * H blocks of Cfg::kThreads threads,
// Cfg's forward_smem_bytes of dynamic shared memory. Requires Nk >= 1 and D, Dv <= Cfg::kDMax.
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
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int q0 = q_block * kRows;
  const Lane lane = lane_position();
  const int warp_row0 = lane.warp * 4 * R;  // the warp's first row within the block
  float* const p_buf = p_all + lane.warp * Cfg::kWarpBufSize;
  const int depth_qk = round_up(p.dim, 4);
  const int dim_cols = round_up(p.dim, 32), dim_v_cols = round_up(p.dim_v, 32);

  load_tile<kRows, Cfg::kThreads>(p.q, b, h, q0, p.nq, p.dim, dim_cols, q_s, S);

  // Causal: query i sees keys j <= i, so keys past the block's last query are never loaded.
  const int k_end = p.causal ? imin(p.nk, imin(p.nq, q0 + kRows)) : p.nk;
  const int warp_last_row = q0 + warp_row0 + 4 * R - 1;
  const bool warp_has_rows = q0 + warp_row0 < p.nq;  // else its rows are padding: skip the math
  const float scale_log2 = p.scale * kLog2e;

  float row_max[R];  // running max of the row's scores (base 2), the same in all 8 lanes
  float row_sum[R];  // running sum of exp2(score - row_max) over this lane's columns only
  float acc[R][C];   // unnormalized output, the lane's columns
#pragma unroll
  for (int i = 0; i < R; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      acc[i][c] = 0.f;
    }
  }

  for (int k0 = 0; k0 < k_end; k0 += kCols) {
    __syncthreads();  // every warp is done with the previous tile (and q_s is complete)
    load_tile<kCols, Cfg::kThreads>(p.k, b, h, k0, p.nk, p.dim, dim_cols, k_s, S);
    load_tile<kCols, Cfg::kThreads>(p.v, b, h, k0, p.nk, p.dim_v, dim_v_cols, v_s, S);
    __syncthreads();
    if (!warp_has_rows || (p.causal && k0 > warp_last_row)) {
      continue;  // the whole tile is masked for this warp's rows: it adds nothing
    }

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
        const bool visible = key < p.nk && (!p.causal || key <= row);
        s[i][j] = visible ? s[i][j] * scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      const float new_max = fmaxf(row_max[i], group_max<8>(tile_max));
      const float base = new_max == -INFINITY ? 0.f : new_max;  // no row sees a key yet: no NaN
      const float alpha = exp2f(row_max[i] - base);               // 0 on the row's first keys
      row_max[i] = new_max;
      float tile_sum = 0.f;
#pragma unroll
      for (int j = 0; j < KPL; ++j) {
        s[i][j] = exp2f(s[i][j] - base);
        tile_sum += s[i][j];
      }
      row_sum[i] = row_sum[i] * alpha + tile_sum;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        acc[i][c] *= alpha;
      }
    }

    // acc += P · v over the tile's keys (those past k_end are masked for every row).
    store_scores<R, KPL, kBufStride>(p_buf, lane, s);
    __syncwarp();
    tile_accumulate<R, C, kBufStride, S>(p_buf, v_s, imin(kCols, k_end - k0), p.dim_v, lane, acc);
    // The next store_scores into p_buf comes after the next __syncthreads.
  }

  // Normalize and write the rows out, with their logsumexp (natural log).
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const float total = group_sum<8>(row_sum[i]);
    const int row = q0 + warp_row0 + lane.row_group + 4 * i;
    if (row < p.nq) {
      store_acc_row<C>(p.out, b, h, row, p.dim_v, acc[i], total > 0.f ? 1.f / total : 0.f, lane);
      if (lane.col_group == 0) {
        p.lse[b * p.lse_stride_b + h * p.lse_stride_h + row * p.lse_stride_n] =
            total > 0.f ? (row_max[i] + log2f(total)) * kLn2 : -INFINITY;
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
  launch(attention_forward_kernel<T, Cfg>, p.row_blocks * p.batch_heads, Cfg::kThreads,
         forward_smem_bytes<Cfg>(), stream, p);
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
