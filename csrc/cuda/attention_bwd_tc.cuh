// Tensor-core backward of attention for fp16/bf16 at head dims 64 and 128, deterministic by
// design (no atomics: every gradient element is summed by one warp in a fixed order; checked
// bitwise in the CPU emulation under varied thread orders, not yet run on a GPU).
//
// With S = scale q kᵀ, P = exp(S - lse), delta = rowsum(dO ∘ out):
//   dv = Pᵀ dO,   dP = dO vᵀ,   dS = P ∘ (dP - delta),   dq = scale dS k,   dk = scale dSᵀ q.
// With dropout (M = keep / (1 - p), philox.h): dv = (P ∘ M)ᵀ dO, dS = P ∘ (M ∘ dP - delta).
// Two kernels, both on mma.sync m16n8k16, recomputing P from lse in base 2 (one FFMA + EX2):
//   dq (first): a block per query block streams key/value tiles (FlashAttention-2's forward
//      split); a warp owns 16 query rows: S, dP, dS in registers, dS is the A operand of dS k
//      straight from its accumulators. It also computes delta for its rows and writes it out.
//   dk/dv (second, reads delta): a block per key block streams query tiles (FlashAttention-2's
//      backward split); a warp owns 16 keys and computes Sᵀ = k qᵀ and dPᵀ = v dOᵀ directly, so
//      Pᵀ and dSᵀ are the A operands of Pᵀ dO and dSᵀ q without a trip through shared memory.
// Recomputing S and dP in the dq kernel costs 7 GEMMs where FlashAttention-2 does 5 plus
// atomic adds of dq: the price of determinism. In exchange neither kernel needs shared memory
// for P or dS, nor a dq accumulation buffer (what that saves in time is not measured yet).
//
// Both stream their tiles through a two-stage cp.async ring: tile n+1 is fetched while tile n
// is computed, one barrier per tile. Masks (the band of mask.h and the tensor mask,
// tc_mask.cuh): tiles no row of the block sees by the band are never loaded, a warp skips the
// tiles none of its rows sees, only tiles the band does not cover for the warp are masked element
// by element, every tile under a tensor mask; P = 0 for a row with lse = -inf. Grouped-query attention: query head h reads kv head h / group;
// the dk/dv kernel of kv head hk streams the query tiles of heads hk * G .. hk * G + G - 1 in
// that order into the same accumulators (a fixed order, no atomics).
// Included by the attention_bwd_tc_*.cu files, one instantiation each.
#pragma once

#include "kernels.h"
#include "launch.cuh"
#include "mma.cuh"
#include "tc_mask.cuh"

namespace selfattn::cuda {

// ---------------------------------------------------------------------------------------------
// dq (and delta)

template <int kDim_, int kBlockN_, int kWarps_>
struct DqTcConfig {
  static constexpr int kDim = kDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // queries per block, 16 per warp
  static constexpr int kBlockN = kBlockN_;  // keys per tile
  static constexpr int kRowBytes = kBlockM * kDim * 2;
  static constexpr int kTileBytes = kBlockN * kDim * 2;
  static constexpr int kStageBytes = 2 * kTileBytes;  // k and v tiles
  static constexpr int kSmemBytes = 2 * kRowBytes + 2 * kStageBytes;  // q, dO, two stages

