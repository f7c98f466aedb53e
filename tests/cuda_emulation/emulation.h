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
//
// The tensor-core instructions (csrc/cuda/mma.cuh) are warp collectives here: each lane deposits
// its operands, the warp meets at a barrier, and each lane assembles its result from the others'
// deposits by the fragment layouts of the PTX ISA (cited at each function below), so a kernel
// that assumes a wrong layout computes wrong numbers. Every lane of the warp must execute the
// same collective (the PTX .sync.aligned rule); ldmatrix reads must lie inside the dynamic shared
// memory, and its bank conflicts are counted. cp.async copies land either at once or only at the
// cp.async.wait_group that covers them (chosen at random per copy), so both a read before the
// wait and an overwrite of a buffer that other threads still read show up.
#pragma once

#ifndef SELFATTN_CUDA_EMULATION
#define SELFATTN_CUDA_EMULATION 1
#endif

#include <ucontext.h>

#include <c10/util/Half.h>

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

// A cp.async copy that has not landed yet.
struct PendingCopy {
  char* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled
  int64_t group;         // the commit group it belongs to (the thread's count of commits so far)
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 thread_idx;
  uint64_t block_arrivals = 0;  // __syncthreads reached
  uint64_t warp_arrivals = 0;   // __syncwarp (or shuffle halves) reached
  uint64_t collectives = 0;     // warp collectives (mma, ldmatrix) executed
  int64_t groups_committed = 0;
  std::vector<PendingCopy> copies;
  bool done = false;
};

// One lane's deposit for a warp collective.
struct CollectiveSlot {
  int kind;
  uintptr_t address;
  uint32_t data[8];
};

