// Tensor-core forward of attention for fp16/bf16 at head dims 64 and 128 (FlashAttention-2's
// work split): one block per (query block, batch, head) keeps its queries in shared memory and
// streams key/value tiles through it; each warp owns kRowsPerWarp query rows and their output
// accumulators in registers, S = q kᵀ and O += P v run on mma.sync m16n8k16, and the softmax is
// online (running max and sum per row) in base 2 with the scale folded into one FFMA per score.
//
// Pipeline (cp.async, two groups in flight per tile): the value tile n is fetched while the
// scores of key tile n are computed, and key tile n+1 while P v of tile n is: one buffer each
// for keys and values, two barriers per tile (FlashAttention-2's schedule for sm_80).
//
// Masks (the band of mask.h and the tensor mask, tc_mask.cuh): key tiles no query of the block
// sees by the band are never loaded, a warp skips the tiles none of its rows sees, and only tiles
// the band does not cover for the warp (or that cross the end of the keys) are masked element by
// element, every tile when there is a tensor mask. With an additive mask the running max is kept
// in natural units (scale q·k + element; tc_mask.cuh says why). Score modifications (softcap,
// ALiBi, sinks) take the masked kernel and natural units too; a sink starts each row's max and sum.
// Grouped-query attention: query head h reads kv head h / group. Dropout (philox.h): P is
// multiplied by 1/(1 - p) or 0 after the running sum took it.
// Included by the attention_fwd_tc_*.cu files, one instantiation each (compile time), with and
// without a tensor mask and with and without dropout (kTensorMask, kDropout: at 255 registers
// every live value counts, and the unrolled Philox code was most of the plain kernel's loop;
// DESIGN.md gives ptxas's and cuobjdump's counts).
#pragma once

#include "kernels.h"
#include "launch.cuh"
#include "mma.cuh"
#include "tc_mask.cuh"

namespace selfattn::cuda {

template <int kDim_, int kBlockM_, int kBlockN_, int kWarps_>
struct FwdTcConfig {
  static constexpr int kDim = kDim_;          // D = Dv
  static constexpr int kBlockM = kBlockM_;    // queries per block
  static constexpr int kBlockN = kBlockN_;    // keys per tile
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowsPerWarp = kBlockM / kWarps;  // consecutive rows
  static constexpr int kMTiles = kRowsPerWarp / 16;      // 16-row mma tiles per warp
  static constexpr int kQBytes = kBlockM * kDim * 2;
  static constexpr int kKVBytes = kBlockN * kDim * 2;
  static constexpr int kSmemBytes = kQBytes + 2 * kKVBytes;  // q, k, v tiles

