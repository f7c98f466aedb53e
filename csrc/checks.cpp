// The argument checks of every op (checks.h): the only copy, on every dispatch key.
#include "checks.h"

#include <c10/core/ScalarType.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <string>

namespace selfattn {
namespace {

// Python's spelling of a dtype ("torch.float32"), as Python code prints one.
std::string dtype_name(at::ScalarType dtype) { return "torch." + std::string(c10::getDtypeNames(dtype).first); }

void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "selfattn: ", name, " must be a tensor, got None");
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "selfattn: ", name, " must be float32, float64, bfloat16 or float16, got ", dtype_name(dtype));
}

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* meaning) {
  TORCH_CHECK_VALUE(t.dim() == rank, "selfattn: ", name, " must be ", rank, "-D ", meaning, ", got shape ",
                    t.sym_sizes());
}

// Same dtype and device as `ref`, which has been checked already.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "selfattn: ", name, " must have the dtype of ", ref_name, " (",
                   dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), "selfattn: ", name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

// (A SymIntArrayRef prints as an IntArrayRef does: [2, 3, 4].)
void check_shape(const at::Tensor& t, const char* name, c10::SymIntArrayRef expected, const char* meaning) {
  TORCH_CHECK_VALUE(t.sym_sizes() == expected, "selfattn: ", name, " must have shape ", meaning, " = ", expected,
                    ", got ", t.sym_sizes());
}

// A saved logsumexp: the accumulation dtype of the inputs, their device, the given shape.
void check_lse(const at::Tensor& lse, const at::Tensor& ref, const char* ref_name, c10::SymIntArrayRef expected,
               const char* meaning) {
  TORCH_CHECK_VALUE(lse.defined(), "selfattn: lse must be a tensor, got None");
  const at::ScalarType want = accumulate_type(ref.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == want, "selfattn: lse must be ", dtype_name(want), " for ",
                   dtype_name(ref.scalar_type()), " inputs, got ", dtype_name(lse.scalar_type()));
  TORCH_CHECK_VALUE(lse.device() == ref.device(), "selfattn: lse must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", lse.device());
  check_shape(lse, "lse", expected, meaning);
}

void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "selfattn: scale must be finite, got ", scale);
}

// q, k, v of the given rank: float dtypes, one dtype and device; meanings name their dims.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank, const char* q_meaning,
               const char* k_meaning, const char* v_meaning) {
  check_float_tensor(q, "q");
  check_float_tensor(k, "k");
  check_float_tensor(v, "v");
  check_rank(q, "q", rank, q_meaning);
  check_rank(k, "k", rank, k_meaning);
  check_rank(v, "v", rank, v_meaning);
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
}

// Grouped-query attention: Hk divides Hq (Hk = Hq is plain multi-head attention).
void check_heads_divide(const c10::SymInt& heads, const c10::SymInt& heads_kv) {
  TORCH_CHECK_VALUE(heads_kv >= 1 ? heads % heads_kv == 0 : heads == 0,
                    "selfattn: k must have a number of heads that divides q's (grouped-query "
                    "attention), got ",
                    heads_kv, " for k and ", heads, " for q");
}

}  // namespace

AttentionShape check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_qkv(q, k, v, 4, "(B, Hq, Nq, D)", "(B, Hk, Nk, D)", "(B, Hk, Nk, Dv)");
  const AttentionShape s{q.sym_size(0), q.sym_size(1), k.sym_size(1), q.sym_size(2),
                         k.sym_size(2), q.sym_size(3), v.sym_size(3)};
  check_heads_divide(s.heads, s.heads_kv);
  check_shape(k, "k", {s.batch, s.heads_kv, s.nk, s.dim}, "(B, Hk, Nk, D) with B, D of q");
  check_shape(v, "v", {s.batch, s.heads_kv, s.nk, s.dim_v}, "(B, Hk, Nk, Dv) with B, Hk, Nk of k");
  check_scale(scale);
  return s;
}

void check_window(int64_t left, int64_t right) {
  TORCH_CHECK_VALUE(left >= -1, "selfattn: window_left must be >= -1 (-1: unbounded), got ", left);
  TORCH_CHECK_VALUE(right >= -1, "selfattn: window_right must be >= -1 (-1: unbounded), got ", right);
}

void check_dropout_p(double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "selfattn: dropout_p must be in [0, 1), got ", dropout_p);
}