  static_assert(kBlockN % 16 == 0, "key tiles of whole 16-key k-steps");
  static_assert(kSmemBytes <= 99 * 1024, "fits sm_86/89 (99 KB per block)");
};

// grad_q and delta of a block of queries. q, k, v, out, grad_out, grad_q: T, layouts as for the
// forward (unit stride along D, other strides multiples of 8, 16-byte aligned); lse (B, H, Nq)
// float any strides; delta (B*H*Nq) float, written here. Grid: row_blocks * B * H blocks of
// Cfg::kThreads, Cfg::kSmemBytes. Requires Nk >= 1. kDropout: p.dropout may be active (else it is
// not; the plain kernel carries no Philox code, which was over a third of its loop).
template <typename T, typename Cfg, bool kDropout>
__global__ void __launch_bounds__(Cfg::kThreads) attention_backward_dq_tc_kernel(const BackwardParams<T> p) {
#if SELFATTN_TC_ARCH
  constexpr int D = Cfg::kDim, kBM = Cfg::kBlockM, kBN = Cfg::kBlockN;
  constexpr int kSTiles = kBN / 8, kDTiles = D / 8;
  using S = Swizzle<D>;

  char* const q_s = reinterpret_cast<char*>(dynamic_smem());  // (kBM, D): the block's queries
  char* const do_s = q_s + Cfg::kRowBytes;  // (kBM, D): their rows of dO
  char* const stages = do_s + Cfg::kRowBytes;  // 2 x {k (kBN, D), v (kBN, D)}

  const int64_t bh = blockIdx.x % p.batch_heads;
  const int q_block = p.row_blocks - 1 - static_cast<int>(blockIdx.x / p.batch_heads);
  const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int q0 = q_block * kBM;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = 16 * warp;
  const int warp_first = q0 + warp_row0, warp_last = warp_first + 15;
  const int warp_q1 = imin(p.nq, warp_last + 1);  // the warp's real rows: [warp_first, warp_q1)

  const T* const q_src = p.q.data + b * p.q.stride_b + h * p.q.stride_h;
  const T* const k_src = p.k.data + b * p.k.stride_b + hk * p.k.stride_h;
  const T* const v_src = p.v.data + b * p.v.stride_b + hk * p.v.stride_h;
  const T* const do_src = p.grad_out.data + b * p.grad_out.stride_b + h * p.grad_out.stride_h;
  const T* const out_src = p.out.data + b * p.out.stride_b + h * p.out.stride_h;

  // The key tiles some query of the block may see: n_begin .. n_end - 1.
  const Band band = p.band;
  const int q_last = imin(p.nq, q0 + kBM) - 1;
  const int n_begin = clip(band.first_key(q0), 0, p.nk) / kBN;
  const int n_end = (clip(band.last_key(q_last) + 1, 0, p.nk) + kBN - 1) / kBN;
  const float scale_log2 = p.scale * kLog2e;
  const TcScoreMask<true> mask = tc_score_mask<true>(p, b, h);
  const DropoutKey drop = dropout_key(p.dropout);
  const SmemAddr q_a = smem_addr(q_s), do_a = smem_addr(do_s), stages_a = smem_addr(stages);
  FragOffsets<D> a_off = a_offsets<D>(lane), b_off = b_offsets<D>(lane), bt_off = bt_offsets<D>(lane);

  load_tile_async<kBM, D, Cfg::kThreads>(q_s, q_src, p.q.stride_n, q0, p.nq);
  load_tile_async<kBM, D, Cfg::kThreads>(do_s, do_src, p.grad_out.stride_n, q0, p.nq);
  if (n_begin < n_end) {
    load_tile_async<kBN, D, Cfg::kThreads>(stages, k_src, p.k.stride_n, n_begin * kBN, p.nk);
    load_tile_async<kBN, D, Cfg::kThreads>(stages + Cfg::kTileBytes, v_src, p.v.stride_n, n_begin * kBN, p.nk);
  }
  cp_async_commit();

  // This lane's rows: g and g + 8 of the warp's 16. delta = rowsum(dO ∘ out) straight from
  // global memory while the tiles load: the quad's 4 lanes take every 4th 16-byte chunk.
  float lse_sub[2], delta[2];  // lse as tc_probability subtracts it
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_first + g + 8 * r;
    float sum = 0.f;
    if (row < p.nq) {
#pragma unroll
      for (int c = t; c < S::kChunks; c += 4) {
        const T* o_at = out_src + row * p.out.stride_n + 8 * c;
        const T* d_at = do_src + row * p.grad_out.stride_n + 8 * c;
        SELFATTN_CHECK_ALIGNED(o_at, 16);
        SELFATTN_CHECK_ALIGNED(d_at, 16);
        const Chunk16 ov = *reinterpret_cast<const Chunk16*>(o_at);
        const Chunk16 dv = *reinterpret_cast<const Chunk16*>(d_at);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float2 x = unpack2<T>(ov.w[w]), y = unpack2<T>(dv.w[w]);
          sum = fmaf(x.x, y.x, sum);
          sum = fmaf(x.y, y.y, sum);
        }
      }
    }
    delta[r] = group_sum<4>(sum);
    lse_sub[r] = 0.f;  // padding rows: masked or zero inputs, finite P, never stored
    if (row < p.nq) {
      const float lse = p.lse[b * p.lse_stride_b + h * p.lse_stride_h + row * p.lse_stride_n];
      lse_sub[r] = tc_subtrahend(mask, backward_lse(lse));
      if (t == 0) {
        p.delta[bh * p.nq + row] = delta[r];
      }
    }
  }

  float dq[kDTiles][4];
