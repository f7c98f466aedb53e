// The CUDA attention entry points (attention.h): device guard and stream, the cases with nothing
// to compute, kernel arguments from tensors, scratch allocation, and the choice of kernel by
// dtype. Host C++ only; the kernels and their launchers are in the .cu files next to this one
// (kernels.h lists them).
//
// Every kernel takes the whole mask description (attention.h's AttentionMask: the band of mask.h,
// at most one strided tensor mask, the score modifications softcap / ALiBi / sinks of
// score_mods.cuh) and grouped-query attention (Hk dividing Hq).
//
//   forward:  half / bfloat16, D = Dv = 64 or 128, aligned layouts
//                                           -> forward_tc (tensor cores)
//             other float / half / bfloat16 -> forward_tiled      (attention_fwd.cu)
//             double                        -> forward_generic    (attention_generic.cu)
//   backward: half / bfloat16 as above      -> backward_tc (dq and delta, then dk and dv)
//             other float / half / bfloat16 -> delta = rowsum(dO ∘ out) (attention_bwd.cu), then
//                                              backward_dkdv_tiled, backward_dq_tiled
//             double                        -> delta, then backward_generic
//   jvp:      every dtype                   -> jvp_generic        (attention_jvp.cu)
// Decoding comes first: a forward without dropout with Nq <= 16 and Nq * Hq / Hk <= 64 (float64:
// also D, Dv <= 128, for shared memory) -> forward_decode (attention_decode.cu, split-K), unless
// SELFATTN_DECODE_SPLITS=0; SELFATTN_DECODE_SPLITS=S > 0 forces S splits (read per call, as on
// the CPU).
// SELFATTN_TENSOR_CORES=0 in the environment turns the tensor-core kernels off (read once), for
// comparisons; they also need an sm_80 or newer GPU.
//
// Status: the kernels of csrc/cuda/ are compiled for sm_80/sm_90 and tested in the CPU emulation
// (tests/cuda_emulation/, tests/test_cuda_emulation.py); none has run on a GPU yet.
#include "kernels.h"
#include "../attention.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>

#ifndef SELFATTN_CUDA_EMULATION
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace selfattn::cuda {
namespace {

template <typename T>
Strided4<T> strided4(const at::Tensor& t) {
  Strided4<T> s;
  s.data = static_cast<T*>(const_cast<void*>(t.data_ptr()));
  s.stride_b = t.stride(0);
  s.stride_h = t.stride(1);
  s.stride_n = t.stride(2);
  s.stride_d = t.stride(3);
  // The kernels' 4-element vector accesses need this (see Strided4::vec4); views that break it
  // (odd head dims, sliced last dims, offsets) take the element-wise path instead of a copy.
  bool vec4 = t.size(3) < 4 || t.stride(3) == 1;
  for (int d = 0; d < 3; ++d) {
    vec4 = vec4 && (t.size(d) <= 1 || t.stride(d) % 4 == 0);
  }
  s.vec4 = vec4 && reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * sizeof(T)) == 0;
  return s;
}

// What the CUDA kernels support beyond the ops' own checks: head dims up to 256 (a lane's share
// of a row lives in registers) and sequence lengths that fit an int.
void check_sizes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.size(3) <= 256 && v.size(3) <= 256,
                    "selfattn: the CUDA kernels support head dims up to 256, got D = ", q.size(3),
                    " and Dv = ", v.size(3));
  TORCH_CHECK_VALUE(q.size(2) < INT_MAX && k.size(2) < INT_MAX,
                    "selfattn: sequence lengths must be below 2^31 on CUDA, got Nq = ", q.size(2),
                    " and Nk = ", k.size(2));
}

// What the tensor-core kernels need of a tensor's layout (kernels.h): unit stride along D, the
// other strides (of dims longer than 1) multiples of 8 elements, a 16-byte aligned base. The
// fused op's strided views into its packed (B, N, 3, H, D) buffer qualify.
bool tc_layout(const at::Tensor& t) {
  if (t.stride(3) != 1) {
    return false;
  }
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) {
      return false;
    }
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