void check_dropout(double dropout_p, const std::optional<at::Tensor>& rng_state, const at::Tensor& ref,
                   const char* ref_name) {
  check_dropout_p(dropout_p);
  if (!rng_state.has_value()) {
    TORCH_CHECK_VALUE(dropout_p == 0.0, "selfattn: rng_state must be a tensor when dropout_p > 0, got None");
    return;
  }
  const at::Tensor& state = *rng_state;
  TORCH_CHECK_TYPE(state.scalar_type() == at::kLong, "selfattn: rng_state must be torch.int64 (seed, offset), got ",
                   dtype_name(state.scalar_type()));
  check_shape(state, "rng_state", {2}, "(seed, offset)");
  TORCH_CHECK_VALUE(state.device() == ref.device(), "selfattn: rng_state must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", state.device());
}

void check_score_mods(double softcap, const std::optional<at::Tensor>& alibi_slopes,
                      const std::optional<at::Tensor>& sinks, const at::Tensor& q, const char* q_name,
                      const c10::SymInt& batch, const c10::SymInt& heads, const char* batch_name) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0,
                    "selfattn: softcap must be a finite number >= 0 (0 = "
                    "no softcapping), got ",
                    softcap);
  if (alibi_slopes.has_value()) {
    const at::Tensor& slopes = *alibi_slopes;
    TORCH_CHECK_TYPE(slopes.scalar_type() == at::kFloat, "selfattn: alibi_slopes must be float32, got ",
                     dtype_name(slopes.scalar_type()));
    TORCH_CHECK_VALUE(slopes.device() == q.device(), "selfattn: alibi_slopes must be on the device of ", q_name, " (",
                      q.device(), "), got ", slopes.device());
    const bool per_head = slopes.dim() == 1 && slopes.sym_size(0) == heads;
    const bool per_batch = slopes.dim() == 2 && slopes.sym_size(0) == batch && slopes.sym_size(1) == heads;
    TORCH_CHECK_VALUE(per_head || per_batch, "selfattn: alibi_slopes must have shape (Hq,) = [", heads, "] or (",
                      batch_name, ", Hq) = [", batch, ", ", heads, "], got ", slopes.sym_sizes());
  }
  if (sinks.has_value()) {
    const at::Tensor& sink = *sinks;
    TORCH_CHECK_TYPE(sink.scalar_type() == at::kFloat || sink.scalar_type() == q.scalar_type(),
                     "selfattn: sinks must be float32 or the dtype of ", q_name, " (", dtype_name(q.scalar_type()),
                     "), got ", dtype_name(sink.scalar_type()));
    TORCH_CHECK_VALUE(sink.device() == q.device(), "selfattn: sinks must be on the device of ", q_name, " (",
                      q.device(), "), got ", sink.device());
    TORCH_CHECK_VALUE(sink.dim() == 1 && sink.sym_size(0) == heads, "selfattn: sinks must have shape (Hq,) = [", heads,
                      "], got ", sink.sym_sizes());
  }
}

void check_sinks_tangent(const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& tangent_sinks) {
  if (!tangent_sinks.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(sinks.has_value(), "selfattn: tangent_sinks was given without sinks");
  check_like(*tangent_sinks, "tangent_sinks", *sinks, "sinks");
  check_shape(*tangent_sinks, "tangent_sinks", sinks->sym_sizes(), "(Hq,), that of sinks");
}

void check_mask_inputs(const AttentionShape& s, const at::Tensor& q, const std::optional<at::Tensor>& attn_mask) {
  if (!attn_mask.has_value()) {
    return;
  }
  const at::Tensor& mask = *attn_mask;
  const at::ScalarType dtype = mask.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBool || dtype == at::kFloat || dtype == q.scalar_type(),
                   "selfattn: attn_mask must be bool, float32 or the dtype of q (", dtype_name(q.scalar_type()),
                   "), got ", dtype_name(dtype));
  TORCH_CHECK_VALUE(mask.device() == q.device(), "selfattn: attn_mask must be on the device of q (", q.device(),
                    "), got ", mask.device());
  const std::array<c10::SymInt, 4> full = {s.batch, s.heads, s.nq, s.nk};
  bool broadcasts = mask.dim() == 4;
  for (int64_t d = 0; broadcasts && d < 4; ++d) {
    broadcasts = mask.sym_size(d) == full[d] || mask.sym_size(d) == 1;
  }
  TORCH_CHECK_VALUE(broadcasts,
                    "selfattn: attn_mask must be 4-D and broadcast to (B, Hq, Nq, Nk) = ", c10::SymIntArrayRef(full),
                    ", got shape ", mask.sym_sizes());
}