  static_assert(kRowsPerWarp % 16 == 0, "warps own whole 16-row mma tiles");
  static_assert(kBlockN % 16 == 0, "key tiles of whole 16-key k-steps");
  static_assert(kSmemBytes <= 99 * 1024, "fits sm_86/89 (99 KB per block)");
};

// q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, D), out (B, Hq, Nq, D): T (half or bfloat16),
// unit stride along D, other strides multiples of 8, 16-byte aligned bases; lse (B, H, Nq) float,
// any strides. Grid: row_blocks * B * H blocks of Cfg::kThreads threads, Cfg::kSmemBytes of
// dynamic shared memory. Requires Nk >= 1; kTensorMask: p.mask may be present (else it is not);
// kDropout: p.dropout may be active (else it is not).
template <typename T, typename Cfg, bool kTensorMask, bool kDropout>
__global__ void __launch_bounds__(Cfg::kThreads) attention_forward_tc_kernel(const ForwardParams<T> p) {
#if SELFATTN_TC_ARCH
  constexpr int D = Cfg::kDim, kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kMT = Cfg::kMTiles;
  constexpr int kSTiles = kBN / 8;  // n-tiles of a score row block
  constexpr int kOTiles = D / 8;    // n-tiles of an output row block

  char* const q_s = reinterpret_cast<char*>(dynamic_smem());  // (kBM, D): the block's queries
  char* const k_s = q_s + Cfg::kQBytes;                         // (kBN, D): a tile of keys
  char* const v_s = k_s + Cfg::kKVBytes;                        // (kBN, D): their values

  // Heaviest blocks first: under causal masking the last query blocks see the most keys.
  const int64_t bh = blockIdx.x % p.batch_heads;
  const int q_block = p.row_blocks - 1 - static_cast<int>(blockIdx.x / p.batch_heads);
  const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int q0 = q_block * kBM;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = warp * Cfg::kRowsPerWarp;  // within the block
  const int warp_first = q0 + warp_row0, warp_last = warp_first + Cfg::kRowsPerWarp - 1;

  const T* const q_src = p.q.data + b * p.q.stride_b + h * p.q.stride_h;
  const T* const k_src = p.k.data + b * p.k.stride_b + hk * p.k.stride_h;
  const T* const v_src = p.v.data + b * p.v.stride_b + hk * p.v.stride_h;

  // The key tiles some query of the block may see: n_begin .. n_end - 1; the others are never
  // loaded. The warp's real rows: [warp_first, warp_q1).
  const Band band = p.band;
  const int q_last = imin(p.nq, q0 + kBM) - 1;
  const int n_begin = clip(band.first_key(q0), 0, p.nk) / kBN;
  const int n_end = (clip(band.last_key(q_last) + 1, 0, p.nk) + kBN - 1) / kBN;
  const int warp_q1 = imin(p.nq, warp_last + 1);
  const float scale_log2 = p.scale * kLog2e;
  const TcScoreMask<kTensorMask> mask = tc_score_mask<kTensorMask>(p, b, h);
  // Scores to base 2: raw ones (times scale_log2), or natural ones with an additive mask.
  const float to_base2 = mask.additive() ? kLog2e : scale_log2;
  const DropoutKey drop = dropout_key(p.dropout);
  const SmemAddr q_a = smem_addr(q_s), k_a = smem_addr(k_s), v_a = smem_addr(v_s);
  FragOffsets<D> a_off = a_offsets<D>(lane), b_off = b_offsets<D>(lane), bt_off = bt_offsets<D>(lane);

  load_tile_async<kBM, D, Cfg::kThreads>(q_s, q_src, p.q.stride_n, q0, p.nq);
  if (n_begin < n_end) {
    load_tile_async<kBN, D, Cfg::kThreads>(k_s, k_src, p.k.stride_n, n_begin * kBN, p.nk);
  }
  cp_async_commit();

  // Rows g and g + 8 of each of the warp's mma tiles: [mi][0] row g, [mi][1] row g + 8.
  float o[kMT][kOTiles][4];
  float row_max[kMT][2];  // running max of the raw scores, the same in the quad's 4 lanes
  float row_sum[kMT][2];  // running sum of exp2(.) over this lane's columns only
  // A sink (kTensorMask only, natural units) starts every row: max sink(h), sum 1 in lane t = 0.
  const float start_max = kTensorMask ? sink_max<float>(p.scores, h) : -INFINITY;
  const float start_sum = kTensorMask && t == 0 ? sink_sum<float>(p.scores) : 0.f;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        o[mi][j][e] = 0.f;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[mi][r] = start_max;
      row_sum[mi][r] = start_sum;
    }
  }

  for (int n = n_begin; n < n_end; ++n) {
    const int k0 = n * kBN;
    a_off.refresh();
    b_off.refresh();
    bt_off.refresh();
    cp_async_wait<0>();
    __syncthreads();  // key tile n (and the queries) landed; every warp is done with value tile n-1
    load_tile_async<kBN, D, Cfg::kThreads>(v_s, v_src, p.v.stride_n, k0, p.nk);
    cp_async_commit();

    // A warp none of whose rows sees a key of the tile skips it.
    const bool active = warp_first < warp_q1 && band.touches(warp_first, warp_q1, k0, k0 + kBN);
    // P rounded to T as A fragments of P v (half the registers of the float scores, which end
    // here): [mi][kk] covers keys 16 kk .. 16 kk + 15 of the tile.
    uint32_t pa[kMT][kBN / 16][4];
    if (active) {
      float s[kMT][kSTiles][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mi][j][e] = 0.f;
          }
        }
      }
      // s = q kᵀ: per 16-deep k-step, the warp's query fragments once, each key fragment pair
      // once for all of the warp's mma tiles.
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t qa[kMT][4];
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          ldmatrix_x4<false>(qa[mi], q_a + a_off(warp_row0 + 16 * mi, ks));
        }
