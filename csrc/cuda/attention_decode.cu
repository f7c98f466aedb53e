// CUDA forward for decoding: a few queries against a long key/value cache (flash-decoding,
// split-K). The CPU twin is csrc/cpu/attention_decode.cpp.
//
// The tiled and tensor-core forwards run one block per (query block, batch, query head): with
// Nq = 1 that is B * Hq blocks however long the cache, mostly padding rows, and each query head
// of a grouped-query group streams the group's k and v again. Here a block is (batch, kv head,
// split of the keys, chunk of kDecodeRows rows): it takes the R = group * Nq rows of all the
// group's query heads at once, so each k/v tile is read once per group (per row chunk), and the
// splits keep every SM busy. Each split leaves its rows, normalised, and their lse; a second
// kernel merges the splits in split order (deterministic: no atomics). A split with lse -inf saw
// no key and weighs 0; a row no split saw gets output 0 and lse -inf. Sinks (score_mods.cuh) enter
// once: split 0 starts its rows with them, so its lse includes the sink and the merge weighs it in.
//
// Scores are computed as the tiled backward recomputes them (tiles.cuh's tile_scores: one fma
// chain over d ascending, from float-converted inputs, then times scale, then the mask term), so
// the backward's P = exp(S - lse) sees the forward's S; the CPU found the gradients' error grows
// several-fold when the two round differently. float64 runs the same code in double.
#include "kernels.h"
#include "launch.cuh"
#include "score_mods.cuh"
#include "warp_rows.cuh"  // kGenericPerLane

#include <algorithm>
#include <type_traits>