void check_attention_tangents(const AttentionShape& s, const at::Tensor& q, const std::optional<at::Tensor>& tangent_q,
                              const std::optional<at::Tensor>& tangent_k, const std::optional<at::Tensor>& tangent_v) {
  const auto check = [&](const std::optional<at::Tensor>& tangent, const char* name, c10::SymIntArrayRef shape,
                         const char* meaning) {
    if (tangent.has_value()) {
      check_float_tensor(*tangent, name);
      check_like(*tangent, name, q, "q");
      check_shape(*tangent, name, shape, meaning);
    }
  };
  check(tangent_q, "tangent_q", {s.batch, s.heads, s.nq, s.dim}, "(B, Hq, Nq, D), q's");
  check(tangent_k, "tangent_k", {s.batch, s.heads_kv, s.nk, s.dim}, "(B, Hk, Nk, D), k's");
  check(tangent_v, "tangent_v", {s.batch, s.heads_kv, s.nk, s.dim_v}, "(B, Hk, Nk, Dv), v's");
}

void check_attention_grad_inputs(const AttentionShape& s, const at::Tensor& q, const at::Tensor& grad_out,
                                 const at::Tensor& out, const at::Tensor& lse) {
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(out, "out");
  check_like(grad_out, "grad_out", q, "q");
  check_like(out, "out", q, "q");
  const std::array<c10::SymInt, 4> out_shape = {s.batch, s.heads, s.nq, s.dim_v};
  check_shape(grad_out, "grad_out", out_shape, "(B, Hq, Nq, Dv)");
  check_shape(out, "out", out_shape, "(B, Hq, Nq, Dv)");
  check_lse(lse, q, "q", {s.batch, s.heads, s.nq}, "(B, Hq, Nq)");
}

namespace {

// A cu_seqlens argument, all but its values: int32, 1-D with S + 1 >= 1 entries, on q's device.
void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(cu.defined(), "selfattn: ", name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "selfattn: ", name, " must be torch.int32, got ",
                   dtype_name(cu.scalar_type()));
  TORCH_CHECK_VALUE(cu.device() == q.device(), "selfattn: ", name, " must be on the device of q (", q.device(),
                    "), got ", cu.device());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.sym_size(0) >= 1, "selfattn: ", name,
                    " must be 1-D (S + 1,) with S >= 0 sequences, got shape ", cu.sym_sizes());
}

}  // namespace

VarlenShape check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, double scale) {
  check_qkv(q, k, v, 3, "(Tq, Hq, D)", "(Tk, Hk, D)", "(Tk, Hk, Dv)");
  VarlenShape s{q.sym_size(0), k.sym_size(0), q.sym_size(1), k.sym_size(1), q.sym_size(2), v.sym_size(2), 0};
  check_heads_divide(s.heads, s.heads_kv);
  check_shape(k, "k", {s.total_k, s.heads_kv, s.dim}, "(Tk, Hk, D) with D of q");
  check_shape(v, "v", {s.total_k, s.heads_kv, s.dim_v}, "(Tk, Hk, Dv) with Tk, Hk of k");
  check_scale(scale);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q);
  s.num_seqs = cu_seqlens_q.sym_size(0) - 1;
  check_shape(cu_seqlens_k, "cu_seqlens_k", {s.num_seqs + 1}, "(S + 1,) with S of cu_seqlens_q");
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, "selfattn: max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK_VALUE(max_seqlen_k >= 0, "selfattn: max_seqlen_k must be >= 0, got ", max_seqlen_k);
  return s;
}

void check_cu_seqlens_values(const int32_t* cu, int64_t count, const char* name, int64_t total, const char* total_name,
                             int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_VALUE(cu[0] == 0, "selfattn: ", name, " must start at 0, got ", cu[0]);
  for (int64_t s = 1; s < count; ++s) {
    const int64_t start = cu[s - 1], end = cu[s];
    TORCH_CHECK_VALUE(start <= end, "selfattn: ", name, " must be non-decreasing, got ", name, "[", s, "] = ", end,
                      " < ", name, "[", s - 1, "] = ", start);
  }
  TORCH_CHECK_VALUE(cu[count - 1] == total, "selfattn: ", name, " must end at ", total_name, " = ", total, ", got ",
                    cu[count - 1]);
  for (int64_t s = 1; s < count; ++s) {
    const int64_t length = int64_t(cu[s]) - cu[s - 1];
    TORCH_CHECK_VALUE(length <= max_seqlen, "selfattn: ", max_name, " = ", max_seqlen,
                      " is less than the length of sequence ", s - 1, " (", name, "[", s, "] - ", name, "[", s - 1,
                      "] = ", length, ")");
  }
}