#pragma unroll
        for (int jp = 0; jp < kSTiles / 2; ++jp) {
          uint32_t kb[4];
          ldmatrix_x4<false>(kb, k_a + b_off(16 * jp, ks));
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            mma_16816<T>(s[mi][2 * jp], qa[mi], kb);
            mma_16816<T>(s[mi][2 * jp + 1], qa[mi], kb + 2);
          }
        }
      }

      // Mask every tile under a tensor mask, else only where the tile crosses the end of the keys
      // or the band does not cover it for every row of the warp (padding rows past Nq: masked
      // whole when masking, never stored).
      if (mask.per_score() || k0 + kBN > p.nk || !band.covers(warp_first, warp_last + 1, k0, k0 + kBN)) {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
          for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = warp_first + 16 * mi + g + 8 * (e >> 1);
              const int key = k0 + 8 * j + 2 * t + (e & 1);
              s[mi][j][e] = mask.template apply<T>(s[mi][j][e], b, h, row, key);
            }
          }
        }
      }

      // Online softmax: new row max (over the quad's lanes), the factor alpha that rescales what
      // was accumulated under the old max, and the probabilities exp2(s * scale_log2 - max_scaled).
      float alpha[kMT][2];
      bool rescale = false;
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float tile_max = row_max[mi][r];
#pragma unroll
          for (int j = 0; j < kSTiles; ++j) {
            tile_max = fmaxf(tile_max, fmaxf(s[mi][j][2 * r], s[mi][j][2 * r + 1]));
          }
          tile_max = group_max<4>(tile_max);
          // A row that has seen no key yet (all masked so far) keeps base 0 and alpha 1: no
          // inf - inf. An unchanged max gives alpha = exp2(0) = 1 exactly.
          const bool none = tile_max == -INFINITY;
          const float base = none ? 0.f : mask.additive() ? tile_max : tile_max * scale_log2;
          alpha[mi][r] = none ? 1.f : fast_exp2((row_max[mi][r] - tile_max) * to_base2);
          rescale = rescale || alpha[mi][r] != 1.f;
          row_max[mi][r] = tile_max;
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) {
              s[mi][j][e] = tc_probability(mask, s[mi][j][e], scale_log2, base);
              sum += s[mi][j][e];
            }
          }
          row_sum[mi][r] = row_sum[mi][r] * alpha[mi][r] + sum;
          // Dropout, once the sum has the probabilities: the lane's keys 2t, 2t + 1 of each 8
          // share one Philox call.
          if (kDropout && drop.active) {  // (a runtime test too: ptxas spills less around a branch)
            const int row = warp_first + 16 * mi + g + 8 * r;
#pragma unroll
            for (int j = 0; j < kSTiles; ++j) {
              const float2 f = dropout_factor_pair(drop, b, h, row, k0 + 8 * j + 2 * t);
              s[mi][j][2 * r] *= f.x;
              s[mi][j][2 * r + 1] *= f.y;
            }
          }
        }
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          accumulators_to_a<T>(pa[mi][kk], s[mi][2 * kk], s[mi][2 * kk + 1]);
        }
      }
      // Rescale the output accumulators, unless no row of the warp raised its max (the common
      // case after the first tiles: multiplying by exactly 1 changes nothing, so skipping it is
      // bitwise neutral).
      if (__any_sync(kFullMask, rescale)) {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
          for (int j = 0; j < kOTiles; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              o[mi][j][e] *= alpha[mi][e >> 1];
            }
          }
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // value tile n landed; every warp is done with key tile n
    if (n + 1 < n_end) {
      load_tile_async<kBN, D, Cfg::kThreads>(k_s, k_src, p.k.stride_n, k0 + kBN, p.nk);
      cp_async_commit();
    }

    if (active) {
      // o += P v, v through ldmatrix.trans. Keys past Nk have P = 0 and zero-filled values.
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
        for (int jp = 0; jp < kOTiles / 2; ++jp) {
          uint32_t vb[4];
          ldmatrix_x4<true>(vb, v_a + bt_off(16 * kk, jp));
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            mma_16816<T>(o[mi][2 * jp], pa[mi][kk], vb);
            mma_16816<T>(o[mi][2 * jp + 1], pa[mi][kk], vb + 2);
          }
        }
      }
    }
  }

  if (n_begin >= n_end) {  // no key tile: the queries' copies into q_s are still in flight
    cp_async_wait<0>();
    __syncthreads();
  }

  // Normalize; lse = ln(sum) + max in natural units (-inf, and a zero row, where the row saw no
  // key). Rows go out through the warp's own rows of q_s (no other warp reads them), then as
  // 16-byte stores.
  const int64_t lse_base = b * p.lse_stride_b + h * p.lse_stride_h;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = group_sum<4>(row_sum[mi][r]);
      inv[r] = total > 0.f ? 1.f / total : 0.f;
      const int row = warp_first + 16 * mi + g + 8 * r;
      if (t == 0 && row < p.nq) {
        p.lse[lse_base + row * p.lse_stride_n] = total <= 0.f ? -INFINITY
                                                 : mask.additive()
                                                     ? row_max[mi][r] + log2f(total) * kLn2
                                                     : (row_max[mi][r] * scale_log2 + log2f(total)) * kLn2;
      }
    }
    store_accumulators<T, D, kOTiles>(q_s, warp_row0 + 16 * mi, o[mi], inv, lane);
  }
  __syncwarp();
  store_rows<Cfg::kRowsPerWarp, D>(p.out.data + b * p.out.stride_b + h * p.out.stride_h, p.out.stride_n, q0, p.nq, q_s,
                                   warp_row0, lane);
