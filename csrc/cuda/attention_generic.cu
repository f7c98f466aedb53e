// CUDA attention for float64 (the dtype gradcheck uses): one warp per row, a key (or query) at
// a time, the warp's lanes splitting the head dims. Slow, but float64 throughout, and
// deterministic (no atomics; every sum in a fixed order).
#include "kernels.h"
#include "launch.cuh"
#include "score_mods.cuh"
#include "warp_rows.cuh"

namespace selfattn::cuda {

// Dropout's factor of element (b, h, i, j) in A: 1/(1 - p) in A's precision (float64 here) or 0.
template <typename A>
__device__ __forceinline__ A dropout_keep_factor(const Dropout& d, const DropoutKey& key, int64_t b, int64_t h,
                                                 int64_t i, int64_t j) {
  return dropout_keep(key.key, key.threshold, b + key.batch_offset, h, i, j) ? static_cast<A>(d.keep_scale) : A(0);
}

// Tensors as for attention_forward_kernel. Grid: ceil(B * Hq * Nq / 4) blocks of 128 threads,
// a warp per query row. Requires Nk >= 1 and D, Dv <= 256. Only the keys of the row's band are
// visited; a key the tensor mask hides (false, or -inf) is skipped; a row that sees no key gets
// output 0 and lse -inf.
template <typename T>
__global__ void __launch_bounds__(128) attention_forward_generic_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch_heads * p.nq) {
    return;  // the whole warp
  }
  const int64_t bh = row / p.nq, b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int i = static_cast<int>(row % p.nq);
  A q[kGenericPerLane], acc[kGenericPerLane];
  load_lane_elements(p.q.row(b, h, i), p.q.stride_d, p.dim, lane, q);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    acc[t] = 0;
  }
  A row_max = sink_max<A>(p.scores, h), row_sum = sink_sum<A>(p.scores);
  const bool has_mask = p.mask.present();
  const HeadMods<A> mods = head_mods<A>(p.scores, p.band.offset, b, h);
  const DropoutKey drop = dropout_key(p.dropout);
  const int k_begin = clip(p.band.first_key(i), 0, p.nk);
  const int k_end = clip(p.band.last_key(i) + 1, 0, p.nk);
  for (int j = k_begin; j < k_end; ++j) {
    const A bias = has_mask ? mask_bias<T, A>(p.mask, b, h, i, j) : A(0);
    if (bias == -INFINITY) {
      continue;  // the same in every lane of the warp
    }
    const A raw = warp_dot(q, p.k.row(b, hk, j), p.k.stride_d, p.dim, lane) * p.scale;
    const A s = (mods.active() ? mods.apply(raw, i, j) : raw) + bias;
    const A new_max = s > row_max ? s : row_max;
    const A alpha = exp(row_max - new_max);  // 0 for the first key (without a sink)
    const A prob = exp(s - new_max);
    row_sum = row_sum * alpha + prob;
    row_max = new_max;
    // Dropout: the value row weighs the kept probability (the sum above takes it undropped).
    const A weight = drop.active ? prob * dropout_keep_factor<A>(p.dropout, drop, b, h, i, j) : prob;
    const T* v_row = p.v.row(b, hk, j);
#pragma unroll
    for (int t = 0; t < kGenericPerLane; ++t) {
      const int c = lane + 32 * t;
      if (c < p.dim_v) {
        acc[t] = acc[t] * alpha + weight * static_cast<A>(v_row[c * p.v.stride_d]);
      }
    }
  }
  T* out_row = p.out.row(b, h, i);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    const int c = lane + 32 * t;
    if (c < p.dim_v) {
      out_row[c * p.out.stride_d] = static_cast<T>(row_sum > 0 ? acc[t] / row_sum : A(0));
    }
  }
  if (lane == 0) {
    p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i * p.lse_stride_n] =
        row_sum > 0 ? row_max + log(row_sum) : -INFINITY;
  }
}

// dq of one query row per warp. Grid: ceil(B * Hq * Nq / 4) blocks of 128 threads.
template <typename T>
__global__ void __launch_bounds__(128) attention_backward_dq_generic_kernel(const BackwardParams<T> p) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch_heads * p.nq) {
    return;
  }
  const int64_t bh = row / p.nq, b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int i = static_cast<int>(row % p.nq);
  A q[kGenericPerLane], grad_out[kGenericPerLane], dq[kGenericPerLane];
  load_lane_elements(p.q.row(b, h, i), p.q.stride_d, p.dim, lane, q);
  load_lane_elements(p.grad_out.row(b, h, i), p.grad_out.stride_d, p.dim_v, lane, grad_out);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    dq[t] = 0;
  }
  const A lse = backward_lse(p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i * p.lse_stride_n]);
  const A delta = p.delta[row];
  const bool has_mask = p.mask.present();
  const HeadMods<A> mods = head_mods<A>(p.scores, p.band.offset, b, h);
  const DropoutKey drop = dropout_key(p.dropout);
  const int k_begin = clip(p.band.first_key(i), 0, p.nk);
  const int k_end = clip(p.band.last_key(i) + 1, 0, p.nk);
  for (int j = k_begin; j < k_end; ++j) {
    const A bias = has_mask ? mask_bias<T, A>(p.mask, b, h, i, j) : A(0);
    if (bias == -INFINITY) {
      continue;
    }
    const T* k_row = p.k.row(b, hk, j);
    A grad = 1;  // the softcap's 1 - tanh²
    const A raw = warp_dot(q, k_row, p.k.stride_d, p.dim, lane) * p.scale;
    const A prob = exp((mods.active() ? mods.apply(raw, i, j, &grad) : raw) + bias - lse);
    const A dp = warp_dot(grad_out, p.v.row(b, hk, j), p.v.stride_d, p.dim_v, lane);
    const A keep = drop.active ? dropout_keep_factor<A>(p.dropout, drop, b, h, i, j) : A(1);
    const A ds = prob * (keep * dp - delta) * grad;  // dS = P ∘ (M ∘ dP - delta) ∘ (1 - tanh²)
#pragma unroll
    for (int t = 0; t < kGenericPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < p.dim) {
        dq[t] += ds * static_cast<A>(k_row[d * p.k.stride_d]);
      }
    }
  }
  T* dq_row = p.grad_q.row(b, h, i);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < p.dim) {
      dq_row[d * p.grad_q.stride_d] = static_cast<T>(dq[t] * p.scale);
    }
  }
}