// What the tensor-core instructions did (and which forward ran), for the tests.
struct Counters {
  uint64_t mma = 0, ldmatrix = 0, cp_async = 0;
  uint64_t ldmatrix_phases = 0;         // 8-row phases (one per 8 x 8 matrix) read
  uint64_t ldmatrix_extra_wavefronts = 0;  // bank-conflict replays over all phases
  uint64_t decode_launches = 0;  // forward_decode calls (attention_decode.cu)
  uint64_t decode_splits = 0;    // the S of the latest one
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
  std::vector<CollectiveSlot> collective[2];  // per thread; alternate collectives alternate buffers
  Counters counters;
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
    std::fprintf(stderr, "cuda emulation: misaligned %zu-byte access at %p (%s:%d)\n", bytes, p, file, line);
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

// ---------------------------------------------------------------------------------------------
// Tensor-core instructions

enum CollectiveKind { kLdmatrixX4 = 1, kLdmatrixX4Trans, kMmaF16, kMmaBf16 };

inline bool in_shared(const void* p, size_t bytes) {
  const char* base = reinterpret_cast<const char*>(state().smem.data());
  const char* c = static_cast<const char*>(p);
  return c >= base && c + bytes <= base + state().smem_bytes;
}

inline void check_shared(const void* p, size_t bytes, const char* what) {
  if (!in_shared(p, bytes)) {
    std::fprintf(stderr, "cuda emulation: %s at %p is outside the block's dynamic shared memory\n", what, p);
    fail("shared-memory access out of bounds");
  }
  check_aligned(p, bytes, what, 0);
}

// Deposits this lane's operands, waits for the warp, checks that all 32 lanes are here with the
// same instruction, and returns the warp's 32 deposits (valid until the warp's next collective
// but one: deposits alternate between two buffers, so one barrier per collective suffices).
inline const CollectiveSlot* warp_collective(int kind, uintptr_t address, const uint32_t* data, int words) {
  State& s = state();
  Fiber* me = current();
  const unsigned tid = me->thread_idx.x, base = tid - tid % 32;
  if (base + 32 > s.block_dim.x) {
    fail("warp collective in a partial warp");
  }
  std::vector<CollectiveSlot>& slots = s.collective[me->collectives++ & 1];
  slots[tid].kind = kind;
  slots[tid].address = address;
  std::memcpy(slots[tid].data, data, sizeof(uint32_t) * words);
  barrier<true>();
  for (unsigned l = base; l < base + 32; ++l) {
    if (s.fibers[l].done) {
      fail("warp collective (.sync.aligned) after a lane of the warp has exited");
    }
    if (slots[l].kind != kind) {
      fail("the lanes of a warp executed different warp collectives (divergent .aligned instruction)");
    }
  }
  return &slots[base];
}

inline uint16_t half_of(uint32_t reg, int i) { return static_cast<uint16_t>(i ? reg >> 16 : reg & 0xffffu); }

inline float to_float16(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t word = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &word, sizeof(f));
    return f;
  }
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// Extra wavefronts of one 8-row phase of ldmatrix: the 8 rows of 16 bytes as 32 banks of 4
// bytes; distinct words in one bank are served one after another.
inline int bank_replays(const CollectiveSlot* rows) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(state().smem.data());
  uintptr_t words[32][8];
  int count[32] = {};
  int worst = 1;
  for (int r = 0; r < 8; ++r) {
    for (int w = 0; w < 4; ++w) {
      const uintptr_t word = (rows[r].address - base) / 4 + w;
      const int bank = static_cast<int>(word % 32);
      bool seen = false;
      for (int i = 0; i < count[bank]; ++i) {
        seen = seen || words[bank][i] == word;
      }
      if (!seen) {
        words[bank][count[bank]++] = word;
        worst = std::max(worst, count[bank]);
      }
    }
  }
  return worst - 1;
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (PTX ISA, "Warp-level matrix load instruction:
// ldmatrix"): lanes 8m .. 8m+7 hold the addresses of rows 0..7 of matrix m; "each thread in a warp
// loads fragments of a row, with thread 0 receiving the first fragment in its register r, and so
// on. A group of four threads loads an entire row" -- lane l receives, in register m, elements
// 2 (l % 4) and 2 (l % 4) + 1 of row l / 4 of matrix m (the lower-indexed element in the low 16
// bits). ".trans indicates that the matrix is loaded in column-major format": the rows given by
// the addresses are the matrix's columns, so lane l receives element l / 4 of the rows
// 2 (l % 4) and 2 (l % 4) + 1.
inline void ldmatrix_x4(bool trans, uint32_t (&r)[4], const void* row) {
  check_shared(row, 16, "ldmatrix row address");
  uint32_t data[4];
  std::memcpy(data, row, 16);  // this lane's row: 8 elements of 16 bits
  const CollectiveSlot* lanes =
      warp_collective(trans ? kLdmatrixX4Trans : kLdmatrixX4, reinterpret_cast<uintptr_t>(row), data, 4);
  const unsigned lane = current()->thread_idx.x % 32;
  const auto element = [&](unsigned provider, unsigned i) {  // element i of lane provider's row
    return half_of(lanes[provider].data[i / 2], static_cast<int>(i % 2));
  };
  for (unsigned m = 0; m < 4; ++m) {
    uint16_t e[2];
    for (unsigned k = 0; k < 2; ++k) {
      e[k] = trans ? element(8 * m + 2 * (lane % 4) + k, lane / 4) : element(8 * m + lane / 4, 2 * (lane % 4) + k);
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  if (lane == 0) {
    Counters& c = state().counters;
    ++c.ldmatrix;
    for (unsigned m = 0; m < 4; ++m) {
      c.ldmatrix_phases += 1;
      c.ldmatrix_extra_wavefronts += bank_replays(lanes + 8 * m);
    }
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 d, a, b, d (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"), groupID = lane >> 2,
// threadID_in_group = lane % 4, each .f16x2 register holding two elements, low to high:
//   A (a0..a7 in four registers): row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, else
//     groupID + 8; col = threadID_in_group * 2 + (i & 1), + 8 for i >= 4.
//   B (b0..b3 in two registers): row = threadID_in_group * 2 + (i & 1), + 8 for i >= 2;
//     col = groupID.
//   C, D (c0..c3, f32): row = groupID for i < 2, else groupID + 8;
//     col = threadID_in_group * 2 + (i & 1).
// The products are summed in float in k order (the hardware's order and internal precision
// differ; the tests compare with tolerances).
inline void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t* b) {
  const uint32_t data[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const CollectiveSlot* lanes = warp_collective(bf16 ? kMmaBf16 : kMmaF16, 0, data, 6);
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned group = l >> 2, in_group = l % 4;
    for (unsigned i = 0; i < 8; ++i) {
      const unsigned row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const unsigned col = in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = to_float16(half_of(lanes[l].data[i / 2], static_cast<int>(i % 2)), bf16);
    }
    for (unsigned i = 0; i < 4; ++i) {
      const unsigned row = in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][group] = to_float16(half_of(lanes[l].data[4 + i / 2], static_cast<int>(i % 2)), bf16);
    }
  }
  const unsigned lane = current()->thread_idx.x % 32, group = lane >> 2, in_group = lane % 4;
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = i < 2 ? group : group + 8, col = in_group * 2 + (i & 1);
    float acc = d[i];
    for (unsigned k = 0; k < 16; ++k) {
      acc = std::fma(A[row][k], B[k][col], acc);
    }
    d[i] = acc;
  }
  if (lane == 0) {
    ++state().counters.mma;
  }
}

inline void land(const PendingCopy& c) {
  if (c.src_bytes > 0) {
    std::memcpy(c.dst, c.src, c.src_bytes);
  }
  std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
}

// cp.async.{ca,cg}.shared.global [dst], [src], cp-size, src-size (PTX ISA, "cp.async"): copies
// src-size bytes and zero-fills the rest of the cp-size bytes, asynchronously: the copy is
// complete only after a cp.async.wait_group (or wait_all) that covers its commit group. Here a
// copy lands at once or at that wait, at random.
inline void cp_async(char* dst, const void* src, int bytes, int src_bytes) {
  check_shared(dst, bytes, "cp.async destination");
  if (src_bytes > 0) {
    check_aligned(src, bytes, "cp.async source", 0);
  }
  Fiber* me = current();
  const PendingCopy copy{dst, src, bytes, src_bytes, me->groups_committed};
  if (state().rng() & 1) {
    land(copy);
  } else {
    me->copies.push_back(copy);
  }
  ++state().counters.cp_async;
}

// cp.async.commit_group: the copies issued since the last commit form a group.
inline void cp_async_commit() { ++current()->groups_committed; }

// cp.async.wait_group n: waits until at most n of the most recent committed groups are pending.
inline void cp_async_wait(int n) {
  Fiber* me = current();
  const int64_t done_below = me->groups_committed - n;  // groups 0 .. done_below - 1 complete
  std::vector<PendingCopy> still;
  for (const PendingCopy& c : me->copies) {
    if (c.group < done_below) {
      land(c);
    } else {
      still.push_back(c);
    }
  }
  me->copies.swap(still);
}

// __any_sync over the whole warp: whether any lane's predicate is nonzero.
inline int any_sync(int predicate) {
  State& s = state();
  const unsigned tid = current()->thread_idx.x, base = tid - tid % 32;
  s.exchange[tid] = predicate != 0;
  barrier<true>();
  int any = 0;
  for (unsigned l = base; l < base + 32 && l < s.block_dim.x; ++l) {
    any |= static_cast<int>(s.exchange[l]);
  }
  barrier<true>();
  return any;
}

inline void fiber_entry() {
  state().body();
  if (!current()->copies.empty()) {
    fail("a thread exited with cp.async copies that no cp.async.wait_group covered");
  }
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
  s.collective[0].assign(threads, CollectiveSlot{});
  s.collective[1].assign(threads, CollectiveSlot{});
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
      f.block_arrivals = f.warp_arrivals = f.collectives = 0;
      f.groups_committed = 0;
      f.copies.clear();
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
inline int __any_sync(unsigned, int predicate) { return ::emu::any_sync(predicate); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return ::emu::shfl_xor(value, lane_mask);
}
