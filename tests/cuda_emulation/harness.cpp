// The CUDA attention kernels (csrc/cuda/*.cu, compiled here as C++) run on the CPU through
// emulation.h, behind a small Python module: test_cuda_emulation.py builds it with
// torch.utils.cpp_extension.load and compares its results with float64 references.
//
// The same host code runs as on the GPU (attention_cuda.cpp's run_forward / run_backward:
// kernel arguments, kernel choice, launch configuration), after the same argument checks as the
// ops make (checks.cpp); only the device guard and the stream are left out.
#include "emulation.h"

#include "../../csrc/checks.cpp"

#include "../../csrc/cuda/attention_bwd.cu"
#include "../../csrc/cuda/attention_bwd_dkdv.cu"
#include "../../csrc/cuda/attention_bwd_dq.cu"
#include "../../csrc/cuda/attention_bwd_tc_hd128_bf16.cu"
#include "../../csrc/cuda/attention_bwd_tc_hd128_f16.cu"
#include "../../csrc/cuda/attention_bwd_tc_hd64_bf16.cu"
#include "../../csrc/cuda/attention_bwd_tc_hd64_f16.cu"
#include "../../csrc/cuda/attention_cuda.cpp"
#include "../../csrc/cuda/attention_decode.cu"
#include "../../csrc/cuda/attention_fwd.cu"
#include "../../csrc/cuda/attention_fwd_tc_hd128_bf16.cu"
#include "../../csrc/cuda/attention_fwd_tc_hd128_f16.cu"
#include "../../csrc/cuda/attention_fwd_tc_hd64_bf16.cu"
#include "../../csrc/cuda/attention_fwd_tc_hd64_f16.cu"
#include "../../csrc/cuda/attention_generic.cu"
#include "../../csrc/cuda/attention_jvp.cu"

#include <torch/extension.h>

#include <map>
#include <string>

namespace {

// The score modifications (softcap, alibi_slopes, sinks) every call below applies until they are
// set again (set_score_mods; none at first): the ops' arguments, as set_scores takes them.
struct ScoreModArgs {
  double softcap = 0.0;
  std::optional<at::Tensor> alibi_slopes, sinks;
};
ScoreModArgs& score_mod_args() {
  static ScoreModArgs args;
  return args;
}

// The kernels' mask for checked mask arguments, as the ops' builder makes it (csrc/attention.cpp,
// attention_mask_arguments): attn_mask broadcast to (B, Hq, Nq, Nk) as a view.
selfattn::AttentionMask make_mask(const selfattn::AttentionShape& s, bool causal,
                                  const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right,
                                  int64_t diagonal_offset, double dropout_p = 0.0,
                                  const std::optional<at::Tensor>& rng_state = std::nullopt) {
  selfattn::AttentionMask mask;
  mask.band = selfattn::make_band(causal, window_left, window_right, diagonal_offset);
  if (attn_mask.has_value()) {
    mask.tensor = attn_mask->expand_symint({s.batch, s.heads, s.nq, s.nk});
  }
  const ScoreModArgs& mods = score_mod_args();
  if (mods.softcap > 0.0 || mods.alibi_slopes.has_value() || mods.sinks.has_value()) {
    const at::ScalarType acc =
        mods.sinks.has_value() && mods.sinks->scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    mask.set_scores(mods.softcap, mods.alibi_slopes, mods.sinks, acc);
  }
  mask.set_dropout(dropout_p, rng_state);
  return mask;
}

// attention_fwd's arguments (the op's order, dropout included), then the outputs to fill.
void forward_dropout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                     const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right,
                     int64_t diagonal_offset, double dropout_p, const std::optional<at::Tensor>& rng_state,
                     const at::Tensor& out, const at::Tensor& lse) {
  const selfattn::AttentionShape shape = selfattn::check_attention_inputs(q, k, v, scale);
  selfattn::check_window(window_left, window_right);
  selfattn::check_mask_inputs(shape, q, attn_mask);
  selfattn::check_dropout(dropout_p, rng_state, q, "q");
  selfattn::cuda::run_forward(
      q, k, v, make_mask(shape, causal, attn_mask, window_left, window_right, diagonal_offset, dropout_p, rng_state),
      scale, out, lse, nullptr);
}

// attention_fwd's arguments (the op's order), then the outputs to fill.
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
             const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right,
             int64_t diagonal_offset, const at::Tensor& out, const at::Tensor& lse) {
  forward_dropout(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset, 0.0, std::nullopt, out,
                  lse);
}

