// The bfloat16 operands of the attention kernels' tile GEMMs (tile_bf16.h), one object per thread:
// what each GEMM reads, packed from the bf16 inputs or rounded from the float32 tiles, and the
// GEMMs themselves. The kernels keep their float32 softmax and accumulators; only the GEMM
// operands are bf16 (P and dS rounded to bf16 first, as SDPA's bf16 kernels do).
#pragma once

#include "brgemm_bf16.h"
#include "tile.h"
#include "tile_bf16.h"

namespace selfattn::SELFATTN_CPU_NS {

// Forward: scores = scale · k rows · queries, acc += P · v rows (tiles transposed as in
// attention_fwd.cpp: key rows x query columns).
class ForwardBf16 {
  using Carver = ScratchCarver<uint32_t>;

 public:
  // brgemm: the GEMMs go through oneDNN (brgemm_bf16.h) rather than micro_kernel_bf16.
  ForwardBf16(int64_t dim, int64_t dim_v, int64_t dim_v_padded, int64_t block_q, int64_t block_k, bool brgemm)
      : brgemm_(brgemm),
        dim_(dim),
        dim_v_(dim_v),
        dim_v_padded_(dim_v_padded),
        block_q_(block_q),
        block_k_(block_k),
        dim_pairs_(ceil_div(dim, 2)),
        buffer_(Carver::padded(dim_pairs_ * block_q) + Carver::padded(ceil_div(block_k, 2) * dim_v_padded) +
                Carver::padded(ceil_div(block_k, 2) * block_q) +
                Carver::padded(ceil_div(block_k * round_up(dim, 2), 2))) {
    Carver carve(buffer_.get());
    q_vnni_ = carve.take(dim_pairs_ * block_q);
    v_vnni_ = carve.take(ceil_div(block_k, 2) * dim_v_padded);
    p_vnni_ = carve.take(ceil_div(block_k, 2) * block_q);
    k_scratch_ = reinterpret_cast<uint16_t*>(carve.take(ceil_div(block_k * round_up(dim, 2), 2)));
    // brgemm's P (block_q rows of block_k) lives in p_vnni_: whole 16-key transposes must fit.
    TORCH_INTERNAL_ASSERT(block_k % 16 == 0);
  }
  ~ForwardBf16() {
    if (brgemm_) {
      brgemm_bf16_release();
    }
  }
  ForwardBf16(const ForwardBf16&) = delete;
  ForwardBf16& operator=(const ForwardBf16&) = delete;

  // The block's queries q0 .. q0 + rows - 1 as the score GEMM's columns (padding columns zero).
  void pack_queries(const Bf16View& q, int64_t b, int64_t h, int64_t q0, int64_t rows) {
    vnni_over_dim(q, b, h, q0, rows, dim_, q_vnni_, block_q_);
  }

  // p_t (k_rows x block_q) = scale · k rows k0.. · the packed queries; with a cut, only the
  // slabs gemm_keys_x_queries would compute.
  void scores(const Bf16View& k, int64_t b, int64_t h, int64_t k0, int64_t k_rows, const MaskCut* cut, float scale,
              float* p_t) {
    const PairRows k_rows_bf16 = pair_rows(k, b, h, k0, k_rows, dim_, k_scratch_, brgemm_);
    if (brgemm_) {  // the whole tile: the caller masks what a cut hides
      brgemm_bf16(k_rows, block_q_, 2 * dim_pairs_, k_rows_bf16.data, k_rows_bf16.row_stride, q_vnni_, block_q_, p_t,
                  block_q_, /*accumulate=*/false);
      scale_tile(p_t, block_q_, k_rows, block_q_, scale);
    } else if (cut == nullptr) {
      gemm_bf16(k_rows, block_q_, dim_pairs_, k_rows_bf16.data, k_rows_bf16.row_stride, 2, q_vnni_, block_q_, p_t,
                block_q_, scale, /*accumulate=*/false);
    } else {
      gemm_bf16_keys_x_queries(*cut, k_rows, block_q_, dim_pairs_, k_rows_bf16.data, k_rows_bf16.row_stride, 2, q_vnni_,
                               block_q_, p_t, block_q_, scale);
    }
  }