namespace selfattn::cuda {
namespace {

constexpr int kDecodeThreads = 128;

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float exp_acc(float x) { return exp2f(x * kLog2e); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A group8_max(A x) {
#pragma unroll
  for (int offset = 4; offset > 0; offset /= 2) {
    const A y = __shfl_xor_sync(kFullMask, x, offset);
    x = y > x ? y : x;
  }
  return x;
}

// Elements c..c+3 of a row into dst (zeros at and past dim): one vector where the layout allows.
template <typename T, typename A>
__device__ __forceinline__ void load_chunk(const Strided4<const T>& src, const T* row, int c, int dim, A* dst) {
  if constexpr (std::is_same_v<A, float>) {
    const float4 x = load4(row, src.stride_d, c, dim, src.vec4);
    dst[0] = x.x, dst[1] = x.y, dst[2] = x.z, dst[3] = x.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dst[e] = c + e < dim ? static_cast<A>(row[(c + e) * src.stride_d]) : A(0);
    }
  }
}

// x[0..3] times factor as elements c..c+3 of a row (those below dim).
template <typename T, typename A>
__device__ __forceinline__ void store_chunk(const Strided4<T>& dst, T* row, int c, int dim, const A (&x)[4], A factor) {
  if constexpr (std::is_same_v<A, float>) {
    store4(row, dst.stride_d, c, dim, dst.vec4,
           make_float4(x[0] * factor, x[1] * factor, x[2] * factor, x[3] * factor));
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (c + e < dim) {
        row[(c + e) * dst.stride_d] = static_cast<T>(x[e] * factor);
      }
    }
  }
}

// Copies `count` rows (k or v of one (b, kv head), from key k0) into dst (kDecodeKeys, stride),
// zeros past count and past dim. Consecutive threads take consecutive chunks of a row.
template <typename T, typename A>
__device__ __forceinline__ void load_keys(const Strided4<const T>& src, int64_t b, int64_t hk, int k0, int count,
                                          int dim, int stride, A* dst) {
  const int chunks = stride / 4;
  for (int idx = threadIdx.x; idx < kDecodeKeys * chunks; idx += kDecodeThreads) {
    const int j = idx / chunks, c = (idx - j * chunks) * 4;
    A* to = dst + j * stride + c;
    if (j < count && c < dim) {
      load_chunk(src, src.row(b, hk, k0 + j), c, dim, to);
    } else {
      to[0] = to[1] = to[2] = to[3] = A(0);
    }
  }
}

// One split of the keys for kDecodeRows rows of one (b, kv head).
// q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), out (B, Hq, Nq, Dv): T, any strides; lse
// (B, Hq, Nq) A, any strides; or, with S > 1, part_out / part_lse (DecodeParams). Grid:
// B * Hk * S * row_chunks blocks (chunk fastest, then split) of kDecodeThreads threads;
// decode_smem_bytes of dynamic shared memory. Requires D, Dv <= 256.
//
// Phases per key tile: scores (a thread per (key, row) pair, 4 pairs each), online softmax (8
// lanes per row, 4 rows per warp, a row's statistics held by its lanes for the whole split), then
// acc += P · v (a thread per 4 output columns and 8 rows: rows t / 64 + 2 i, columns 4 (t % 64)).
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_kernel(const DecodeParams<T> p) {
  using A = acc_t<T>;
  constexpr int kKeys = kDecodeKeys, kRows = kDecodeRows;
  static_assert(kRows == 4 * (kDecodeThreads / 32) && kKeys == 32, "the phases' thread layouts assume these");
  const int stride = p.smem_stride;
  A* const q_s = reinterpret_cast<A*>(dynamic_smem());  // (kRows, stride): the chunk's query rows
  A* const k_s = q_s + kRows * stride;                   // (kKeys, stride): a tile of keys
  A* const v_s = k_s + kKeys * stride;                   // (kKeys, stride): their values
  A* const p_s = v_s + kKeys * stride;                   // (kKeys, kRows): scores, then probabilities
  A* const alpha_s = p_s + kKeys * kRows;                // (kRows): the tile's rescale factors
  A* const max_s = alpha_s + kRows;                      // (kRows): the split's final row max
  A* const sum_s = max_s + kRows;                        // (kRows): and row sum

  int64_t item = blockIdx.x;
  const int chunk = static_cast<int>(item % p.row_chunks);
  item /= p.row_chunks;
  const int split = static_cast<int>(item % p.splits);
  const int64_t bhk = item / p.splits;  // b * Hk + hk
  const int64_t b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int r0 = chunk * kRows;
  const int tid = threadIdx.x;
  const Band band = p.band;
  const bool has_mask = p.mask.present();
  const bool modify = p.scores.modify_scores();
  // The score phase's pairs of a thread share one row (pair % kRows = tid % kRows): its head's
  // modifications, read once (padding rows past R take the last row's).
  const int pair_r = imin(r0 + tid % kDecodeRows, p.rows - 1);
  const HeadMods<A> mods = head_mods<A>(p.scores, band.offset, b, hk * p.group + pair_r / p.nq);

  // The chunk's rows: row r = r0 + rl is query r % Nq of head hk * group + r / Nq.
  const int q_chunks = stride / 4;
  for (int idx = tid; idx < kRows * q_chunks; idx += kDecodeThreads) {
    const int rl = idx / q_chunks, c = (idx - rl * q_chunks) * 4, r = r0 + rl;
    A* to = q_s + rl * stride + c;
    if (r < p.rows && c < p.dim) {
      load_chunk(p.q, p.q.row(b, hk * p.group + r / p.nq, r % p.nq), c, p.dim, to);
    } else {
      to[0] = to[1] = to[2] = to[3] = A(0);
    }
  }

  // The split's keys: whole tiles, the last one cut at k_end.
  const int k_first = p.k_begin + static_cast<int>(int64_t(split) * p.k_tiles / p.splits) * kKeys;
  const int k_last = imin(p.k_end, p.k_begin + static_cast<int>(int64_t(split + 1) * p.k_tiles / p.splits) * kKeys);

  // Softmax lanes: row sm_row of the chunk, keys sm_col + 8m of a tile.
  const int sm_row = (tid / 32) * 4 + (tid % 32) / 8, sm_col = tid % 8;
  // A sink enters once: split 0 starts its rows with it (max sink(h), sum 1), the merge weighs it
  // in with that split's lse. (Padding rows past R take head 0's, harmlessly.)
  const int sm_r = imin(r0 + sm_row, p.rows - 1);
  const bool sink_here = split == 0 && p.scores.has_sinks();
  A row_max = sink_here ? sink_max<A>(p.scores, hk * p.group + sm_r / p.nq) : A(-INFINITY);
  A row_sum = sink_here ? A(1) : A(0);
  // P · V lanes: columns pv_col .. pv_col + 3, rows pv_row + 2i.
  const int pv_col = (tid % 64) * 4, pv_row = tid / 64;
  const bool pv_active = pv_col < p.dim_v;
  A acc[kRows / 2][4];
#pragma unroll
  for (int i = 0; i < kRows / 2; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc[i][e] = 0;
    }
  }