#endif
}

template <typename T, typename Cfg, bool kTensorMask>
void launch_forward_tc(const ForwardParams<T>& p, cudaStream_t stream) {
  const bool dropout = p.dropout.active();
  launch(dropout ? attention_forward_tc_kernel<T, Cfg, kTensorMask, true>
                 : attention_forward_tc_kernel<T, Cfg, kTensorMask, false>,
         p.row_blocks * p.batch_heads, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
}

template <typename T, typename Cfg>
void launch_forward_tc(ForwardParams<T> p, cudaStream_t stream) {
  p.row_blocks = static_cast<int>(ceil_div(p.nq, Cfg::kBlockM));
  if (p.mask.present() || p.scores.any()) {  // score modifications take the masked kernel
    launch_forward_tc<T, Cfg, true>(p, stream);
  } else {
    launch_forward_tc<T, Cfg, false>(p, stream);
  }
}

// Tile configurations (FlashAttention-2's for sm_80/sm_90): 128 queries per block, 4 warps of
// 32 rows (two mma tiles share every key/value fragment load), 64 keys per tile at D = 128
// (smem 64 KB) and 128 at D = 64 (48 KB).
template <int kDim>
using ForwardTcConfig = FwdTcConfig<kDim, 128, kDim == 64 ? 128 : 64, 4>;

template <typename T, int kDim>
void forward_tc(const ForwardParams<T>& p, cudaStream_t stream) {
  launch_forward_tc<T, ForwardTcConfig<kDim>>(p, stream);
}

}  // namespace selfattn::cuda
