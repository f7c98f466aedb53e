// CUDA backward of attention: dq, dk, dv from dO, recomputing P = exp(scale * q kᵀ - lse)
// tile by tile from the forward's logsumexp, never storing an Nq x Nk matrix.
//
// With S = scale * q kᵀ, P = softmax(S), out = P v and delta = rowsum(dO ∘ out):
//   dv = Pᵀ dO,   dP = dO vᵀ,   dS = P ∘ (dP - delta),   dq = scale * dS k,   dk = scale * dSᵀ q.
// With dropout (philox.h; M = keep / (1 - p), regenerated from rng_state, out = (P ∘ M) v):
//   dv = (P ∘ M)ᵀ dO,   dS = P ∘ (M ∘ dP - delta)      (delta = rowsum(dO ∘ out) still holds).
//
// Three kernels, none with atomics, so results are bitwise reproducible run to run by design
// (checked in the CPU emulation under varied thread orders; not yet run on a GPU):
//   delta (here):                  one warp per query row;
//   dk/dv (attention_bwd_dkdv.cu): a block per key block, streaming query tiles;
//   dq    (attention_bwd_dq.cu):   a block per query block, streaming key tiles.
// dq and dk/dv both recompute P and dP: about 1.4x the arithmetic of one pass, in exchange for
// every gradient element being summed by one thread in a fixed order.
#include "kernels.h"
#include "launch.cuh"

namespace selfattn::cuda {

// delta[bh * Nq + i] = sum over c of grad_out[b, h, i, c] * out[b, h, i, c], accumulated in A.
// grad_out, out: (B, Hq, Nq, Dv) T, any strides. One warp per row, 4 warps per block.
template <typename T>
__global__ void __launch_bounds__(128) attention_delta_kernel(const BackwardParams<T> p) {
  using A = acc_t<T>;
  const int64_t rows = p.batch_heads * p.nq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) {
    return;  // the whole warp: the shuffles below never see a missing lane
  }
  const int64_t bh = row / p.nq, b = bh / p.heads, h = bh % p.heads;
  const int i = static_cast<int>(row % p.nq);
  const T* do_row = p.grad_out.row(b, h, i);
  const T* out_row = p.out.row(b, h, i);
  A sum = 0;
  for (int c = lane; c < p.dim_v; c += 32) {
    sum += static_cast<A>(do_row[c * p.grad_out.stride_d]) * static_cast<A>(out_row[c * p.out.stride_d]);
  }
  sum = group_sum<32>(sum);
  if (lane == 0) {
    p.delta[row] = sum;
  }
}

template <typename T>
void launch_delta(const BackwardParams<T>& p, cudaStream_t stream) {
  launch(attention_delta_kernel<T>, ceil_div(p.batch_heads * p.nq, 4), 128, 0, stream, p);
}

template void launch_delta<float>(const BackwardParams<float>&, cudaStream_t);
template void launch_delta<c10::Half>(const BackwardParams<c10::Half>&, cudaStream_t);
template void launch_delta<c10::BFloat16>(const BackwardParams<c10::BFloat16>&, cudaStream_t);
template void launch_delta<double>(const BackwardParams<double>&, cudaStream_t);

}  // namespace selfattn::cuda