  // acc (q_rows x dim_v_padded) += P · v rows k0 .. k0 + k_rows - 1, P = p_t's transpose rounded
  // to bf16; with a cut, each slab of queries over the keys it sees (gemm_queries_x_keys).
  void add_probs_times_values(const float* p_t, int64_t k_rows, int64_t q_rows, const Bf16View& v, int64_t b, int64_t h,
                              int64_t k0, const MaskCut* cut, float* acc) {
    if (brgemm_) {  // P row-major over keys (hidden pairs are 0), v in 64-wide VNNI blocks
      const int64_t k_pairs = ceil_div(k_rows, 2), p_ld = block_k_;
      uint16_t* p_rows = reinterpret_cast<uint16_t*>(p_vnni_);
      round_transposed(p_t, block_q_, k_rows, block_q_, p_rows, p_ld);
      vnni_over_rows_blocked(v, b, h, k0, k_rows, dim_v_, dim_v_padded_, k_pairs, v_vnni_);
      brgemm_bf16_blocked(q_rows, dim_v_padded_, 2 * k_pairs, p_rows, p_ld, v_vnni_, k_pairs, acc, dim_v_padded_,
                          /*accumulate=*/true);
      return;
    }
    round_vnni_over_rows(p_t, block_q_, k_rows, block_q_, p_vnni_);
    vnni_over_rows(v, b, h, k0, k_rows, dim_v_, dim_v_padded_, v_vnni_);
    const uint16_t* p_pairs = reinterpret_cast<const uint16_t*>(p_vnni_);
    if (cut == nullptr) {
      gemm_bf16(q_rows, dim_v_padded_, ceil_div(k_rows, 2), p_pairs, 2, 2 * block_q_, v_vnni_, dim_v_padded_, acc,
                dim_v_padded_, 1.0f, /*accumulate=*/true);
    } else {
      gemm_bf16_queries_x_keys(*cut, q_rows, dim_v_padded_, k_rows, p_pairs, 2, 2 * block_q_, v_vnni_, dim_v_padded_,
                               acc, dim_v_padded_);
    }
  }

 private:
  bool brgemm_;
  int64_t dim_, dim_v_, dim_v_padded_, block_q_, block_k_, dim_pairs_;
  Scratch<uint32_t> buffer_;
  uint32_t* q_vnni_;      // (dim_pairs, block_q): the block's queries, VNNI over the head dim
  uint32_t* v_vnni_;      // (block_k / 2, dim_v_padded): a value block, VNNI over keys (brgemm: 64-wide blocks)
  uint32_t* p_vnni_;      // (block_k / 2, block_q): P rounded to bf16, VNNI over keys (brgemm: (block_q, block_k))
  uint16_t* k_scratch_;   // a key block's rows, when k cannot be read in place
};

// Backward, per (query head, query block, key block) tile, transposed as in attention_bwd.cpp:
// P = exp(scale · k rows · queries − lse), dP = v rows · dO, then dv += Pᵀ·dO, dk += dSᵀ·q,
// dq += dS·k. A query head's q and dO are packed once (both ways: as score columns, and VNNI
// over queries for dSᵀ·q and Pᵀ·dO), a key block's k and v once per head.
class BackwardBf16 {
  using Carver = ScratchCarver<uint32_t>;