  for (int k0 = k_first; k0 < k_last; k0 += kKeys) {
    const int count = imin(kKeys, k_last - k0);
    if (!band.touches(0, p.nq, k0, k0 + count)) {
      continue;  // no query of any head sees these keys (the same for the whole block)
    }
    __syncthreads();  // the previous tile's P · V is done with k_s, v_s, p_s
    load_keys(p.k, b, hk, k0, count, p.dim, stride, k_s);
    load_keys(p.v, b, hk, k0, count, p.dim_v, stride, v_s);
    __syncthreads();

    for (int pair = tid; pair < kKeys * kRows; pair += kDecodeThreads) {
      const int rl = pair % kRows, j = pair / kRows, r = r0 + rl, key = k0 + j;
      A s = -INFINITY;
      if (r < p.rows && j < count && band.visible(r % p.nq, key)) {
        const A* qr = q_s + rl * stride;
        const A* kr = k_s + j * stride;
        A dot = 0;
        for (int d = 0; d < p.dim; ++d) {
          dot = fma_acc(qr[d], kr[d], dot);
        }
        s = dot * p.scale;
        if (modify) {
          s = mods.apply(s, r % p.nq, key);
        }
        if (has_mask) {
          s += mask_bias<T, A>(p.mask, b, hk * p.group + r / p.nq, r % p.nq, key);
        }
      }
      p_s[j * kRows + rl] = s;
    }
    __syncthreads();

    {
      A tile_max = -INFINITY;
#pragma unroll
      for (int m = 0; m < kKeys / 8; ++m) {
        const A s = p_s[(sm_col + 8 * m) * kRows + sm_row];
        tile_max = s > tile_max ? s : tile_max;
      }
      tile_max = group8_max(tile_max);
      const A new_max = tile_max > row_max ? tile_max : row_max;
      const A base = new_max == -INFINITY ? A(0) : new_max;  // nothing seen yet: no inf - inf
      const A alpha = exp_acc(row_max - base);                // 0 before the row's first key
      A tile_sum = 0;
#pragma unroll
      for (int m = 0; m < kKeys / 8; ++m) {
        A* s = p_s + (sm_col + 8 * m) * kRows + sm_row;
        *s = exp_acc(*s - base);
        tile_sum += *s;
      }
      row_sum = row_sum * alpha + group_sum<8>(tile_sum);
      row_max = new_max;
      if (sm_col == 0) {
        alpha_s[sm_row] = alpha;
      }
    }
    __syncthreads();

    if (pv_active) {
#pragma unroll
      for (int i = 0; i < kRows / 2; ++i) {
        const A alpha = alpha_s[pv_row + 2 * i];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[i][e] *= alpha;
        }
      }
      for (int j = 0; j < count; ++j) {
        const A* vr = v_s + j * stride + pv_col;
        const A* pr = p_s + j * kRows + pv_row;
#pragma unroll
        for (int i = 0; i < kRows / 2; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            acc[i][e] = fma_acc(pr[2 * i], vr[e], acc[i][e]);
          }
        }
      }
    }
  }

  if (sm_col == 0) {
    max_s[sm_row] = row_max;
    sum_s[sm_row] = row_sum;
  }
  __syncthreads();

  // The split's rows, normalised, with their lse (0 and -inf for a row that saw no key).
  const int64_t part = bhk * p.splits + split;
#pragma unroll
  for (int i = 0; i < kRows / 2; ++i) {
    const int rl = pv_row + 2 * i, r = r0 + rl;
    if (r >= p.rows) {
      continue;
    }
    const A total = sum_s[rl];
    const A inv = total > A(0) ? A(1) / total : A(0);
    const A lse = total > A(0) ? max_s[rl] + log_acc(total) : A(-INFINITY);
    const int64_t h = hk * p.group + r / p.nq, q_row = r % p.nq;
    if (p.splits == 1) {
      if (pv_active) {
        store_chunk(p.out, p.out.row(b, h, q_row), pv_col, p.dim_v, acc[i], inv);
      }
      if (pv_col == 0) {
        p.lse[b * p.lse_stride_b + h * p.lse_stride_h + q_row * p.lse_stride_n] = lse;
      }
    } else {
      A* dst = p.part_out + (part * p.rows + r) * p.dim_v;
      if (pv_active) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (pv_col + e < p.dim_v) {
            dst[pv_col + e] = acc[i][e] * inv;
          }
        }
      }
      if (pv_col == 0) {
        p.part_lse[part * p.rows + r] = lse;
      }
    }
  }
}

