// Kernel launch: the one place that differs between the GPU build and the CPU emulation.
#pragma once

#include "common.cuh"

#include <c10/util/Exception.h>

#include <climits>

#ifndef SELFATTN_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

namespace selfattn::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// kernel<<<blocks, threads, smem_bytes, stream>>>(params), checked. Dynamic shared memory above
// 48 KB needs the kernel's opt-in first (every kernel here stays below the 99 KB that sm_86/89
// allow, so the same configurations fit every GPU from sm_80 on). No host synchronisation:
// the launch can be captured in a CUDA graph.
template <typename Params>
void launch(void (*kernel)(Params), int64_t blocks, int threads, int smem_bytes, cudaStream_t stream,
            const Params& params) {
  TORCH_CHECK(blocks <= INT_MAX, "selfattn: too many blocks for one CUDA launch (", blocks, ")");
  if (blocks == 0) {
    return;
  }
#ifdef SELFATTN_CUDA_EMULATION
  (void)stream;
  ::emu::launch(kernel, static_cast<int>(blocks), threads, smem_bytes, params);
#else
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  // clang-format reads a .cuh as C++, where <<< ... >>> is no launch: it would split the >>>.
  // clang-format off
  kernel<<<static_cast<unsigned>(blocks), threads, smem_bytes, stream>>>(params);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace selfattn::cuda
