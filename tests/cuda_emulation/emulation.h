// A CPU stand-in for the CUDA execution model, just enough to run selfattn's kernels
// (csrc/cuda/*.cu compiled as C++ with SELFATTN_CUDA_EMULATION) on a machine without a GPU.
//
// Every thread of a block is a fiber (ucontext) on one OS thread; __syncthreads, __syncwarp and
// the warp shuffles are barriers between fibers. Between barriers the fibers run one at a time
// in a fresh random order each round, so a missing barrier (a read of data another thread
// writes in the same phase) shows up as a wrong or run-to-run different result. Shared memory
// starts as NaN each block (an uninitialized read poisons the result), is followed by a guard
// region that is checked after each block, and every vector access checks its alignment.
// Blocks run one after another; a deadlock (a barrier some thread never reaches) is reported.
// What this cannot show: timing, the memory model of real hardware, and GPU-only faults beyond
// the ones checked here. It is a test aid, not a simulator.
#pragma once

#ifndef SELFATTN_CUDA_EMULATION
#define SELFATTN_CUDA_EMULATION 1
#endif

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
using cudaStream_t = void*;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 thread_idx;
  uint64_t block_arrivals = 0;  // __syncthreads reached
  uint64_t warp_arrivals = 0;   // __syncwarp (or shuffle halves) reached
  bool done = false;
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr unsigned char kGuardByte = 0xA5;

struct State {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::vector<float4> smem;  // dynamic shared memory + guard
  size_t smem_bytes = 0;
  std::vector<uint64_t> exchange;  // one slot per thread, for shuffles
  uint64_t progress = 0;           // arrivals, passes and exits: a round without any is a deadlock
  std::mt19937 rng{12345};
  std::function<void()> body;
  uint64_t blocks_run = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline Fiber* current() { return state().current; }

inline void check_aligned(const void* p, size_t bytes, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "cuda emulation: misaligned %zu-byte access at %p (%s:%d)\n", bytes, p,
                 file, line);
    fail("misaligned vector access");
  }
}

inline float* dynamic_smem() { return reinterpret_cast<float*>(state().smem.data()); }

inline void yield() { swapcontext(&current()->context, &state().scheduler); }

// Waits until every live thread of the block (kWarpOnly: of the warp) has arrived here.
template <bool kWarpOnly>
inline void barrier() {
  State& s = state();
  Fiber* me = current();
  uint64_t& mine = kWarpOnly ? me->warp_arrivals : me->block_arrivals;
  const uint64_t target = ++mine;
  ++s.progress;
  const unsigned first = kWarpOnly ? me->thread_idx.x / 32 * 32 : 0;
  const unsigned last = kWarpOnly ? std::min<unsigned>(first + 32, s.block_dim.x) : s.block_dim.x;
  for (;;) {
    bool all = true;
    for (unsigned t = first; t < last && all; ++t) {
      const Fiber& f = s.fibers[t];
      all = f.done || (kWarpOnly ? f.warp_arrivals : f.block_arrivals) >= target;
    }
    if (all) {
      break;
    }
    yield();
  }
  ++s.progress;
}

template <typename T>
inline T shfl_xor(T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  State& s = state();
  const unsigned tid = current()->thread_idx.x;
  const unsigned lane = tid % 32, base = tid - lane;
  std::memcpy(&s.exchange[tid], &value, sizeof(T));
  barrier<true>();
  T result;
  std::memcpy(&result, &s.exchange[base + (lane ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  barrier<true>();
  return result;
}

inline void fiber_entry() {
  state().body();
  current()->done = true;
  ++state().progress;
  // returning resumes uc_link: the scheduler
}

// Runs kernel(params) on `blocks` blocks of `threads` threads, one block after another.
template <typename Params>
void launch(void (*kernel)(Params), int blocks, int threads, int smem_bytes, const Params& params) {
  State& s = state();
  if (threads % 32 != 0 || threads > 1024) {
    fail("block size must be a multiple of 32, at most 1024");
  }
  if (smem_bytes > 99 * 1024) {
    fail("more dynamic shared memory than sm_86/89 allow (99 KB)");
  }
  s.fibers.resize(threads);
  for (Fiber& f : s.fibers) {
    if (f.stack.empty()) {
      f.stack.resize(kStackBytes);
    }
  }
  s.exchange.assign(threads, 0);
  s.block_dim = {static_cast<unsigned>(threads), 1, 1};
  s.grid_dim = {static_cast<unsigned>(blocks), 1, 1};
  s.smem_bytes = smem_bytes;
  s.smem.resize((smem_bytes + kGuardBytes) / sizeof(float4) + 1);
  s.body = [&] { kernel(params); };
  std::vector<int> order(threads);
  for (int b = 0; b < blocks; ++b) {
    s.block_idx = {static_cast<unsigned>(b), 0, 0};
    unsigned char* smem = reinterpret_cast<unsigned char*>(s.smem.data());
    std::memset(smem, 0xFF, smem_bytes);  // NaN floats: uninitialized reads poison results
    std::memset(smem + smem_bytes, kGuardByte, kGuardBytes);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = s.fibers[t];
      f.thread_idx = {static_cast<unsigned>(t), 0, 0};
      f.block_arrivals = f.warp_arrivals = 0;
      f.done = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &s.scheduler;
      makecontext(&f.context, fiber_entry, 0);
    }
    for (int t = 0; t < threads; ++t) {
      order[t] = t;
    }
    for (;;) {
      std::shuffle(order.begin(), order.end(), s.rng);
      const uint64_t before = s.progress;
      bool all_done = true;
      for (int t : order) {
        Fiber& f = s.fibers[t];
        if (f.done) {
          continue;
        }
        s.current = &f;
        swapcontext(&s.scheduler, &f.context);
        s.current = nullptr;
        all_done = all_done && f.done;
      }
      if (all_done) {
        break;
      }
      if (s.progress == before) {
        fail("deadlock: a barrier that some threads of the block never reach");
      }
    }
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (smem[smem_bytes + i] != kGuardByte) {
        fail("write past the end of dynamic shared memory");
      }
    }
    ++s.blocks_run;
  }
}

}  // namespace emu

#define threadIdx (::emu::current()->thread_idx)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block_dim)
#define gridDim (::emu::state().grid_dim)

inline void __syncthreads() { ::emu::barrier<false>(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::barrier<true>(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return ::emu::shfl_xor(value, lane_mask);
}
