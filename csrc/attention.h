// Entry points of the attention kernels, shared by the ops (attention.cpp, jvp.cpp, varlen.cpp,
// self_attention.cpp, which reach them by dispatch key: op_kernels.h) and the per-device kernel files.
//
// Shapes, for every function below:
//   q   (B, Hq, Nq, D)    k (B, Hk, Nk, D)    v (B, Hk, Nk, Dv)    any strides
//   out (B, Hq, Nq, Dv)   lse (B, Hq, Nq): natural-log logsumexp of the scaled, masked scores of
//                         each row (-inf for a row that sees no key; its output is 0)
// Hk divides Hq: query head h reads kv head h / (Hq / Hk) (grouped-query attention; Hk = Hq is
// plain multi-head attention). The caller has checked every argument (checks.h) and allocated
// the outputs; the kernels only fill them. lse is float32, or float64 for float64 inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"
#include "mask.h"
#include "philox.h"

#include <limits>
#include <optional>
#include <string>

namespace selfattn {

// Which keys each query sees (mask.h), and at most one tensor mask: undefined, or a
// (B, Hq, Nq, Nk) view, any strides (0 on broadcast dims), bool (true = take part) or float
// (added to the scaled scores; q's dtype or float32). The score modifications (mask.h's ScoreMods:
// softcap, ALiBi, sinks), applied before any of those. And dropout (philox.h), applied to the
// probabilities after the softmax: lse stays the logsumexp without dropout.
struct AttentionMask {
  Band band;
  at::Tensor tensor;
  ScoreMods scores;
  at::Tensor alibi_state, sinks_state;  // hold what scores.alibi_slopes and scores.sinks point into
  Dropout dropout;
  at::Tensor dropout_state;  // holds what dropout.rng_state points into

  bool none() const { return band.unbounded() && !tensor.defined(); }

  // The ops' score-modification arguments (checked: check_score_mods). alibi_slopes (Hq,) or
  // (B, Hq), its row b read for the kernels' b (varlen moves the pointer to each sequence's row).
  // sinks are converted to the accumulation type `acc` (float32, or float64 for float64 inputs).
  void set_scores(double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                  at::ScalarType acc) {
    scores.softcap = softcap;
    if (alibi_slopes.has_value()) {
      alibi_state = alibi_slopes->dim() == 1 ? alibi_slopes->unsqueeze(0) : *alibi_slopes;
      const bool per_batch = alibi_state.size(0) > 1;
      scores.alibi_stride_b = per_batch ? alibi_state.stride(0) : 0;
      scores.alibi_stride_h = alibi_state.stride(1);
      scores.alibi_slopes = alibi_state.data_ptr<float>();
    }
    if (sinks.has_value()) {
      sinks_state = sinks->to(acc).contiguous();
      scores.sinks = sinks_state.data_ptr();
    }
  }

  // The ops' dropout arguments (checked: check_dropout); b of the kernels' tensors plus
  // batch_offset is the b of the keep decisions (varlen: the sequence index).
  void set_dropout(double dropout_p, const std::optional<at::Tensor>& rng_state, int64_t batch_offset = 0) {
    if (dropout_p <= 0.0) {
      return;
    }
    dropout_state = rng_state->contiguous();
    dropout.rng_state = dropout_state.data_ptr<int64_t>();
    dropout.threshold = dropout_threshold(dropout_p);
    dropout.keep_scale = 1.0 / (1.0 - dropout_p);
    dropout.batch_offset = batch_offset;
  }
};

// out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) of rows that see no key (Nk = 0): output 0, lse -inf, or
// sinks[h] with sinks (a softmax over the sink alone).
inline void write_empty_rows(const AttentionMask& mask, const at::Tensor& out, const at::Tensor& lse) {
  out.zero_();
  if (mask.scores.has_sinks()) {
    lse.copy_(mask.sinks_state.view({1, -1, 1}).expand_as(lse));
  } else {
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
}

// The CPU kernels, through the copy for the CPU at hand (cpu/dispatch.cpp).
void attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                           double scale, const at::Tensor& out, const at::Tensor& lse);

// grad_out (B, Hq, Nq, Dv), any strides; grad_q/k/v have the shapes of q/k/v, any strides
// (the fused op passes views of one packed (B, N, H + 2·Hkv, D) buffer).
void attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask, double scale,
                            const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v);

// Forward-mode derivative: out and lse as attention_forward_cpu's, and tangent_out (B, Hq, Nq, Dv), any
// strides, the derivative of out along tangent_q/k/v (the shapes of q/k/v, any strides; an undefined
// tangent is zero). One pass, no Nq x Nk matrix (attention_jvp.cpp).
void attention_jvp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tangent_q,
                       const at::Tensor& tangent_k, const at::Tensor& tangent_v, const AttentionMask& mask,
                       double scale, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out);

#ifdef SELFATTN_WITH_CUDA
void attention_jvp_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tangent_q,
                        const at::Tensor& tangent_k, const at::Tensor& tangent_v, const AttentionMask& mask,
                        double scale, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out);
#endif
// Which copy of the CPU kernels runs (cpu/dispatch.cpp; the op _cpu_capability): "" reports it,
// "auto" decides again as on the first call, "default" / "avx2" / "avx512" forces one.
std::string cpu_capability(std::string capability);
// The tile GEMMs bfloat16 inputs would run on in that copy now (cpu/kernels.h; the op
// _bf16_tile_gemm).
std::string bf16_tile_gemm();
// The caches the copy in use blocks for and the forward query blocks they give (cpu/blocking.h;
// the op _cpu_blocking).
std::string cpu_blocking();

#ifdef SELFATTN_WITH_CUDA
void attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                            double scale, const at::Tensor& out, const at::Tensor& lse);
void attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask, double scale,
                             const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v);
#endif

}  // namespace selfattn