#pragma unroll
  for (int j = 0; j < kDTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dq[j][e] = 0.f;
    }
  }

  for (int n = n_begin; n < n_end; ++n) {
    const int k0 = n * kBN, it = n - n_begin;
    a_off.refresh();
    b_off.refresh();
    bt_off.refresh();
    cp_async_wait<0>();
    __syncthreads();  // stage `it` landed; every warp is done with stage it-1, which is refilled now
    if (n + 1 < n_end) {
      char* next = stages + ((it + 1) & 1) * Cfg::kStageBytes;
      load_tile_async<kBN, D, Cfg::kThreads>(next, k_src, p.k.stride_n, k0 + kBN, p.nk);
      load_tile_async<kBN, D, Cfg::kThreads>(next + Cfg::kTileBytes, v_src, p.v.stride_n, k0 + kBN, p.nk);
      cp_async_commit();
    }
    if (warp_first >= warp_q1 || !band.touches(warp_first, warp_q1, k0, k0 + kBN)) {
      continue;  // no row of the warp sees a key of the tile
    }
    const SmemAddr k_a = stages_a + (it & 1) * Cfg::kStageBytes, v_a = k_a + Cfg::kTileBytes;

    // s = q kᵀ and dp = dO vᵀ for the warp's 16 rows.
    float s[kSTiles][4], dp[kSTiles][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = 0.f;
        dp[j][e] = 0.f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t qa[4], da[4];
      ldmatrix_x4<false>(qa, q_a + a_off(warp_row0, ks));
      ldmatrix_x4<false>(da, do_a + a_off(warp_row0, ks));
#pragma unroll
      for (int jp = 0; jp < kSTiles / 2; ++jp) {
        uint32_t kb[4], vb[4];
        ldmatrix_x4<false>(kb, k_a + b_off(16 * jp, ks));
        ldmatrix_x4<false>(vb, v_a + b_off(16 * jp, ks));
        mma_16816<T>(s[2 * jp], qa, kb);
        mma_16816<T>(s[2 * jp + 1], qa, kb + 2);
        mma_16816<T>(dp[2 * jp], da, vb);
        mma_16816<T>(dp[2 * jp + 1], da, vb + 2);
      }
    }

    // dS = P ∘ (dP - delta), P = exp(masked score - lse); masked entries have P = 0.
    const bool masked = mask.per_score() || k0 + kBN > p.nk || !band.covers(warp_first, warp_last + 1, k0, k0 + kBN);
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
      // Dropout's M for the lane's keys 2t, 2t + 1 of rows g and g + 8 (one Philox call per row).
      float2 keep[2] = {make_float2(1.f, 1.f), make_float2(1.f, 1.f)};
      if (kDropout && drop.active) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          keep[r] = dropout_factor_pair(drop, b, h, warp_first + g + 8 * r, k0 + 8 * j + 2 * t);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = warp_first + g + 8 * (e >> 1), key = k0 + 8 * j + 2 * t + (e & 1);
        float grad = 1.f;  // the softcap's 1 - tanh²
        const float x = masked ? mask.apply<T>(s[j][e], b, h, row, key, &grad) : s[j][e];
        const float prob = tc_probability(mask, x, scale_log2, lse_sub[e >> 1]);
        const float m = (e & 1) ? keep[e >> 1].y : keep[e >> 1].x;
        s[j][e] = prob * (m * dp[j][e] - delta[e >> 1]) * grad;
      }
    }

    // dq += dS k: dS from its accumulators, k through ldmatrix.trans (keys as the k dimension).
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[4];
      accumulators_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int jp = 0; jp < kDTiles / 2; ++jp) {
        uint32_t kb[4];
        ldmatrix_x4<true>(kb, k_a + bt_off(16 * kk, jp));
        mma_16816<T>(dq[2 * jp], a, kb);
        mma_16816<T>(dq[2 * jp + 1], a, kb + 2);
      }
    }
  }

  if (n_begin >= n_end) {  // no key tile: the copies into q_s and do_s are still in flight
    cp_async_wait<0>();
    __syncthreads();
  }

  // grad_q = scale * dq, through the warp's own rows of q_s.
  const float factor[2] = {p.scale, p.scale};
  store_accumulators<T, D, kDTiles>(q_s, warp_row0, dq, factor, lane);
  __syncwarp();
  store_rows<16, D>(p.grad_q.data + b * p.grad_q.stride_b + h * p.grad_q.stride_h, p.grad_q.stride_n, q0, p.nq, q_s,
                    warp_row0, lane);