 public:
  BackwardBf16(int64_t dim, int64_t dim_v, int64_t dim_padded, int64_t dim_v_padded, int64_t nq_padded, int64_t block_q,
               int64_t block_k, bool brgemm)
      : brgemm_(brgemm),
        dim_(dim),
        dim_v_(dim_v),
        dim_padded_(dim_padded),
        dim_v_padded_(dim_v_padded),
        nq_padded_(nq_padded),
        block_q_(block_q),
        block_k_(block_k),
        dim_pairs_(ceil_div(dim, 2)),
        dim_v_pairs_(ceil_div(dim_v, 2)),
        buffer_(Carver::padded(dim_pairs_ * nq_padded) + Carver::padded(dim_v_pairs_ * nq_padded) +
                Carver::padded(nq_padded / 2 * dim_padded) + Carver::padded(nq_padded / 2 * dim_v_padded) +
                Carver::padded(ceil_div(block_k * round_up(dim, 2), 2)) +
                Carver::padded(ceil_div(block_k * round_up(dim_v, 2), 2)) +
                Carver::padded(ceil_div(block_k, 2) * dim_padded) + 3 * Carver::padded(block_k * block_q)) {
    Carver carve(buffer_.get());
    q_cols_ = carve.take(dim_pairs_ * nq_padded);
    do_cols_ = carve.take(dim_v_pairs_ * nq_padded);
    q_vnni_ = carve.take(nq_padded / 2 * dim_padded);
    do_vnni_ = carve.take(nq_padded / 2 * dim_v_padded);
    k_scratch_ = reinterpret_cast<uint16_t*>(carve.take(ceil_div(block_k * round_up(dim, 2), 2)));
    v_scratch_ = reinterpret_cast<uint16_t*>(carve.take(ceil_div(block_k * round_up(dim_v, 2), 2)));
    k_vnni_ = carve.take(ceil_div(block_k, 2) * dim_padded);
    p_rows_ = reinterpret_cast<uint16_t*>(carve.take(block_k * block_q));
    ds_rows_ = reinterpret_cast<uint16_t*>(carve.take(block_k * block_q));
    ds_vnni_ = carve.take(block_k * block_q);
  }
  ~BackwardBf16() {
    if (brgemm_) {
      brgemm_bf16_release();
    }
  }
  BackwardBf16(const BackwardBf16&) = delete;
  BackwardBf16& operator=(const BackwardBf16&) = delete;

  // Query head (b, h): its nq queries and rows of dO.
  void pack_head(const Bf16View& q, const Bf16View& grad_out, int64_t b, int64_t h, int64_t nq) {
    if (brgemm_) {  // score columns block by block (row stride block_q), the VNNI rows in 64-wide blocks
      for (int64_t q0 = 0; q0 < nq; q0 += block_q_) {
        const int64_t rows = std::min(block_q_, nq - q0);
        vnni_over_dim(q, b, h, q0, rows, dim_, q_cols_ + q0 * dim_pairs_, block_q_);
        vnni_over_dim(grad_out, b, h, q0, rows, dim_v_, do_cols_ + q0 * dim_v_pairs_, block_q_);
      }
      vnni_over_rows_blocked(q, b, h, 0, nq, dim_, dim_padded_, nq_padded_ / 2, q_vnni_);
      vnni_over_rows_blocked(grad_out, b, h, 0, nq, dim_v_, dim_v_padded_, nq_padded_ / 2, do_vnni_);
      return;
    }
    vnni_over_dim(q, b, h, 0, nq, dim_, q_cols_, nq_padded_);
    vnni_over_dim(grad_out, b, h, 0, nq, dim_v_, do_cols_, nq_padded_);
    vnni_over_rows(q, b, h, 0, nq, dim_, dim_padded_, q_vnni_);
    vnni_over_rows(grad_out, b, h, 0, nq, dim_v_, dim_v_padded_, do_vnni_);
  }

  // Keys k0 .. k0 + k_rows - 1 of kv head (b, h).
  void pack_keys(const Bf16View& k, const Bf16View& v, int64_t b, int64_t h, int64_t k0, int64_t k_rows) {
    k_pairs_ = pair_rows(k, b, h, k0, k_rows, dim_, k_scratch_, brgemm_);
    v_pairs_ = pair_rows(v, b, h, k0, k_rows, dim_v_, v_scratch_, brgemm_);
    if (brgemm_) {
      vnni_over_rows_blocked(k, b, h, k0, k_rows, dim_, dim_padded_, block_k_ / 2, k_vnni_);
      return;
    }
    vnni_over_rows(k, b, h, k0, k_rows, dim_, dim_padded_, k_vnni_);
  }

