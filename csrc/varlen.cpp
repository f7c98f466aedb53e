// Variable-length (packed) attention, FlashAttention's layout: q (Tq, Hq, D), k (Tk, Hk, D),
// v (Tk, Hk, Dv) hold S sequences back to back; sequence s is rows cu_seqlens_q[s]:cu_seqlens_q[s+1]
// of q and cu_seqlens_k[s]:cu_seqlens_k[s+1] of k and v. Each sequence attends only to itself, and
// the band (causal, window) applies within it: its diagonal offset is 0 (top-left), or nk_s - nq_s
// under bottom_right.
//
// First version: a loop over the sequences that hands each one to the dense kernels
// (attention_forward / attention_backward) as (1, H, n_s, D) views of the packed tensors. No copy:
// outputs and gradients are written through views of the packed results, lse through a view of
// (Hq, Tq). Work is proportional to Σ nq_s·nk_s. The loop needs the sequence boundaries on the host:
// read directly on CPU; on CUDA both cu_seqlens are copied to the host once per call, which
// synchronises with the stream (so the op cannot be captured in a CUDA graph).
#include <ATen/autocast_mode.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <limits>

#include "attention.h"

namespace selfattn {
namespace {

// Both cu_seqlens on the host, contiguous, values checked: (S + 1) boundaries of q, then of k.
struct Boundaries {
  at::Tensor host;  // (2, S + 1) int32

  int64_t num_seqs() const { return host.size(1) - 1; }
  const int32_t* q() const { return host.data_ptr<int32_t>(); }
  const int32_t* k() const { return host.data_ptr<int32_t>() + host.size(1); }
};

Boundaries read_boundaries(const VarlenShape& s, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  // On CUDA, this is the op's one device-to-host copy (a synchronisation); on CPU a view or a
  // small copy.
  Boundaries b{at::stack({cu_seqlens_q, cu_seqlens_k}).to(at::kCPU).contiguous()};
  const int64_t count = s.num_seqs + 1;
  check_cu_seqlens_values(b.q(), count, "cu_seqlens_q", s.total_q, "Tq = q.size(0)", max_seqlen_q,
                          "max_seqlen_q");
  check_cu_seqlens_values(b.k(), count, "cu_seqlens_k", s.total_k, "Tk = k.size(0)", max_seqlen_k,
                          "max_seqlen_k");
  return b;
}

// Rows [start, start + n) of a packed (T, H, D) tensor as a (1, H, n, D) view.
at::Tensor rows(const at::Tensor& t, int64_t start, int64_t n) {
  return t.narrow(0, start, n).transpose(0, 1).unsqueeze(0);
}

// Columns [start, start + n) of a packed (H, T) lse as a (1, H, n) view.
at::Tensor lse_rows(const at::Tensor& lse, int64_t start, int64_t n) {
  return lse.narrow(1, start, n).unsqueeze(0);
}

// Sequence `seq`'s mask; its dropout decisions take the sequence index as their batch index.
AttentionMask sequence_mask(bool causal, int64_t window_left, int64_t window_right, bool bottom_right,
                            int64_t nq, int64_t nk, double dropout_p, const std::optional<at::Tensor>& rng_state,
                            int64_t seq) {
  AttentionMask mask;
  mask.band = make_band(causal, window_left, window_right, bottom_right ? nk - nq : 0);
  mask.set_dropout(dropout_p, rng_state, seq);
  return mask;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const VarlenShape s =
      check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_window(window_left, window_right);
  check_dropout(dropout_p, rng_state, q, "q");
  const Boundaries b = read_boundaries(s, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  at::Tensor out = at::empty({s.total_q, s.heads, s.dim_v}, q.options());
  at::Tensor lse = at::empty({s.heads, s.total_q}, q.options().dtype(accumulate_type(q.scalar_type())));
  for (int64_t i = 0; i < s.num_seqs; ++i) {
    const int64_t q0 = b.q()[i], nq = b.q()[i + 1] - q0;
    const int64_t k0 = b.k()[i], nk = b.k()[i + 1] - k0;
    if (nq == 0) {
      continue;
    }
    if (nk == 0) {  // no key to attend to: an empty sum
      out.narrow(0, q0, nq).zero_();
      lse.narrow(1, q0, nq).fill_(-std::numeric_limits<double>::infinity());
      continue;
    }
    attention_forward(rows(q, q0, nq), rows(k, k0, nk), rows(v, k0, nk),
                      sequence_mask(causal, window_left, window_right, bottom_right, nq, nk, dropout_p, rng_state, i),
                      scale, rows(out, q0, nq), lse_rows(lse, q0, nq));
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const VarlenShape s =
      check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_window(window_left, window_right);
  check_dropout(dropout_p, rng_state, q, "q");
  check_varlen_grad_inputs(s, q, grad_out, out, lse);
  const Boundaries b = read_boundaries(s, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  for (int64_t i = 0; i < s.num_seqs; ++i) {
    const int64_t q0 = b.q()[i], nq = b.q()[i + 1] - q0;
    const int64_t k0 = b.k()[i], nk = b.k()[i + 1] - k0;
    if (nq == 0 || nk == 0) {  // nothing attends to anything: every gradient is zero
      grad_q.narrow(0, q0, nq).zero_();
      grad_k.narrow(0, k0, nk).zero_();
      grad_v.narrow(0, k0, nk).zero_();
      continue;
    }
    attention_backward(rows(grad_out, q0, nq), rows(q, q0, nq), rows(k, k0, nk), rows(v, k0, nk),
                       rows(out, q0, nq), lse_rows(lse, q0, nq),
                       sequence_mask(causal, window_left, window_right, bottom_right, nq, nk, dropout_p, rng_state, i),
                       scale, rows(grad_q, q0, nq), rows(grad_k, k0, nk), rows(grad_v, k0, nk));
  }
  return {grad_q, grad_k, grad_v};
}

// Under torch.autocast, float32 q/k/v run in the region's lower-precision dtype, as for
// attention_fwd; cu_seqlens stay int32.
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_autocast(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const c10::DeviceType device_type = q.device().type();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("selfattn::varlen_attention_fwd", "")
                       .typed<decltype(varlen_attention_fwd)>();
  return op.call(at::autocast::cached_cast(dtype, q, device_type),
                 at::autocast::cached_cast(dtype, k, device_type),
                 at::autocast::cached_cast(dtype, v, device_type), cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, bottom_right,
                 dropout_p, rng_state);
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd);
}

#ifdef SELFATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selfattn, CUDA, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd);
}
#endif

TORCH_LIBRARY_IMPL(selfattn, AutocastCPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_autocast);
}

TORCH_LIBRARY_IMPL(selfattn, AutocastCUDA, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_autocast);
}

}  // namespace selfattn