bool tensor_cores_enabled(const at::Tensor& q) {
  static const bool enabled = [] {
    const char* value = std::getenv("SELFATTN_TENSOR_CORES");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
#ifdef SELFATTN_CUDA_EMULATION
  (void)q;
  return enabled;
#else
  return enabled && at::cuda::getDeviceProperties(q.get_device())->major >= 8;
#endif
}

// The head dim of the tensor-core kernels for these tensors, or 0 where they do not apply (the
// tiled kernels serve those). The forward keeps raw-score maxima, so it needs scale > 0. The
// tensor-core kernels take every mask (band, tensor mask of any strides) and grouped-query
// attention; only q, k, v, out and the gradients need their aligned layouts.
// `tensors`: every tensor the kernels read or write but the tensor mask (read element by element).
int tc_head_dim(const at::Tensor& q, const at::Tensor& v, double scale,
                std::initializer_list<const at::Tensor*> tensors) {
  const int64_t dim = q.size(3);
  if ((q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) || (dim != 64 && dim != 128) ||
      v.size(3) != dim || !(static_cast<float>(scale) > 0.f && std::isfinite(static_cast<float>(scale)))) {
    return 0;
  }
  for (const at::Tensor* t : tensors) {
    if (!tc_layout(*t)) {
      return 0;
    }
  }
  return tensor_cores_enabled(q) ? static_cast<int>(dim) : 0;
}

// The tensor mask as the kernels read it: (B, Hq, Nq, Nk) through its strides.
TensorMask tensor_mask(const at::Tensor& t) {
  TensorMask m;
  if (!t.defined()) {
    return m;
  }
  TORCH_CHECK(t.dim() == 4, "selfattn: internal error: the tensor mask must be a 4-D view");
  m.data = t.data_ptr();
  m.stride_b = t.size(0) > 1 ? t.stride(0) : 0;
  m.stride_h = t.size(1) > 1 ? t.stride(1) : 0;
  m.stride_q = t.size(2) > 1 ? t.stride(2) : 0;
  m.stride_k = t.size(3) > 1 ? t.stride(3) : 0;
  m.kind = t.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
  m.float32 = t.scalar_type() == at::kFloat;
  return m;
}

// The decode kernels serve few query rows per kv head; the tiled and tensor-core kernels the rest.
// Nq <= 16 rather than the CPU's Nq * group <= 64 alone: beyond a few queries the ordinary
// kernels' query blocks are no longer mostly padding (to be measured on a GPU).
bool use_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask) {
  const int64_t nq = q.size(2), rows = nq * (q.size(1) / k.size(1));
  const bool fits = q.scalar_type() != at::kDouble || std::max(q.size(3), v.size(3)) <= 128;
  return !mask.dropout.active() && nq <= kDecodeMaxQueries && rows <= kDecodeMaxRows && fits &&
         decode_splits_setting() != 0;
}

int sm_count(const at::Tensor& q) {
#ifdef SELFATTN_CUDA_EMULATION
  (void)q;
  return 108;  // an A100's, so that the emulation tests see the automatic choice of splits
#else
  return at::cuda::getDeviceProperties(q.get_device())->multiProcessorCount;
#endif
}

// The fields ForwardParams and BackwardParams share: inputs, lse strides, sizes, scale, mask.
template <typename T, typename Params>
void set_shared_params(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                       const AttentionMask& mask, double scale) {
  p.q = strided4<const T>(q);
  p.k = strided4<const T>(k);
  p.v = strided4<const T>(v);
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.lse_stride_n = lse.stride(2);
  p.heads = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.group = p.heads / p.heads_kv;  // the caller returns early where Hk = 0 (then Hq = 0 too)
  p.nq = static_cast<int>(q.size(2));
  p.nk = static_cast<int>(k.size(2));
  p.dim = static_cast<int>(q.size(3));
  p.dim_v = static_cast<int>(v.size(3));
  p.batch_heads = q.size(0) * q.size(1);
  p.row_blocks = 0;
  p.scale = static_cast<acc_t<T>>(scale);
  p.band = mask.band;
  p.mask = tensor_mask(mask.tensor);
  p.scores = mask.scores;  // alibi_slopes and sinks point into device tensors the mask holds
  p.dropout = mask.dropout;  // rng_state stays on the device: the kernels read it there
}

template <typename T>
ForwardParams<T> forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const AttentionMask& mask, double scale, const at::Tensor& out, const at::Tensor& lse) {
  ForwardParams<T> p;
  set_shared_params<T>(p, q, k, v, lse, mask, scale);
  p.out = strided4<T>(out);
  p.lse = static_cast<acc_t<T>*>(lse.data_ptr());
  return p;
}

template <typename T>
BackwardParams<T> backward_params(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                  const AttentionMask& mask, double scale, const at::Tensor& grad_q,
                                  const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& delta) {
  BackwardParams<T> p;
  set_shared_params<T>(p, q, k, v, lse, mask, scale);
  p.grad_out = strided4<const T>(grad_out);
  p.out = strided4<const T>(out);
  p.grad_q = strided4<T>(grad_q);
  p.grad_k = strided4<T>(grad_k);
  p.grad_v = strided4<T>(grad_v);
  p.lse = static_cast<const acc_t<T>*>(lse.data_ptr());
  p.delta = static_cast<acc_t<T>*>(delta.data_ptr());
  return p;
}