  // p_t (kv_rows x block_q) = scale · k rows · queries q0 ..
  void scores(const MaskCut* cut, int64_t kv_rows, int64_t q0, float scale, float* p_t) {
    if (brgemm_) {  // whole tiles: the caller masks what a cut hides
      brgemm_bf16(kv_rows, block_q_, 2 * dim_pairs_, k_pairs_.data, k_pairs_.row_stride, q_cols_ + q0 * dim_pairs_,
                  block_q_, p_t, block_q_, /*accumulate=*/false);
      scale_tile(p_t, block_q_, kv_rows, block_q_, scale);
    } else if (cut == nullptr) {
      gemm_bf16(kv_rows, block_q_, dim_pairs_, k_pairs_.data, k_pairs_.row_stride, 2, q_cols_ + q0, nq_padded_, p_t,
                block_q_, scale, /*accumulate=*/false);
    } else {
      gemm_bf16_keys_x_queries(*cut, kv_rows, block_q_, dim_pairs_, k_pairs_.data, k_pairs_.row_stride, 2, q_cols_ + q0,
                               nq_padded_, p_t, block_q_, scale);
    }
  }

  // dp_t (kv_rows x block_q) = v rows · dO rows q0 .. (dP, transposed).
  void dprobs(const MaskCut* cut, int64_t kv_rows, int64_t q0, float* dp_t) {
    if (brgemm_) {
      brgemm_bf16(kv_rows, block_q_, 2 * dim_v_pairs_, v_pairs_.data, v_pairs_.row_stride, do_cols_ + q0 * dim_v_pairs_,
                  block_q_, dp_t, block_q_, /*accumulate=*/false);
    } else if (cut == nullptr) {
      gemm_bf16(kv_rows, block_q_, dim_v_pairs_, v_pairs_.data, v_pairs_.row_stride, 2, do_cols_ + q0, nq_padded_, dp_t,
                block_q_, 1.0f, /*accumulate=*/false);
    } else {
      gemm_bf16_keys_x_queries(*cut, kv_rows, block_q_, dim_v_pairs_, v_pairs_.data, v_pairs_.row_stride, 2,
                               do_cols_ + q0, nq_padded_, dp_t, block_q_, 1.0f);
    }
  }