void check_varlen_grad_inputs(const VarlenShape& s, const at::Tensor& q, const at::Tensor& grad_out,
                              const at::Tensor& out, const at::Tensor& lse) {
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(out, "out");
  check_like(grad_out, "grad_out", q, "q");
  check_like(out, "out", q, "q");
  const std::array<c10::SymInt, 3> out_shape = {s.total_q, s.heads, s.dim_v};
  check_shape(grad_out, "grad_out", out_shape, "(Tq, Hq, Dv)");
  check_shape(out, "out", out_shape, "(Tq, Hq, Dv)");
  check_lse(lse, q, "q", {s.heads, s.total_q}, "(Hq, Tq)");
}

LayerShape check_layer_inputs(const at::Tensor& x, const at::Tensor& w_qkv, const std::optional<at::Tensor>& b_qkv,
                              int64_t num_heads, int64_t num_kv_heads, double scale) {
  check_float_tensor(x, "x");
  check_float_tensor(w_qkv, "w_qkv");
  check_rank(x, "x", 3, "(B, N, E)");
  check_rank(w_qkv, "w_qkv", 2, "((num_heads + 2 * num_kv_heads) * head_dim, embed_dim)");
  check_like(w_qkv, "w_qkv", x, "x");
  TORCH_CHECK_VALUE(num_heads >= 1, "selfattn: num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK_VALUE(num_kv_heads == 0 || (num_kv_heads >= 1 && num_heads % num_kv_heads == 0),
                    "selfattn: num_kv_heads must be >= 1 and divide num_heads = ", num_heads,
                    " (0 means num_heads), got ", num_kv_heads);
  const int64_t heads_kv = num_kv_heads == 0 ? num_heads : num_kv_heads;
  const int64_t slots = num_heads + 2 * heads_kv;
  const c10::SymInt rows = w_qkv.sym_size(0), embed = x.sym_size(2);
  TORCH_CHECK_VALUE(rows >= slots && rows % slots == 0 && w_qkv.sym_size(1) == embed,
                    "selfattn: w_qkv must have shape ((num_heads + 2 * num_kv_heads) * head_dim, "
                    "embed_dim) with num_heads + 2 * num_kv_heads = ",
                    slots,
                    " and embed_dim = "
                    "x.size(-1) = ",
                    embed, ", got ", w_qkv.sym_sizes());
  if (b_qkv.has_value()) {
    check_float_tensor(*b_qkv, "b_qkv");
    check_like(*b_qkv, "b_qkv", x, "x");
    check_shape(*b_qkv, "b_qkv", {rows}, "((num_heads + 2 * num_kv_heads) * head_dim,)");
  }
  check_scale(scale);
  const c10::SymInt head_dim = rows / slots;
  return {x.sym_size(0), x.sym_size(1), embed, num_heads * head_dim, num_heads, heads_kv, head_dim};
}

void check_layer_mask_inputs(const LayerShape& s, const at::Tensor& x, const std::optional<at::Tensor>& attn_mask) {
  const AttentionShape attention{s.batch, s.heads, s.heads_kv, s.seq, s.seq, s.head_dim, s.head_dim};
  check_mask_inputs(attention, x, attn_mask);
}

void check_layer_grad_inputs(const LayerShape& s, const at::Tensor& x, const at::Tensor& grad_out,
                             const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                             const c10::List<bool>& output_mask) {
  TORCH_CHECK_VALUE(output_mask.size() == 4,
                    "selfattn: output_mask must have 4 entries "
                    "(grad_x, grad_w, grad_b, grad_sinks), got ",
                    output_mask.size());
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(qkv, "qkv");
  check_float_tensor(out, "out");
  check_like(grad_out, "grad_out", x, "x");
  check_like(qkv, "qkv", x, "x");
  check_like(out, "out", x, "x");
  const std::array<c10::SymInt, 3> out_shape = {s.batch, s.seq, s.model};
  check_shape(grad_out, "grad_out", out_shape, "(B, N, M)");
  check_shape(out, "out", out_shape, "(B, N, M)");
  check_shape(qkv, "qkv", {s.batch, s.seq, s.qkv_dim()}, "(B, N, (num_heads + 2 * num_kv_heads) * head_dim)");
  check_lse(lse, x, "x", {s.batch, s.heads, s.seq}, "(B, num_heads, N)");
}

int64_t decode_splits_setting() {
  const char* value = std::getenv("SELFATTN_DECODE_SPLITS");
  if (value == nullptr || *value == '\0') {
    return -1;
  }
  const std::string text(value);
  const bool digits = text.size() <= 6 && text.find_first_not_of("0123456789") == std::string::npos;
  TORCH_CHECK(digits,
              "SELFATTN_DECODE_SPLITS must be a non-negative integer below 10^6 (0: no decode path, "
              "unset: automatic), got '",
              text, "'");
  return std::stoll(text);
}

}  // namespace selfattn
