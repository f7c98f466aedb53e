// The entry points every CPU kernel variant defines, in selfattn::SELFATTN_CPU_NS (capability.h);
// their contracts are those of the *_cpu functions of attention.h, which dispatch.cpp defines
// by calling the chosen variant's. A kernel file includes this once; dispatch.cpp once per
// variant, with SELFATTN_CPU_NS set to each name in turn, hence no include guard. A new entry
// point is declared here and added to CpuKernels in dispatch.cpp.
#include "../attention.h"

#include <string>

namespace selfattn::SELFATTN_CPU_NS {

void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                       double scale, const at::Tensor& out, const at::Tensor& lse);

void attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask, double scale,
                        const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v);

// Forward-mode derivative (attention_jvp.cpp), the contract of attention_jvp_cpu.
void attention_jvp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tangent_q,
                   const at::Tensor& tangent_k, const at::Tensor& tangent_v, const AttentionMask& mask, double scale,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out);

// The tile GEMMs bfloat16 inputs would run on now (attention_fwd.cpp; the op _bf16_tile_gemm):
// "float32" (converted blocks), "avx512bf16" (tile_bf16.h) or "onednn-brgemm (AMX)" /
// "onednn-brgemm (AVX512-BF16)" (brgemm_bf16.h).
std::string bf16_tile_gemm();

// Decoding (attention_decode.cpp): few query rows per kv head (Nq · Hq / Hk small) against a
// long cache, split over the keys. attention_forward takes this path when
// decode_path_applies(q, k). SELFATTN_DECODE_SPLITS (decode_splits_setting, checks.h) is the knob
// for tests and benchmarks. Called inside a copy only, so not in dispatch.cpp's table.
bool decode_path_applies(const at::Tensor& q, const at::Tensor& k);
void attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                      double scale, const at::Tensor& out, const at::Tensor& lse);

}  // namespace selfattn::SELFATTN_CPU_NS
