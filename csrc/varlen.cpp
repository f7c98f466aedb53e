// Variable-length (packed) attention, FlashAttention's layout: q (Tq, Hq, D), k (Tk, Hk, D),
// v (Tk, Hk, Dv) hold S sequences back to back; sequence s is rows cu_seqlens_q[s]:cu_seqlens_q[s+1]
// of q and cu_seqlens_k[s]:cu_seqlens_k[s+1] of k and v. Each sequence attends only to itself, and
// the band (causal, window) applies within it: its diagonal offset is 0 (top-left), or nk_s - nq_s
// under bottom_right.
//
// First version: a loop over the sequences that hands each one to the dense kernels of the
// dispatch key's device (op_kernels.h) as (1, H, n_s, D) views of the packed tensors. No copy:
// outputs and gradients are written through views of the packed results, lse through a view of
// (Hq, Tq). Work is proportional to Σ nq_s·nk_s. The loop needs the sequence boundaries on the host:
// read directly on CPU; on CUDA both cu_seqlens are copied to the host once per call, which
// synchronises with the stream (so the op cannot be captured in a CUDA graph).
#include "op_kernels.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>

#include <limits>

namespace selfattn {
namespace {

// Both cu_seqlens on the host, contiguous, values checked: (S + 1) boundaries of q, then of k.
struct Boundaries {
  at::Tensor host;  // (2, S + 1) int32

  int64_t num_seqs() const { return host.size(1) - 1; }
  const int32_t* q() const { return host.data_ptr<int32_t>(); }
  const int32_t* k() const { return host.data_ptr<int32_t>() + host.size(1); }
};

Boundaries read_boundaries(const VarlenShape& s, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k) {
  // On CUDA, this is the op's one device-to-host copy (a synchronisation); on CPU a view or a
  // small copy.
  Boundaries b{at::stack({cu_seqlens_q, cu_seqlens_k}).to(at::kCPU).contiguous()};
  const int64_t count = b.num_seqs() + 1;
  check_cu_seqlens_values(b.q(), count, "cu_seqlens_q", s.total_q.expect_int(), "Tq = q.size(0)", max_seqlen_q,
                          "max_seqlen_q");
  check_cu_seqlens_values(b.k(), count, "cu_seqlens_k", s.total_k.expect_int(), "Tk = k.size(0)", max_seqlen_k,
                          "max_seqlen_k");
  return b;
}

// Rows [start, start + n) of a packed (T, H, D) tensor as a (1, H, n, D) view.
at::Tensor rows(const at::Tensor& t, int64_t start, int64_t n) {
  return t.narrow(0, start, n).transpose(0, 1).unsqueeze(0);
}

// Columns [start, start + n) of a packed (H, T) lse as a (1, H, n) view.
at::Tensor lse_rows(const at::Tensor& lse, int64_t start, int64_t n) { return lse.narrow(1, start, n).unsqueeze(0); }

// The argument builder of varlen_attention_fwd and varlen_attention_bwd: their mask arguments
// (the band and bottom_right) and dropout's, checked; each sequence's mask
// as the kernels take it.
class VarlenMaskArguments {
 public:
  VarlenMaskArguments(const OpArguments& args, const VarlenShape& s, const at::Tensor& q, bool for_kernels)
      : band_(band_arguments(args)),
        bottom_right_(args.boolean("bottom_right")),
        dropout_p_(args.real("dropout_p")),
        rng_state_(args.optional_tensor("rng_state")) {
    check_dropout(dropout_p_, rng_state_, q, "q");
    score_mod_arguments(args, q, "q", s.num_seqs, s.heads, "S", for_kernels ? &scores_ : nullptr);
  }

  // Sequence `seq`'s mask (nq queries, nk keys); its dropout decisions and ALiBi slopes take the
  // sequence index as their batch index.
  AttentionMask sequence(int64_t nq, int64_t nk, int64_t seq) const {
    AttentionMask mask = scores_;
    mask.band = band_.with_offset(bottom_right_ ? nk - nq : 0);
    mask.scores.alibi_slopes =
        scores_.scores.has_alibi() ? scores_.scores.alibi_slopes + seq * scores_.scores.alibi_stride_b : nullptr;
    mask.set_dropout(dropout_p_, rng_state_, seq);
    return mask;
  }

 private:
  BandArguments band_;
  bool bottom_right_;
  double dropout_p_;
  std::optional<at::Tensor> rng_state_;
  AttentionMask scores_;  // the score modifications, read once
};

// q, k, v, cu_seqlens_q/k, max_seqlen_q/k and scale, checked.
struct VarlenInputs {
  at::Tensor q, k, v, cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
  double scale;
  VarlenShape shape;

  explicit VarlenInputs(const OpArguments& args)
      : q(args.tensor("q")),
        k(args.tensor("k")),
        v(args.tensor("v")),
        cu_seqlens_q(args.tensor("cu_seqlens_q")),
        cu_seqlens_k(args.tensor("cu_seqlens_k")),
        max_seqlen_q(args.integer("max_seqlen_q")),
        max_seqlen_k(args.integer("max_seqlen_k")),
        scale(args.real("scale")),
        shape(check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)) {}

