// The bfloat16 operands of the attention kernels' tile GEMMs (tile_bf16.h), one object per thread:
// what each GEMM reads, packed from the bf16 inputs or rounded from the float32 tiles, and the
// GEMMs themselves. The kernels keep their float32 softmax and accumulators; only the GEMM
// operands are bf16 (P and dS rounded to bf16 first, as SDPA's bf16 kernels do).
#pragma once

#include "tile.h"
#include "tile_bf16.h"

namespace selfattn::cpu {

// Forward: scores = scale · k rows · queries, acc += P · v rows (tiles transposed as in
// attention_fwd.cpp: key rows x query columns).
class ForwardBf16 {
  using Carver = ScratchCarver<uint32_t>;

 public:
  ForwardBf16(int64_t dim, int64_t dim_v, int64_t dim_v_padded, int64_t block_q, int64_t block_k)
      : dim_(dim),
        dim_v_(dim_v),
        dim_v_padded_(dim_v_padded),
        block_q_(block_q),
        dim_pairs_(ceil_div(dim, 2)),
        buffer_(Carver::padded(dim_pairs_ * block_q) + Carver::padded(ceil_div(block_k, 2) * dim_v_padded) +
                Carver::padded(ceil_div(block_k, 2) * block_q) + Carver::padded(ceil_div(block_k * round_up(dim, 2), 2))) {
    Carver carve(buffer_.get());
    q_vnni_ = carve.take(dim_pairs_ * block_q);
    v_vnni_ = carve.take(ceil_div(block_k, 2) * dim_v_padded);
    p_vnni_ = carve.take(ceil_div(block_k, 2) * block_q);
    k_scratch_ = reinterpret_cast<uint16_t*>(carve.take(ceil_div(block_k * round_up(dim, 2), 2)));
  }

  // The block's queries q0 .. q0 + rows - 1 as the score GEMM's columns (padding columns zero).
  void pack_queries(const Bf16View& q, int64_t b, int64_t h, int64_t q0, int64_t rows) {
    vnni_over_dim(q, b, h, q0, rows, dim_, q_vnni_, block_q_);
  }

  // p_t (k_rows x block_q) = scale · k rows k0.. · the packed queries; with a cut, only the
  // slabs gemm_keys_x_queries would compute.
  void scores(const Bf16View& k, int64_t b, int64_t h, int64_t k0, int64_t k_rows, const MaskCut* cut, float scale,
              float* p_t) {
    const PairRows k_rows_bf16 = pair_rows(k, b, h, k0, k_rows, dim_, k_scratch_);
    if (cut == nullptr) {
      gemm_bf16(k_rows, block_q_, dim_pairs_, k_rows_bf16.data, k_rows_bf16.row_stride, 2, q_vnni_, block_q_, p_t,
                block_q_, scale, /*accumulate=*/false);
    } else {
      gemm_bf16_keys_x_queries(*cut, k_rows, block_q_, dim_pairs_, k_rows_bf16.data, k_rows_bf16.row_stride, 2,
                               q_vnni_, block_q_, p_t, block_q_, scale);
    }
  }

  // acc (q_rows x dim_v_padded) += P · v rows k0 .. k0 + k_rows - 1, P = p_t's transpose rounded
  // to bf16; with a cut, each slab of queries over the keys it sees (gemm_queries_x_keys).
  void add_probs_times_values(const float* p_t, int64_t k_rows, int64_t q_rows, const Bf16View& v, int64_t b,
                              int64_t h, int64_t k0, const MaskCut* cut, float* acc) {
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
  int64_t dim_, dim_v_, dim_v_padded_, block_q_, dim_pairs_;
  Scratch<uint32_t> buffer_;
  uint32_t* q_vnni_;      // (dim_pairs, block_q): the block's queries, VNNI over the head dim
  uint32_t* v_vnni_;      // (block_k / 2, dim_v_padded): a value block, VNNI over keys
  uint32_t* p_vnni_;      // (block_k / 2, block_q): P rounded to bf16, VNNI over keys
  uint16_t* k_scratch_;   // a key block's rows, when k cannot be read in place
};

}  // namespace selfattn::cpu