#endif
}

// ---------------------------------------------------------------------------------------------
// dk, dv

template <int kDim_, int kBlockM_, int kSubM_, int kWarps_>
struct DkdvTcConfig {
  static constexpr int kDim = kDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;  // keys per block, 16 per warp
  static constexpr int kBlockM = kBlockM_;  // queries per tile (one stage of the ring)
  static constexpr int kSubM = kSubM_;  // queries per step of the math
  static constexpr int kKeyBytes = kBlockN * kDim * 2;
  static constexpr int kTileBytes = kBlockM * kDim * 2;
  static constexpr int kStageBytes = 2 * kTileBytes + 2 * kBlockM * 4;  // q, dO, lse, delta
  static constexpr int kSmemBytes = 2 * kKeyBytes + 2 * kStageBytes;  // k, v, two stages

  static_assert(kBlockM % 32 == 0, "query tiles of whole 16-query k-steps, lse/delta 128-byte aligned");
  static_assert(kSubM % 16 == 0 && kBlockM % kSubM == 0, "sub-tiles of whole k-steps");
  static_assert(2 * kBlockM <= kThreads, "one thread per lse or delta value of a tile");
  static_assert(kSmemBytes <= 99 * 1024, "fits sm_86/89 (99 KB per block)");
};

// grad_k, grad_v of a block of keys. Tensors as for the dq kernel; delta as written by it.
// grad_k, grad_v: every element of the block's rows below Nk written (zeros for keys no query
// sees). Grid: row_blocks (key blocks) * B * H blocks of Cfg::kThreads, Cfg::kSmemBytes.
// kDropout as for the dq kernel.
template <typename T, typename Cfg, bool kDropout>
__global__ void __launch_bounds__(Cfg::kThreads) attention_backward_dkdv_tc_kernel(const BackwardParams<T> p) {
#if SELFATTN_TC_ARCH
  constexpr int D = Cfg::kDim, kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kSubM = Cfg::kSubM;
  constexpr int kQTiles = kSubM / 8, kDTiles = D / 8;

  char* const k_s = reinterpret_cast<char*>(dynamic_smem());  // (kBN, D): the block's keys
  char* const v_s = k_s + Cfg::kKeyBytes;  // (kBN, D): their values
  char* const stages = v_s + Cfg::kKeyBytes;  // 2 x {q (kBM, D), dO (kBM, D), lse, delta (kBM)}

  // Key block 0 first: under causal masking the first key blocks are seen by the most queries.
  const int64_t batch_heads_kv = p.batch_heads / p.group;
  const int64_t bhk = blockIdx.x % batch_heads_kv;
  const int k_block = static_cast<int>(blockIdx.x / batch_heads_kv);
  const int64_t b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int k0 = k_block * kBN;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = 16 * warp;
  const int warp_first = k0 + warp_row0, warp_last = warp_first + 15;  // the warp's keys
  const int warp_k1 = imin(p.nk, warp_last + 1);  // the warp's real keys: [warp_first, warp_k1)

  const T* const k_src = p.k.data + b * p.k.stride_b + hk * p.k.stride_h;
  const T* const v_src = p.v.data + b * p.v.stride_b + hk * p.v.stride_h;
  const float scale_log2 = p.scale * kLog2e;
  TcScoreMask<true> mask = tc_score_mask<true>(p, b, hk * p.group);  // mods.slope: per query head below
  const DropoutKey drop = dropout_key(p.dropout);
  const SmemAddr k_a = smem_addr(k_s), v_a = smem_addr(v_s), stages_a = smem_addr(stages);
  FragOffsets<D> a_off = a_offsets<D>(lane), b_off = b_offsets<D>(lane), bt_off = bt_offsets<D>(lane);

  // The query tiles whose queries may see some key of the block: m_begin .. m_end - 1, for each
  // of the group's query heads in turn: step `it` is query head hk * G + it / tiles, tile
  // m_begin + it % tiles.
  const Band band = p.band;
  const int k_last = imin(p.nk, k0 + kBN) - 1;
  const int m_begin = clip(band.first_query(k0), 0, p.nq) / kBM;
  const int m_end = (clip(band.last_query(k_last + 1) + 1, 0, p.nq) + kBM - 1) / kBM;
  const int tiles = imax(0, m_end - m_begin), steps = tiles * p.group;

  // One stage: query tile m of query head h: its rows of q and dO, and its lse and delta (zeros
  // past Nq).
  const auto load_stage = [&](char* stage, int64_t h, int m) {
    const T* const q_src = p.q.data + b * p.q.stride_b + h * p.q.stride_h;
    const T* const do_src = p.grad_out.data + b * p.grad_out.stride_b + h * p.grad_out.stride_h;
    const float* const lse_src = p.lse + b * p.lse_stride_b + h * p.lse_stride_h;
    const float* const delta_src = p.delta + (b * p.heads + h) * p.nq;
    const int row0 = m * kBM;
    load_tile_async<kBM, D, Cfg::kThreads>(stage, q_src, p.q.stride_n, row0, p.nq);
    load_tile_async<kBM, D, Cfg::kThreads>(stage + Cfg::kTileBytes, do_src, p.grad_out.stride_n, row0, p.nq);
    // Threads 0 .. kBM-1 copy lse, the next kBM delta: one float each.
    const int c = threadIdx.x, i = c % kBM;
    if (c < 2 * kBM) {
      const bool valid = row0 + i < p.nq;
      const float* from = c < kBM ? lse_src + (row0 + i) * p.lse_stride_n : delta_src + row0 + i;
      cp_async_4(smem_addr(stage + 2 * Cfg::kTileBytes) + 4 * c, valid ? from : lse_src, valid);
    }
  };

  load_tile_async<kBN, D, Cfg::kThreads>(k_s, k_src, p.k.stride_n, k0, p.nk);
  load_tile_async<kBN, D, Cfg::kThreads>(v_s, v_src, p.v.stride_n, k0, p.nk);
  if (steps > 0) {
    load_stage(stages, hk * p.group, m_begin);
  }
  cp_async_commit();

  float dk[kDTiles][4], dv[kDTiles][4];
#pragma unroll
  for (int j = 0; j < kDTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dk[j][e] = 0.f;
      dv[j][e] = 0.f;
    }
  }

  for (int it = 0; it < steps; ++it) {
    const int m = m_begin + it % tiles;
    a_off.refresh();
    b_off.refresh();
    bt_off.refresh();
    cp_async_wait<0>();
    __syncthreads();  // stage `it` landed; every warp is done with the other stage, refilled now
    if (it + 1 < steps) {
      load_stage(stages + ((it + 1) & 1) * Cfg::kStageBytes, hk * p.group + (it + 1) / tiles,
                 m_begin + (it + 1) % tiles);
      cp_async_commit();
    }
    const int q0 = m * kBM;
    if (warp_first >= warp_k1 || !band.touches(q0, imin(p.nq, q0 + kBM), warp_first, warp_k1)) {
      continue;  // no query of the tile sees a key of the warp
    }
    const char* const stage = stages + (it & 1) * Cfg::kStageBytes;
    const SmemAddr q_a = stages_a + (it & 1) * Cfg::kStageBytes, do_a = q_a + Cfg::kTileBytes;
    const float* const lse_s = reinterpret_cast<const float*>(stage + 2 * Cfg::kTileBytes);
    const float* const delta_s = lse_s + kBM;

    // The tile in sub-tiles of kSubM queries (registers: sᵀ and dPᵀ of the whole tile next to
    // the dk and dv accumulators would not fit at D = 128).
#pragma unroll
    for (int sub = 0; sub < kBM / kSubM; ++sub) {
      const int c0 = sub * kSubM;  // the sub-tile's first query within the tile
      if (q0 + c0 >= p.nq || !band.touches(q0 + c0, imin(p.nq, q0 + c0 + kSubM), warp_first, warp_k1)) {
        continue;
      }

      // sᵀ = k qᵀ and dPᵀ = v dOᵀ: the warp's 16 keys as rows, the sub-tile's queries as columns.
      float st[kQTiles][4], dpt[kQTiles][4];
#pragma unroll
      for (int j = 0; j < kQTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          st[j][e] = 0.f;
          dpt[j][e] = 0.f;
        }
      }
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t ka[4], va[4];
        ldmatrix_x4<false>(ka, k_a + a_off(warp_row0, ks));
        ldmatrix_x4<false>(va, v_a + a_off(warp_row0, ks));
#pragma unroll
        for (int jp = 0; jp < kQTiles / 2; ++jp) {
          uint32_t qb[4], db[4];
          ldmatrix_x4<false>(qb, q_a + b_off(c0 + 16 * jp, ks));
          ldmatrix_x4<false>(db, do_a + b_off(c0 + 16 * jp, ks));
          mma_16816<T>(st[2 * jp], ka, qb);
          mma_16816<T>(st[2 * jp + 1], ka, qb + 2);
          mma_16816<T>(dpt[2 * jp], va, db);
          mma_16816<T>(dpt[2 * jp + 1], va, db + 2);
        }
      }

      // Pᵀ = exp(masked sᵀ - lse[query]) and dSᵀ = Pᵀ ∘ (dPᵀ - delta[query]); masked entries
      // (queries past Nq, keys past Nk, outside the band or the tensor mask) have Pᵀ = 0.
      const int qs0 = q0 + c0;
      const int64_t hq = hk * p.group + it / tiles;  // the tile's query head
      if (p.scores.has_alibi()) {
        mask.mods.slope = p.scores.slope(b, hq);
      }
      const bool masked = mask.per_score() || qs0 + kSubM > p.nq || warp_last >= p.nk ||
                          !band.covers(qs0, qs0 + kSubM, warp_first, warp_last + 1);
