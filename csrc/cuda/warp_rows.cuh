// The warp-per-row pieces of the generic kernels (attention_generic.cu, attention_jvp.cu): a row's
// head-dim elements spread over the warp's lanes, lane + 32t for t < kGenericPerLane.
#pragma once

#include "common.cuh"

namespace selfattn::cuda {

constexpr int kGenericPerLane = 8;  // head-dim elements per lane: D, Dv <= 32 * 8 = 256

// The lane's elements lane + 32t of a row (zero at and past dim).
template <typename T, typename A>
__device__ __forceinline__ void load_lane_elements(const T* row, int64_t stride_d, int dim, int lane,
                                                   A (&x)[kGenericPerLane]) {
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    const int d = lane + 32 * t;
    x[t] = d < dim ? static_cast<A>(row[d * stride_d]) : A(0);
  }
}

// sum over d < dim of x[d] * row[d], the whole warp's lanes together (all lanes get it).
template <typename T, typename A>
__device__ __forceinline__ A warp_dot(const A (&x)[kGenericPerLane], const T* row, int64_t stride_d, int dim,
                                      int lane) {
  A dot = 0;
#pragma unroll
  for (int t = 0; t < kGenericPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < dim) {
      dot += x[t] * static_cast<A>(row[d * stride_d]);
    }
  }
  return group_sum<32>(dot);
}

}  // namespace selfattn::cuda
