// Tile operations of the generic (CUDA-core, float32-accumulating) attention kernels.
//
// A block of 4 warps owns kBlockRows rows of one operand (queries in the forward and dq
// kernels, keys in the dk/dv kernel) and streams tiles of kBlockCols rows of the other through
// shared memory. Each warp owns 4*R of the block's rows; its 32 lanes form 4 row groups x 8
// column groups, lane = row_group * 8 + col_group:
//
//   the lane's rows:                         row_group + 4 * i,            i < R
//   the lane's columns of a score tile:      col_group + 8 * j,            j < KPL
//   the lane's columns of an accumulator:    col_group * 4 + 32 * t + e,   t < kAccCols / 4, e < 4
//
// A row's scores are spread over the 8 lanes of its row group, so row reductions are three
// shuffles, and the same lanes hold the row's accumulator, so the softmax statistics are where
// they are needed. Interleaving rows by 4 and score columns by 8 makes every shared-memory read
// below conflict-free (row stride kStride = 4 mod 32 words); accumulator columns in chunks of 4,
// 32 apart, make a warp's reads of one value row contiguous.
//
// Shared tiles hold float (inputs converted once on load), row-major with kStride floats per row.
#pragma once

#include "common.cuh"

namespace selfattn::cuda {

template <int kDMax_, int kRowsPerLane, int kColsPerLane>
struct TileConfig {
  static constexpr int kDMax = kDMax_;         // D and Dv are at most this (a multiple of 32)
  static constexpr int R = kRowsPerLane;       // owned rows per lane: 1, 2 or 4
  static constexpr int KPL = kColsPerLane;     // score-tile columns per lane
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockRows = kWarps * 4 * R;  // rows owned by a block
  static constexpr int kBlockCols = 8 * KPL;         // rows of the streamed operand per tile
  static constexpr int kAccCols = kDMax / 8;         // accumulator columns per lane
  static constexpr int kStride = kDMax + 4;          // floats per row of a shared tile
  // A warp's buffer of one score tile, transposed (kBlockCols x 4R); padded so that the 8 column
  // groups' writes fall in different banks (for R = 2 and 4; 2-way conflicts at R = 1).
  static constexpr int kWarpBufStride = 4 * R + 4;
  static constexpr int kWarpBufSize = kBlockCols * kWarpBufStride;

  static_assert(kDMax % 32 == 0 && kDMax <= 256, "head-dim bucket must be a multiple of 32, <= 256");
  static_assert(R == 1 || R == 2 || R == 4, "rows per lane must be 1, 2 or 4");
};

// Calls launch(Cfg{}) with the backward kernels' tile configuration for head dims up to
// dim_max (<= 256). Both backward kernels (dk/dv, dq) hold two row accumulators or a wider
// streamed operand, so they own fewer rows per lane than the forward.
template <typename Launch>
void with_backward_tile_config(int dim_max, Launch&& launch) {
  if (dim_max <= 32) {
    launch(TileConfig<32, 4, 8>{});
  } else if (dim_max <= 64) {
    launch(TileConfig<64, 4, 4>{});
  } else if (dim_max <= 128) {
    launch(TileConfig<128, 2, 4>{});
  } else {
    launch(TileConfig<256, 1, 2>{});
  }
}

struct Lane {
  int warp, row_group, col_group;
};

__device__ __forceinline__ Lane lane_position() {
  const int lane = threadIdx.x % 32;
  return {static_cast<int>(threadIdx.x / 32), lane / 8, lane % 8};
}

// Copies rows row0 .. row0 + kRows - 1 of one (b, h) slice of src into shared memory as float:
// dst[r][c] for c < cols (a multiple of 4), zero for rows at or past `nrows` and columns at or
// past `dim`. Consecutive threads take consecutive 4-element chunks of a row (coalesced).
template <int kRows, int kThreads, typename T>
__device__ __forceinline__ void load_tile(const Strided4<const T>& src, int64_t b, int64_t h, int row0, int nrows,
                                          int dim, int cols, float* dst, int dst_stride) {
  const int chunks = cols / 4;
  for (int idx = threadIdx.x; idx < kRows * chunks; idx += kThreads) {
    const int r = idx / chunks;
    const int c = (idx - r * chunks) * 4;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row0 + r < nrows && c < dim) {
      x = load4(src.row(b, h, row0 + r), src.stride_d, c, dim, src.vec4);
    }
    sts4(dst + r * dst_stride + c, x);
  }
}

// s[i][j] = sum over d < depth of a[row_group + 4i][d] * b[col_group + 8j][d].
//   a: the warp's first owned row in shared memory; b: the tile's first row; both kStride apart.
//   depth: a multiple of 4, columns up to it loaded (zeros past the head dim).
template <int R, int KPL, int kStride>
__device__ __forceinline__ void tile_scores(const float* a, const float* b, int depth, const Lane& lane,
                                            float (&s)[R][KPL]) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int j = 0; j < KPL; ++j) {
      s[i][j] = 0.f;
    }
  }
  const float* a_lane = a + lane.row_group * kStride;
  const float* b_lane = b + lane.col_group * kStride;