#pragma unroll
      for (int j = 0; j < kQTiles; ++j) {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int col = c0 + 8 * j + 2 * t + e2;  // query within the tile
          const float lse_sub = tc_subtrahend(mask, backward_lse(lse_s[col])), dlt = delta_s[col];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int e = 2 * r + e2;
            float grad = 1.f;  // the softcap's 1 - tanh²
            const float x = masked ? mask.apply<T>(st[j][e], b, hq, q0 + col, warp_first + g + 8 * r, &grad) : st[j][e];
            const float prob = tc_probability(mask, x, scale_log2, lse_sub);
            // Dropout: keys run down the rows here, so each decision is a Philox call of its own.
            const float keep =
                kDropout && drop.active ? dropout_factor(drop, b, hq, q0 + col, warp_first + g + 8 * r) : 1.f;
            st[j][e] = prob * keep;
            dpt[j][e] = prob * (keep * dpt[j][e] - dlt) * grad;
          }
        }
      }

      // dv += Pᵀ dO and dk += dSᵀ q: A from the accumulators, B = dO / q through ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kSubM / 16; ++kk) {
        uint32_t pa[4], sa[4];
        accumulators_to_a<T>(pa, st[2 * kk], st[2 * kk + 1]);
        accumulators_to_a<T>(sa, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int jp = 0; jp < kDTiles / 2; ++jp) {
          uint32_t db[4], qb[4];
          ldmatrix_x4<true>(db, do_a + bt_off(c0 + 16 * kk, jp));
          ldmatrix_x4<true>(qb, q_a + bt_off(c0 + 16 * kk, jp));
          mma_16816<T>(dv[2 * jp], pa, db);
          mma_16816<T>(dv[2 * jp + 1], pa, db + 2);
          mma_16816<T>(dk[2 * jp], sa, qb);
          mma_16816<T>(dk[2 * jp + 1], sa, qb + 2);
        }
      }
    }
  }
  if (steps == 0) {  // no query sees these keys: the k, v copies are still in flight
    cp_async_wait<0>();
    __syncthreads();
  }

  // grad_k = scale * dk, grad_v = dv, through the warp's own rows of k_s and v_s.
  const float k_factor[2] = {p.scale, p.scale}, v_factor[2] = {1.f, 1.f};
  store_accumulators<T, D, kDTiles>(k_s, warp_row0, dk, k_factor, lane);
  store_accumulators<T, D, kDTiles>(v_s, warp_row0, dv, v_factor, lane);
  __syncwarp();
  store_rows<16, D>(p.grad_k.data + b * p.grad_k.stride_b + hk * p.grad_k.stride_h, p.grad_k.stride_n, k0, p.nk, k_s,
                    warp_row0, lane);
  store_rows<16, D>(p.grad_v.data + b * p.grad_v.stride_b + hk * p.grad_v.stride_h, p.grad_v.stride_n, k0, p.nk, v_s,
                    warp_row0, lane);