// dk and dv of one key row of one kv head per warp, summed over the group's query heads in
// order (g = 0 .. G-1), each over the queries of the key's band. Grid: ceil(B * Hk * Nk / 4)
// blocks of 128 threads.
template <typename T>
__global__ void __launch_bounds__(128) attention_backward_dkdv_generic_kernel(const BackwardParams<T> p) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch_heads / p.group * p.nk) {
    return;
  }
  const int64_t bhk = row / p.nk, b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int j = static_cast<int>(row % p.nk);
  A k[kGenericPerLane], v[kGenericPerLane], dk[kGenericPerLane], dv[kGenericPerLane];
  load_lane_elements(p.k.row(b, hk, j), p.k.stride_d, p.dim, lane, k);
  load_lane_elements(p.v.row(b, hk, j), p.v.stride_d, p.dim_v, lane, v);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    dk[t] = 0;
    dv[t] = 0;
  }
  const bool has_mask = p.mask.present();
  const DropoutKey drop = dropout_key(p.dropout);
  const int i_begin = clip(p.band.first_query(j), 0, p.nq);
  const int i_end = clip(p.band.last_query(j + 1) + 1, 0, p.nq);
  for (int g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g, bh = b * p.heads + h;
    const HeadMods<A> mods = head_mods<A>(p.scores, p.band.offset, b, h);
    for (int i = i_begin; i < i_end; ++i) {
      const A bias = has_mask ? mask_bias<T, A>(p.mask, b, h, i, j) : A(0);
      if (bias == -INFINITY) {
        continue;
      }
      const T* q_row = p.q.row(b, h, i);
      const T* do_row = p.grad_out.row(b, h, i);
      const A lse = backward_lse(p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i * p.lse_stride_n]);
      A grad = 1;  // the softcap's 1 - tanh²
      const A raw = warp_dot(k, q_row, p.q.stride_d, p.dim, lane) * p.scale;
      const A prob = exp((mods.active() ? mods.apply(raw, i, j, &grad) : raw) + bias - lse);
      const A dp = warp_dot(v, do_row, p.grad_out.stride_d, p.dim_v, lane);
      const A keep = drop.active ? dropout_keep_factor<A>(p.dropout, drop, b, h, i, j) : A(1);
      // dS = P ∘ (M ∘ dP - delta) ∘ (1 - tanh²); dv takes P ∘ M.
      const A ds = prob * (keep * dp - p.delta[bh * p.nq + i]) * grad;
      const A kept = prob * keep;
#pragma unroll
      for (int t = 0; t < kGenericPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < p.dim) {
          dk[t] += ds * static_cast<A>(q_row[d * p.q.stride_d]);
        }
        if (d < p.dim_v) {
          dv[t] += kept * static_cast<A>(do_row[d * p.grad_out.stride_d]);
        }
      }
    }
  }
  T* dk_row = p.grad_k.row(b, hk, j);
  T* dv_row = p.grad_v.row(b, hk, j);
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < p.dim) {
      dk_row[d * p.grad_k.stride_d] = static_cast<T>(dk[t] * p.scale);
    }
    if (d < p.dim_v) {
      dv_row[d * p.grad_v.stride_d] = static_cast<T>(dv[t]);
    }
  }
}

template <typename T>
void forward_generic(const ForwardParams<T>& p, cudaStream_t stream) {
  launch(attention_forward_generic_kernel<T>, ceil_div(p.batch_heads * p.nq, 4), 128, 0, stream, p);
}

// dq, dk and dv; delta must be written already.
template <typename T>
void backward_generic(const BackwardParams<T>& p, cudaStream_t stream) {
  launch(attention_backward_dq_generic_kernel<T>, ceil_div(p.batch_heads * p.nq, 4), 128, 0, stream, p);
  launch(attention_backward_dkdv_generic_kernel<T>, ceil_div(p.batch_heads / p.group * p.nk, 4), 128, 0, stream, p);
}

template void forward_generic<double>(const ForwardParams<double>&, cudaStream_t);
template void backward_generic<double>(const BackwardParams<double>&, cudaStream_t);

}  // namespace selfattn::cuda