// The merge, a warp per output row (b, hk, r), splits in order:
//   out = Σ_s exp(lse_s - top) / total · out_s,   lse = top + log(total),   total = Σ_s exp(lse_s - top)
// with top the largest lse_s; exp(-inf - top) = 0, so an empty split weighs 0, and a row every
// split missed (top = -inf) gets 0 and -inf. Grid: ceil(B * Hk * R / 4) blocks of 128 threads.
template <typename T>
__global__ void __launch_bounds__(128) attention_decode_merge_kernel(const DecodeParams<T> p) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.batch_heads / p.group) * p.rows) {
    return;  // the whole warp
  }
  const int64_t bhk = row / p.rows, b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int r = static_cast<int>(row % p.rows);
  const int64_t h = hk * p.group + r / p.nq, q_row = r % p.nq;
  const A* lses = p.part_lse + bhk * p.splits * p.rows + r;                    // [s * R]
  const A* parts = p.part_out + (bhk * p.splits * p.rows + r) * p.dim_v;      // [s * R * Dv]
  A top = -INFINITY;
  for (int s = 0; s < p.splits; ++s) {
    top = lses[s * p.rows] > top ? lses[s * p.rows] : top;
  }
  A total = 0;
  if (top != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      total += exp_acc(lses[s * p.rows] - top);
    }
  }
  A merged[kGenericPerLane];
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    merged[t] = 0;
  }
  if (top != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const A weight = exp_acc(lses[s * p.rows] - top) / total;
      if (weight == A(0)) {
        continue;  // an empty split (its part_out rows are zeros anyway)
      }
      const A* part = parts + static_cast<int64_t>(s) * p.rows * p.dim_v;
#pragma unroll
      for (int t = 0; t < kGenericPerLane; ++t) {
        const int c = lane + 32 * t;
        if (c < p.dim_v) {
          merged[t] = fma_acc(weight, part[c], merged[t]);
        }
      }
    }
  }
  T* out_row = p.out.row(b, h, q_row);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    const int c = lane + 32 * t;
    if (c < p.dim_v) {
      out_row[c * p.out.stride_d] = static_cast<T>(merged[t]);
    }
  }
  if (lane == 0) {
    p.lse[b * p.lse_stride_b + h * p.lse_stride_h + q_row * p.lse_stride_n] =
        top == -INFINITY ? A(-INFINITY) : top + log_acc(total);
  }
}

template <typename T>
int decode_smem_bytes(const DecodeParams<T>& p) {
  return static_cast<int>(
      ((kDecodeRows + 2 * kDecodeKeys) * p.smem_stride + kDecodeKeys * kDecodeRows + 3 * kDecodeRows) *
      sizeof(acc_t<T>));
}

}  // namespace

template <typename T>
void plan_decode(DecodeParams<T>& p, int batch, int sm_count, int64_t forced_splits) {
  p.rows = p.group * p.nq;
  p.row_chunks = static_cast<int>(ceil_div(p.rows, kDecodeRows));
  // The keys some query sees, from a multiple of the tile size (as the tiled kernels' ranges).
  p.k_begin = clip(p.band.first_key(0), 0, p.nk) / kDecodeKeys * kDecodeKeys;
  p.k_end = clip(p.band.last_key(p.nq - 1) + 1, p.k_begin, p.nk);
  p.k_tiles = static_cast<int>(ceil_div(p.k_end - p.k_begin, kDecodeKeys));
  // Rows of shared tiles: 4 mod 32 elements apart, so the score phase's rows fall in different banks.
  p.smem_stride = round_up(imax(p.dim, p.dim_v), 32) + 4;
  if (forced_splits > 0) {
    p.splits = static_cast<int>(forced_splits);  // < 10^6 (the setting's own check)
  } else {
    // About two blocks per SM, but no split shorter than kDecodeMinTiles tiles.
    const int64_t items = static_cast<int64_t>(batch) * p.heads_kv * p.row_chunks;
    const int64_t wanted = ceil_div(2 * static_cast<int64_t>(sm_count), items);
    p.splits = static_cast<int>(std::clamp<int64_t>(wanted, 1, std::max(1, p.k_tiles / kDecodeMinTiles)));
  }
}

template <typename T>
void forward_decode(const DecodeParams<T>& p, cudaStream_t stream) {
  const int64_t items = (p.batch_heads / p.group) * p.splits * p.row_chunks;
#ifdef SELFATTN_CUDA_EMULATION
  ++::emu::state().counters.decode_launches;  // the tests check the decode path ran, and with which S
  ::emu::state().counters.decode_splits = static_cast<uint64_t>(p.splits);
#endif
  launch(attention_decode_kernel<T>, items, kDecodeThreads, decode_smem_bytes(p), stream, p);
  if (p.splits > 1) {
    launch(attention_decode_merge_kernel<T>, ceil_div((p.batch_heads / p.group) * p.rows, 4), 128, 0, stream, p);
  }
}

#define SELFATTN_DECODE_INSTANTIATE(T)                               \
  template void plan_decode<T>(DecodeParams<T>&, int, int, int64_t); \
  template void forward_decode<T>(const DecodeParams<T>&, cudaStream_t);
SELFATTN_DECODE_INSTANTIATE(float)
SELFATTN_DECODE_INSTANTIATE(double)
SELFATTN_DECODE_INSTANTIATE(c10::Half)
SELFATTN_DECODE_INSTANTIATE(c10::BFloat16)
#undef SELFATTN_DECODE_INSTANTIATE

}  // namespace selfattn::cuda