  // dv (kv_rows x dim_v_padded) += Pᵀ · dO rows, dk (kv_rows x dim_padded) += dSᵀ · q rows,
  // dq rows q0 .. (q_rows x dim_padded, row stride dq_stride) += dS · k rows; P and dS (p_t, ds_t,
  // transposed, scale in dS) rounded to bf16 first.
  void add_gradients(const MaskCut* cut, int64_t kv_rows, int64_t q_rows, int64_t q0, const float* p_t,
                     const float* ds_t, float* dv_acc, float* dk_acc, float* dq_acc, int64_t dq_stride) {
    round_rows(p_t, block_q_, kv_rows, block_q_, p_rows_);
    round_rows(ds_t, block_q_, kv_rows, block_q_, ds_rows_);
    if (brgemm_) {  // whole tiles (hidden P and dS are 0); dS also transposed, as dS·k's A
      const int64_t q_depth = round_up(q_rows, 2), kv_depth = round_up(kv_rows, 2), ds_ld = round_up(block_k_, 16);
      uint16_t* ds_transposed = reinterpret_cast<uint16_t*>(ds_vnni_);
      round_transposed(ds_t, block_q_, kv_rows, block_q_, ds_transposed, ds_ld);
      brgemm_bf16_blocked(kv_rows, dim_v_padded_, q_depth, p_rows_, block_q_, do_vnni_, nq_padded_ / 2, dv_acc,
                          dim_v_padded_, /*accumulate=*/true, q0 / 2);
      brgemm_bf16_blocked(kv_rows, dim_padded_, q_depth, ds_rows_, block_q_, q_vnni_, nq_padded_ / 2, dk_acc,
                          dim_padded_, /*accumulate=*/true, q0 / 2);
      brgemm_bf16_blocked(q_rows, dim_padded_, kv_depth, ds_transposed, ds_ld, k_vnni_, block_k_ / 2, dq_acc, dq_stride,
                          /*accumulate=*/true);
      return;
    }
    round_vnni_over_rows(ds_t, block_q_, kv_rows, block_q_, ds_vnni_);
    const uint32_t* do_vnni = do_vnni_ + q0 / 2 * dim_v_padded_;  // q0 is even: a multiple of block_q
    const uint32_t* q_vnni = q_vnni_ + q0 / 2 * dim_padded_;
    const uint16_t* ds_pairs = reinterpret_cast<const uint16_t*>(ds_vnni_);
    if (cut == nullptr) {
      const int64_t q_pairs = ceil_div(q_rows, 2);
      gemm_bf16(kv_rows, dim_v_padded_, q_pairs, p_rows_, block_q_, 2, do_vnni, dim_v_padded_, dv_acc, dim_v_padded_,
                1.0f, /*accumulate=*/true);
      gemm_bf16(kv_rows, dim_padded_, q_pairs, ds_rows_, block_q_, 2, q_vnni, dim_padded_, dk_acc, dim_padded_, 1.0f,
                /*accumulate=*/true);
      gemm_bf16(q_rows, dim_padded_, ceil_div(kv_rows, 2), ds_pairs, 2, 2 * block_q_, k_vnni_, dim_padded_, dq_acc,
                dq_stride, 1.0f, /*accumulate=*/true);
    } else {
      gemm_bf16_keys_x_queries_depth(*cut, kv_rows, dim_v_padded_, q_rows, p_rows_, block_q_, 2, do_vnni, dim_v_padded_,
                                     dv_acc, dim_v_padded_);
      gemm_bf16_keys_x_queries_depth(*cut, kv_rows, dim_padded_, q_rows, ds_rows_, block_q_, 2, q_vnni, dim_padded_,
                                     dk_acc, dim_padded_);
      gemm_bf16_queries_x_keys(*cut, q_rows, dim_padded_, kv_rows, ds_pairs, 2, 2 * block_q_, k_vnni_, dim_padded_,
                               dq_acc, dq_stride);
    }
  }

 private:
  bool brgemm_;
  int64_t dim_, dim_v_, dim_padded_, dim_v_padded_, nq_padded_, block_q_, block_k_, dim_pairs_, dim_v_pairs_;
  Scratch<uint32_t> buffer_;
  // brgemm: the cols in query blocks of (dim_pairs, block_q), the VNNI operands in 64-wide blocks.
  uint32_t* q_cols_;   // (dim_pairs, nq_padded): the head's queries as score columns
  uint32_t* do_cols_;  // (dim_v_pairs, nq_padded): its dO rows as the columns of dP
  uint32_t* q_vnni_;   // (nq_padded / 2, dim_padded): queries, VNNI over queries (dSᵀ·q)
  uint32_t* do_vnni_;  // (nq_padded / 2, dim_v_padded): dO, VNNI over queries (Pᵀ·dO)
  uint16_t* k_scratch_;
  uint16_t* v_scratch_;
  uint32_t* k_vnni_;   // (block_k / 2, dim_padded): the key block, VNNI over keys (dS·k)
  uint16_t* p_rows_;   // (block_k, block_q): P rounded, row-major
  uint16_t* ds_rows_;  // (block_k, block_q): dS rounded, row-major
  uint32_t* ds_vnni_;  // (block_k / 2, block_q): dS rounded, VNNI over keys (brgemm: (block_q, block_k))
  PairRows k_pairs_{}, v_pairs_{};
};

}  // namespace selfattn::SELFATTN_CPU_NS