  // Both cu_seqlens on the host, values checked (only a device with kernels: they need data).
  Boundaries boundaries() const {
    return read_boundaries(shape, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  }
};

template <const DeviceKernels& kernels>
void varlen_attention_fwd(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const ArgumentNames names(op.schema());
  const OpArguments args(*stack, names);
  const VarlenInputs in(args);
  const VarlenMaskArguments mask(args, in.shape, in.q, kernels.runs());
  const VarlenShape& s = in.shape;
  const at::Tensor out = at::empty_symint({s.total_q, s.heads, s.dim_v}, in.q.options());
  const at::Tensor lse =
      at::empty_symint({s.heads, s.total_q}, in.q.options().dtype(accumulate_type(in.q.scalar_type())));
  if constexpr (kernels.runs()) {
    const Boundaries b = in.boundaries();
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      const int64_t q0 = b.q()[i], nq = b.q()[i + 1] - q0;
      const int64_t k0 = b.k()[i], nk = b.k()[i + 1] - k0;
      if (nq == 0) {
        continue;
      }
      if (nk == 0) {  // no key to attend to: an empty sum
        write_empty_rows(mask.sequence(nq, nk, i), rows(out, q0, nq), lse_rows(lse, q0, nq));
        continue;
      }
      kernels.forward(rows(in.q, q0, nq), rows(in.k, k0, nk), rows(in.v, k0, nk), mask.sequence(nq, nk, i), in.scale,
                      rows(out, q0, nq), lse_rows(lse, q0, nq));
    }
  }
  set_outputs(stack, names, out, lse);
}

template <const DeviceKernels& kernels>
void varlen_attention_bwd(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const ArgumentNames names(op.schema());
  const OpArguments args(*stack, names);
  const VarlenInputs in(args);
  const VarlenMaskArguments mask(args, in.shape, in.q, kernels.runs());
  const at::Tensor grad_out = args.tensor("grad_out"), out = args.tensor("out"), lse = args.tensor("lse");
  check_varlen_grad_inputs(in.shape, in.q, grad_out, out, lse);
  const at::Tensor grad_q = at::empty_like(in.q), grad_k = at::empty_like(in.k), grad_v = at::empty_like(in.v);
  const std::optional<at::Tensor> sinks = args.optional_tensor("sinks");
  at::Tensor grad_sinks = sinks.has_value() ? at::empty_like(*sinks) : at::empty({0}, in.q.options());
  if constexpr (kernels.runs()) {
    const Boundaries b = in.boundaries();
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      const int64_t q0 = b.q()[i], nq = b.q()[i + 1] - q0;
      const int64_t k0 = b.k()[i], nk = b.k()[i + 1] - k0;
      if (nq == 0 || nk == 0) {  // nothing attends to anything: every gradient is zero
        grad_q.narrow(0, q0, nq).zero_();
        grad_k.narrow(0, k0, nk).zero_();
        grad_v.narrow(0, k0, nk).zero_();
        continue;
      }
      kernels.backward(rows(grad_out, q0, nq), rows(in.q, q0, nq), rows(in.k, k0, nk), rows(in.v, k0, nk),
                       rows(out, q0, nq), lse_rows(lse, q0, nq), mask.sequence(nq, nk, i), in.scale,
                       rows(grad_q, q0, nq), rows(grad_k, k0, nk), rows(grad_v, k0, nk));
    }
    if (sinks.has_value()) {  // (Tq, Hq, Dv) and (Hq, Tq) as one (1, Hq, Tq, ·) batch
      grad_sinks = sinks_gradient(*sinks, rows(grad_out, 0, in.shape.total_q.expect_int()),
                                  rows(out, 0, in.shape.total_q.expect_int()), lse.unsqueeze(0));
    }
  }
  set_outputs(stack, names, grad_q, grad_k, grad_v, grad_sinks);
}

// Under torch.autocast, float32 q/k/v run in the region's lower-precision dtype, as for
// attention_fwd; cu_seqlens stay int32.
void varlen_attention_fwd_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  static const AutocastCasts casts{{"q", "k", "v"}, /*mask_to_dtype=*/true};
  autocast_kernel(op, casts, stack);
}

template <const DeviceKernels& kernels>
void register_kernels(torch::Library& m) {
  m.impl("varlen_attention_fwd", boxed<&varlen_attention_fwd<kernels>>());
  m.impl("varlen_attention_bwd", boxed<&varlen_attention_bwd<kernels>>());
}

}  // namespace

TORCH_LIBRARY_IMPL(selfattn, CPU, m) { register_kernels<kCpuKernels>(m); }

#ifdef SELFATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(selfattn, CUDA, m) { register_kernels<kCudaKernels>(m); }
#endif

TORCH_LIBRARY_IMPL(selfattn, Meta, m) { register_kernels<kMetaKernels>(m); }

TORCH_LIBRARY_IMPL(selfattn, AutocastCPU, m) {
  m.impl("varlen_attention_fwd", boxed<&varlen_attention_fwd_autocast>());
}

TORCH_LIBRARY_IMPL(selfattn, AutocastCUDA, m) {
  m.impl("varlen_attention_fwd", boxed<&varlen_attention_fwd_autocast>());
}

}  // namespace selfattn