#endif
}

// Tile configurations: 4 warps of 16 rows; 64-key (dq) / 64-query (dk/dv) tiles, double
// buffered: dq 96 KB at D = 128 (48 KB at D = 64), dk/dv 97 KB (49 KB); dk/dv does its math in
// 32-query steps at D = 128 (registers).
template <int kDim>
using DqTcDefault = DqTcConfig<kDim, 64, 4>;
template <int kDim>
using DkdvTcDefault = DkdvTcConfig<kDim, 64, kDim == 128 ? 16 : 64, 4>;

template <typename T, int kDim>
void backward_tc(const BackwardParams<T>& params, cudaStream_t stream) {
  BackwardParams<T> p = params;
  using Dq = DqTcDefault<kDim>;
  using Dkdv = DkdvTcDefault<kDim>;
  const bool dropout = p.dropout.active();
  p.row_blocks = static_cast<int>(ceil_div(p.nq, Dq::kBlockM));
  launch(dropout ? attention_backward_dq_tc_kernel<T, Dq, true> : attention_backward_dq_tc_kernel<T, Dq, false>,
         p.row_blocks * p.batch_heads, Dq::kThreads, Dq::kSmemBytes, stream, p);
  p.row_blocks = static_cast<int>(ceil_div(p.nk, Dkdv::kBlockN));
  launch(dropout ? attention_backward_dkdv_tc_kernel<T, Dkdv, true> : attention_backward_dkdv_tc_kernel<T, Dkdv, false>,
         p.row_blocks * (p.batch_heads / p.group), Dkdv::kThreads, Dkdv::kSmemBytes, stream, p);
}

}  // namespace selfattn::cuda
