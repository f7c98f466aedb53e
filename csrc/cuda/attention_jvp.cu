// CUDA forward-mode derivative of attention (attention_jvp): out, lse and tangent_out in one pass.
//
// With S = mods(scale·q kᵀ) (+ mask), P = softmax(S) and dS = mods'·scale·(dq kᵀ + q dkᵀ) (mods:
// softcap and ALiBi, score_mods.cuh; mods' = 1 − tanh² under softcap, else 1):
//   tangent_out = P·dv + (P ∘ (dS − rowsum(P ∘ dS)))·v = (acc_t − s_t·out) / l,
// where per query row l = Σ p, acc_t = Σ p·(dv + ds·v), s_t = Σ p·ds (p = exp(s − max)); the
// online softmax rescales them with the output's acc when the max moves (as csrc/cpu/attention_jvp.cpp).
// One warp per query row, a key at a time, the lanes splitting the head dims (attention_generic.cu's
// scheme): every dtype, accumulated in acc_t<T> (float, double for double), every mask; no Nq x Nk
// matrix, no atomics, deterministic. A row that sees no key: out 0, tangent 0, lse -inf (sink(h)
// with sinks, which start each row's max and sum; their tangent is added outside: add_sinks_tangent).
#include "kernels.h"
#include "launch.cuh"
#include "score_mods.cuh"
#include "warp_rows.cuh"

namespace selfattn::cuda {

// Grid: ceil(B * Hq * Nq / 4) blocks of 128 threads. Requires Nk >= 1 and D, Dv <= 256.
template <typename T>
__global__ void __launch_bounds__(128) attention_jvp_generic_kernel(const JvpParams<T> p) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch_heads * p.nq) {
    return;  // the whole warp
  }
  const int64_t bh = row / p.nq, b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int i = static_cast<int>(row % p.nq);
  A q[kGenericPerLane], tq[kGenericPerLane], acc[kGenericPerLane], acc_t[kGenericPerLane];
  load_lane_elements(p.q.row(b, h, i), p.q.stride_d, p.dim, lane, q);
  load_lane_elements(p.tangent_q.row(b, h, i), p.tangent_q.stride_d, p.has_tangent_q ? p.dim : 0, lane, tq);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    acc[t] = 0;
    acc_t[t] = 0;
  }
  // A sink starts the row (its tangent is added outside the kernel: add_sinks_tangent).
  A row_max = sink_max<A>(p.scores, h), row_sum = sink_sum<A>(p.scores), row_ds = 0;
  const bool has_mask = p.mask.present();
  const HeadMods<A> mods = head_mods<A>(p.scores, p.band.offset, b, h);
  const int k_begin = clip(p.band.first_key(i), 0, p.nk);
  const int k_end = clip(p.band.last_key(i) + 1, 0, p.nk);
  for (int j = k_begin; j < k_end; ++j) {
    const A bias = has_mask ? mask_bias<T, A>(p.mask, b, h, i, j) : A(0);
    if (bias == -INFINITY) {
      continue;  // the same in every lane of the warp
    }
    const T* k_row = p.k.row(b, hk, j);
    A grad = 1;  // the softcap's 1 - tanh², on the score's tangent
    const A raw = warp_dot(q, k_row, p.k.stride_d, p.dim, lane) * p.scale;
    const A s = (mods.active() ? mods.apply(raw, i, j, &grad) : raw) + bias;
    A ds = 0;
    if (p.has_tangent_q) {
      ds += warp_dot(tq, k_row, p.k.stride_d, p.dim, lane);
    }
    if (p.has_tangent_k) {
      ds += warp_dot(q, p.tangent_k.row(b, hk, j), p.tangent_k.stride_d, p.dim, lane);
    }
    ds *= p.scale * grad;
    const A new_max = s > row_max ? s : row_max;
    const A alpha = exp(row_max - new_max);  // 0 for the first key
    const A prob = exp(s - new_max);
    row_sum = row_sum * alpha + prob;
    row_ds = row_ds * alpha + prob * ds;
    row_max = new_max;
    const T* v_row = p.v.row(b, hk, j);
    const T* tv_row = p.tangent_v.row(b, hk, j);
#pragma unroll
    for (int t = 0; t < kGenericPerLane; ++t) {
      const int c = lane + 32 * t;
      if (c < p.dim_v) {
        const A value = static_cast<A>(v_row[c * p.v.stride_d]);
        const A tangent = p.has_tangent_v ? static_cast<A>(tv_row[c * p.tangent_v.stride_d]) : A(0);
        acc[t] = acc[t] * alpha + prob * value;
        acc_t[t] = acc_t[t] * alpha + prob * (tangent + ds * value);
      }
    }
  }
  const A inv_sum = row_sum > 0 ? A(1) / row_sum : A(0);
  const A mean_ds = row_ds * inv_sum;
  T* out_row = p.out.row(b, h, i);
  T* tangent_row = p.tangent_out.row(b, h, i);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    const int c = lane + 32 * t;
    if (c < p.dim_v) {
      const A o = acc[t] * inv_sum;  // the tangent takes out before its rounding to T
      out_row[c * p.out.stride_d] = static_cast<T>(o);
      tangent_row[c * p.tangent_out.stride_d] = static_cast<T>(acc_t[t] * inv_sum - mean_ds * o);
    }
  }
  if (lane == 0) {
    p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i * p.lse_stride_n] =
        row_sum > 0 ? row_max + log(row_sum) : -INFINITY;
  }
}

template <typename T>
void jvp_generic(const JvpParams<T>& p, cudaStream_t stream) {
  launch(attention_jvp_generic_kernel<T>, ceil_div(p.batch_heads * p.nq, 4), 128, 0, stream, p);
}

template void jvp_generic<float>(const JvpParams<float>&, cudaStream_t);
template void jvp_generic<double>(const JvpParams<double>&, cudaStream_t);
template void jvp_generic<c10::Half>(const JvpParams<c10::Half>&, cudaStream_t);
template void jvp_generic<c10::BFloat16>(const JvpParams<c10::BFloat16>&, cudaStream_t);

}  // namespace selfattn::cuda