template <typename T>
void backward_tiled(const BackwardParams<T>& p, cudaStream_t stream) {
  launch_delta(p, stream);
  backward_dkdv_tiled(p, stream);
  backward_dq_tiled(p, stream);
}

// half / bfloat16: the tensor-core kernels at tc_dim = 64 or 128, else the tiled ones.
template <typename T>
void forward_reduced(const ForwardParams<T>& p, int tc_dim, cudaStream_t stream) {
  if (tc_dim == 64) {
    return forward_tc<T, 64>(p, stream);
  }
  if (tc_dim == 128) {
    return forward_tc<T, 128>(p, stream);
  }
  forward_tiled(p, stream);
}

template <typename T>
void backward_reduced(const BackwardParams<T>& p, int tc_dim, cudaStream_t stream) {
  if (tc_dim == 64) {
    return backward_tc<T, 64>(p, stream);
  }
  if (tc_dim == 128) {
    return backward_tc<T, 128>(p, stream);
  }
  backward_tiled(p, stream);
}

template <typename T>
JvpParams<T> jvp_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tangent_q,
                        const at::Tensor& tangent_k, const at::Tensor& tangent_v, const AttentionMask& mask,
                        double scale, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out) {
  JvpParams<T> p;
  set_shared_params<T>(p, q, k, v, lse, mask, scale);
  p.out = strided4<T>(out);
  p.lse = static_cast<acc_t<T>*>(lse.data_ptr());
  // An absent tangent is zero: the kernel never reads its view (its primal's stands in).
  p.has_tangent_q = tangent_q.defined();
  p.has_tangent_k = tangent_k.defined();
  p.has_tangent_v = tangent_v.defined();
  p.tangent_q = strided4<const T>(p.has_tangent_q ? tangent_q : q);
  p.tangent_k = strided4<const T>(p.has_tangent_k ? tangent_k : k);
  p.tangent_v = strided4<const T>(p.has_tangent_v ? tangent_v : v);
  p.tangent_out = strided4<T>(tangent_out);
  return p;
}

// The split-K decoding forward: its plan, then scratch for the splits' rows when S > 1 (on the
// current stream, so the caching allocator reuses it safely).
template <typename T>
void run_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask, double scale,
                const at::Tensor& out, const at::Tensor& lse, cudaStream_t stream) {
  DecodeParams<T> p;
  static_cast<ForwardParams<T>&>(p) = forward_params<T>(q, k, v, mask, scale, out, lse);
  plan_decode(p, static_cast<int>(q.size(0)), sm_count(q), std::max<int64_t>(decode_splits_setting(), 0));
  at::Tensor part_out, part_lse;
  p.part_out = p.part_lse = nullptr;
  if (p.splits > 1) {
    const int64_t parts = q.size(0) * k.size(1) * p.splits * p.rows;
    const auto options = q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    part_out = at::empty({parts * p.dim_v}, options);
    part_lse = at::empty({parts}, options);
    p.part_out = static_cast<acc_t<T>*>(part_out.data_ptr());
    p.part_lse = static_cast<acc_t<T>*>(part_lse.data_ptr());
  }
  forward_decode(p, stream);
}

}  // namespace

// Shapes as in attention.h; the caller has checked them and allocated the outputs.
void run_jvp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tangent_q,
             const at::Tensor& tangent_k, const at::Tensor& tangent_v, const AttentionMask& mask, double scale,
             const at::Tensor& out, const at::Tensor& lse, const at::Tensor& tangent_out, cudaStream_t stream) {
  if (q.size(0) * q.size(1) == 0 || q.size(2) == 0) {
    return;
  }
  if (k.size(2) == 0) {  // no key to attend to: an empty sum, and its tangent
    write_empty_rows(mask, out, lse);
    tangent_out.zero_();
    return;
  }
  check_sizes(q, k, v);
  const auto params = [&](auto type_tag) {
    using T = decltype(type_tag);
    return jvp_params<T>(q, k, v, tangent_q, tangent_k, tangent_v, mask, scale, out, lse, tangent_out);
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      return jvp_generic(params(float()), stream);
    case at::kHalf:
      return jvp_generic(params(c10::Half()), stream);
    case at::kBFloat16:
      return jvp_generic(params(c10::BFloat16()), stream);
    case at::kDouble:
      return jvp_generic(params(double()), stream);
    default:
      TORCH_CHECK(false, "selfattn: no CUDA attention kernel for ", q.scalar_type());
  }
}