// attention_bwd's arguments (the op's order, dropout included), then the gradients to fill.
void backward_dropout(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
                      const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right,
                      int64_t diagonal_offset, double dropout_p, const std::optional<at::Tensor>& rng_state,
                      const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const selfattn::AttentionShape shape = selfattn::check_attention_inputs(q, k, v, scale);
  selfattn::check_window(window_left, window_right);
  selfattn::check_mask_inputs(shape, q, attn_mask);
  selfattn::check_dropout(dropout_p, rng_state, q, "q");
  selfattn::check_attention_grad_inputs(shape, q, grad_out, out, lse);
  selfattn::cuda::run_backward(
      grad_out, q, k, v, out, lse,
      make_mask(shape, causal, attn_mask, window_left, window_right, diagonal_offset, dropout_p, rng_state), scale,
      grad_q, grad_k, grad_v, nullptr);
}

void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
              const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right,
              int64_t diagonal_offset, const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v) {
  backward_dropout(grad_out, q, k, v, out, lse, causal, scale, attn_mask, window_left, window_right, diagonal_offset,
                   0.0, std::nullopt, grad_q, grad_k, grad_v);
}

// attention_jvp's arguments (the op's order), then the outputs to fill.
void jvp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tangent_q,
         const std::optional<at::Tensor>& tangent_k, const std::optional<at::Tensor>& tangent_v, bool causal,
         double scale, const std::optional<at::Tensor>& attn_mask, int64_t window_left, int64_t window_right,
         int64_t diagonal_offset, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out) {
  const selfattn::AttentionShape shape = selfattn::check_attention_inputs(q, k, v, scale);
  selfattn::check_window(window_left, window_right);
  selfattn::check_mask_inputs(shape, q, attn_mask);
  selfattn::check_attention_tangents(shape, q, tangent_q, tangent_k, tangent_v);
  const auto or_undefined = [](const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
  selfattn::cuda::run_jvp(q, k, v, or_undefined(tangent_q), or_undefined(tangent_k), or_undefined(tangent_v),
                          make_mask(shape, causal, attn_mask, window_left, window_right, diagonal_offset), scale, out,
                          lse, tangent_out, nullptr);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selfattn's CUDA kernels on the CPU, through a fiber-per-thread emulation";
  m.def("forward", &forward,
        "forward(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset, out, "
        "lse): fills out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) like attention_forward_cuda");
  m.def("backward", &backward,
        "backward(grad_out, q, k, v, out, lse, causal, scale, attn_mask, window_left, window_right, "
        "diagonal_offset, grad_q, grad_k, grad_v): fills the gradients like attention_backward_cuda");
  m.def("forward_dropout", &forward_dropout,
        "forward_dropout(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset, "
        "dropout_p, rng_state, out, lse): forward with dropout");
  m.def("backward_dropout", &backward_dropout,
        "backward_dropout(grad_out, q, k, v, out, lse, causal, scale, attn_mask, window_left, window_right, "
        "diagonal_offset, dropout_p, rng_state, grad_q, grad_k, grad_v): backward with dropout");
  m.def("jvp", &jvp,
        "jvp(q, k, v, tangent_q, tangent_k, tangent_v, causal, scale, attn_mask, window_left, window_right, "
        "diagonal_offset, out, lse, tangent_out): fills out, lse and tangent_out like attention_jvp_cuda");
  m.def(
      "set_score_mods",
      [](double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
        score_mod_args() = {softcap, alibi_slopes, sinks};
      },
      "set_score_mods(softcap, alibi_slopes, sinks): the score modifications of the calls that follow (sinks in "
      "the accumulation type: float32, float64 for float64 inputs)");
  m.def(
      "seed", [](int64_t seed) { emu::state().rng.seed(static_cast<uint32_t>(seed)); },
      "seed of the thread-order shuffling");
  m.def("blocks_run", [] { return emu::state().blocks_run; }, "blocks emulated so far");
  m.def(
      "counters",
      [] {
        const emu::Counters& c = emu::state().counters;
        return std::map<std::string, uint64_t>{{"mma", c.mma},
                                               {"ldmatrix", c.ldmatrix},
                                               {"cp_async", c.cp_async},
                                               {"ldmatrix_phases", c.ldmatrix_phases},
                                               {"ldmatrix_extra_wavefronts", c.ldmatrix_extra_wavefronts},
                                               {"decode_launches", c.decode_launches},
                                               {"decode_splits", c.decode_splits}};
      },
      "tensor-core instructions emulated so far (warp-level mma and ldmatrix, thread-level cp.async) "
      "and ldmatrix bank-conflict replays; decode_launches / decode_splits: split-K decode forwards run and the "
      "latest one's S");
  m.def("reset_counters", [] { emu::state().counters = emu::Counters{}; });
}