#pragma unroll 2
  for (int d = 0; d < depth; d += 4) {
    float4 av[R], bv[KPL];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      av[i] = lds4(a_lane + 4 * i * kStride + d);
    }
#pragma unroll
    for (int j = 0; j < KPL; ++j) {
      bv[j] = lds4(b_lane + 8 * j * kStride + d);
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = 0; j < KPL; ++j) {
        s[i][j] = fmaf(av[i].x, bv[j].x, s[i][j]);
        s[i][j] = fmaf(av[i].y, bv[j].y, s[i][j]);
        s[i][j] = fmaf(av[i].z, bv[j].z, s[i][j]);
        s[i][j] = fmaf(av[i].w, bv[j].w, s[i][j]);
      }
    }
  }
}

// R consecutive floats of shared memory (aligned to R floats).
template <int R>
__device__ __forceinline__ void load_r(const float* p, float (&x)[R]) {
  if constexpr (R == 4) {
    const float4 v = lds4(p);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else if constexpr (R == 2) {
    SELFATTN_CHECK_ALIGNED(p, 8);
    const float2 v = *reinterpret_cast<const float2*>(p);
    x[0] = v.x, x[1] = v.y;
  } else {
    x[0] = *p;
  }
}

template <int R>
__device__ __forceinline__ void store_r(float* p, const float (&x)[R]) {
  if constexpr (R == 4) {
    sts4(p, make_float4(x[0], x[1], x[2], x[3]));
  } else if constexpr (R == 2) {
    SELFATTN_CHECK_ALIGNED(p, 8);
    *reinterpret_cast<float2*>(p) = make_float2(x[0], x[1]);
  } else {
    *p = x[0];
  }
}

// The warp's score tile into its buffer, transposed: buf[col_group + 8j][row_group * R + i].
// (Lanes read it back by row group, so the buffer's row order need not match the rows'.)
template <int R, int KPL, int kBufStride>
__device__ __forceinline__ void store_scores(float* buf, const Lane& lane, const float (&s)[R][KPL]) {
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    float x[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      x[i] = s[i][j];
    }
    store_r<R>(buf + (lane.col_group + 8 * j) * kBufStride + lane.row_group * R, x);
  }
}

// acc[i][4t + e] += sum over k < count of P[row_group + 4i][k] * m[k][col_group * 4 + 32t + e],
// P being the tile stored by store_scores. Column chunks at or past `cols` are skipped (they
// belong to no output column).
template <int R, int kAccCols, int kBufStride, int kStride>
__device__ __forceinline__ void tile_accumulate(const float* buf, const float* m, int count, int cols, const Lane& lane,
                                                float (&acc)[R][kAccCols]) {
  const float* p_lane = buf + lane.row_group * R;
  const float* m_lane = m + lane.col_group * 4;
#pragma unroll 2
  for (int k = 0; k < count; ++k) {
    float p[R];
    load_r<R>(p_lane + k * kBufStride, p);
#pragma unroll
    for (int t = 0; t < kAccCols / 4; ++t) {
      if (32 * t < cols) {
        const float4 mv = lds4(m_lane + k * kStride + 32 * t);
#pragma unroll
        for (int i = 0; i < R; ++i) {
          acc[i][4 * t + 0] = fmaf(p[i], mv.x, acc[i][4 * t + 0]);
          acc[i][4 * t + 1] = fmaf(p[i], mv.y, acc[i][4 * t + 1]);
          acc[i][4 * t + 2] = fmaf(p[i], mv.z, acc[i][4 * t + 2]);
          acc[i][4 * t + 3] = fmaf(p[i], mv.w, acc[i][4 * t + 3]);
        }
      }
    }
  }
}

// Writes the lane's accumulator row i (times `factor`) as row `row` of dst: columns below dim.
template <int kAccCols, typename T>
__device__ __forceinline__ void store_acc_row(const Strided4<T>& dst, int64_t b, int64_t h, int row, int dim,
                                              const float (&acc)[kAccCols], float factor, const Lane& lane) {
  T* out_row = dst.row(b, h, row);
#pragma unroll
  for (int t = 0; t < kAccCols / 4; ++t) {
    const int c = lane.col_group * 4 + 32 * t;
    if (c < dim) {
      store4(
          out_row, dst.stride_d, c, dim, dst.vec4,
          make_float4(acc[4 * t] * factor, acc[4 * t + 1] * factor, acc[4 * t + 2] * factor, acc[4 * t + 3] * factor));
    }
  }
}

}  // namespace selfattn::cuda