// Shapes as in attention.h; the caller has checked them and allocated out and lse.
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask, double scale,
                 const at::Tensor& out, const at::Tensor& lse, cudaStream_t stream) {
  if (q.size(0) * q.size(1) == 0 || q.size(2) == 0) {
    return;
  }
  if (k.size(2) == 0) {  // no key to attend to: an empty sum
    write_empty_rows(mask, out, lse);
    return;
  }
  check_sizes(q, k, v);
  if (use_decode(q, k, v, mask)) {
    switch (q.scalar_type()) {
      case at::kFloat:
        return run_decode<float>(q, k, v, mask, scale, out, lse, stream);
      case at::kHalf:
        return run_decode<c10::Half>(q, k, v, mask, scale, out, lse, stream);
      case at::kBFloat16:
        return run_decode<c10::BFloat16>(q, k, v, mask, scale, out, lse, stream);
      case at::kDouble:
        return run_decode<double>(q, k, v, mask, scale, out, lse, stream);
      default:
        break;  // the message below
    }
  }
  const int tc_dim = tc_head_dim(q, v, scale, {&q, &k, &v, &out});
  switch (q.scalar_type()) {
    case at::kFloat:
      return forward_tiled(forward_params<float>(q, k, v, mask, scale, out, lse), stream);
    case at::kHalf:
      return forward_reduced(forward_params<c10::Half>(q, k, v, mask, scale, out, lse), tc_dim, stream);
    case at::kBFloat16:
      return forward_reduced(forward_params<c10::BFloat16>(q, k, v, mask, scale, out, lse), tc_dim, stream);
    case at::kDouble:
      return forward_generic(forward_params<double>(q, k, v, mask, scale, out, lse), stream);
    default:
      TORCH_CHECK(false, "selfattn: no CUDA attention kernel for ", q.scalar_type());
  }
}

// Shapes as in attention.h; the caller has checked them and allocated the gradients.
void run_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask, double scale,
                  const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v, cudaStream_t stream) {
  if (q.size(0) * q.size(1) == 0) {  // no query head (Hq = 0 allows any Hk): k and v unused
    grad_k.zero_();
    grad_v.zero_();
    return;
  }
  if (q.size(2) == 0 || k.size(2) == 0) {  // nothing attends to anything: every gradient is zero
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return;
  }
  check_sizes(q, k, v);
  const at::ScalarType acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Scratch for rowsum(dO ∘ out), read by both gradient kernels; on the current stream, so the
  // caching allocator reuses it safely.
  const at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_type));
  const auto params = [&](auto type_tag) {
    using T = decltype(type_tag);
    return backward_params<T>(grad_out, q, k, v, out, lse, mask, scale, grad_q, grad_k, grad_v, delta);
  };
  const int tc_dim = tc_head_dim(q, v, scale, {&q, &k, &v, &out, &grad_out, &grad_q, &grad_k, &grad_v});
  switch (q.scalar_type()) {
    case at::kFloat:
      return backward_tiled(params(float()), stream);
    case at::kHalf:
      return backward_reduced(params(c10::Half()), tc_dim, stream);
    case at::kBFloat16:
      return backward_reduced(params(c10::BFloat16()), tc_dim, stream);
    case at::kDouble: {
      const BackwardParams<double> p = params(double());
      launch_delta(p, stream);
      return backward_generic(p, stream);
    }
    default:
      TORCH_CHECK(false, "selfattn: no CUDA attention kernel for ", q.scalar_type());
  }
}

}  // namespace selfattn::cuda

#ifndef SELFATTN_CUDA_EMULATION
void selfattn::attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const AttentionMask& mask, double scale, const at::Tensor& out,
                                      const at::Tensor& lse) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  cuda::run_forward(q, k, v, mask, scale, out, lse, c10::cuda::getCurrentCUDAStream());
}

void selfattn::attention_jvp_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& tangent_q, const at::Tensor& tangent_k, const at::Tensor& tangent_v,
                                  const AttentionMask& mask, double scale, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& tangent_out) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  cuda::run_jvp(q, k, v, tangent_q, tangent_k, tangent_v, mask, scale, out, lse, tangent_out,
                c10::cuda::getCurrentCUDAStream());
}

void selfattn::attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                       const AttentionMask& mask, double scale, const at::Tensor& grad_q,
                                       const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  cuda::run_backward(grad_out, q, k, v, out, lse, mask, scale, grad_q, grad_k, grad_v,
                     c10::cuda::getCurrentCUDAStream());
}
#endif
