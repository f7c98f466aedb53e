// The forward's query blocking from the running CPU's caches (DESIGN.md, "Blocking from the
// caches"). Compiled once (not per copy): the copy passes its vector width.
//
// Only the query block — how many queries one work item carries through the key stream — comes
// from the caches. It changes which data sits in which cache, never what is added to what: each
// query's scores, softmax and P·V sums run over the same key blocks in the same order whatever
// block_q is. The key block (the split of the softmax reduction) is a constant of each kernel, so
// results stay bitwise the same across cache sizes, thread counts and machines of one copy.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace selfattn {

// Per-core data caches in bytes, and how many of this process's CPUs share one core's L1d and L2
// (2 when two CPUs it may run on are SMT siblings).
struct CpuCaches {
  int64_t l1d = 0, l2 = 0, sharers = 1;
  const char* source = "";  // "sysfs", "SELFATTN_CPU_CACHES", "default" or "set" (_cpu_caches)
};

// Sane ranges: VMs misreport caches (one reported a 300 MiB L3); values outside are clamped.
inline constexpr int64_t kMinL1d = 16 << 10, kMaxL1d = 128 << 10;
inline constexpr int64_t kMinL2 = 128 << 10, kMaxL2 = 4 << 20;

// The caches the kernels use: SELFATTN_CPU_CACHES ("L1D_KIB,L2_KIB[,SHARERS]", e.g. "32,512")
// if set, else what sysfs says of CPU 0's caches and which CPUs share them, else 32 KiB / 512 KiB;
// clamped. Read on the first call; _cpu_caches (set_cpu_caches) replaces them for tests.
CpuCaches cpu_caches();
CpuCaches set_cpu_caches(int64_t l1d, int64_t l2, int64_t sharers);  // 0, 0, 0: detect again
CpuCaches clamp_caches(CpuCaches caches);

// The forward's query block for head dims `dim` and `dim_v_padded`, accumulators of `elem_bytes`,
// vectors of `vec_width` elements and key blocks of `block_k` rows; a multiple of vec_width in
// [32, max_block_q] (below 32 columns the tile GEMM's register tile runs mostly empty). The model:
//  - L1: P·V streams the query rows of the score tile (block_k x block_q) once per column tile of
//    v, so the tile is the operand L1 must keep: block_k · block_q · elem_bytes ≤ L1d share / 2
//    (the other half for v's column tile, the accumulator rows and the next key rows).
//  - L2: one work item's whole set — the query panel (D x block_q), the score tile, the output
//    accumulators (block_q x Dv) and one key and value block — ≤ L2 share / 2, so the key and
//    value blocks streaming in for the next step do not evict it.
int64_t forward_query_block(const CpuCaches& caches, int64_t dim, int64_t dim_v_padded, int64_t elem_bytes,
                            int64_t vec_width, int64_t block_k, int64_t max_block_q);

// The query block for nq queries under the caches' `cap`: as few blocks as the cap allows, of
// equal width rounded up to the vector width, so the last block is not mostly padding (N = 512
// under a cap of 96 gives 6 blocks of 88, not 5 of 96 and one of 32: Zen 1 measured that 13 %
// slower, as the padding columns are computed too). A short sequence is one block.
inline int64_t balanced_query_block(int64_t nq, int64_t cap, int64_t vec_width) {
  const int64_t blocks = (nq + cap - 1) / cap;
  const int64_t width = (nq + blocks - 1) / blocks;
  return (width + vec_width - 1) / vec_width * vec_width;
}

// "L1d 32 KiB, L2 512 KiB per core (sysfs); float32 forward query block 64 at D = 64, 64 at D = 128"
// for float vectors of vec_width.
std::string describe_cpu_blocking(int64_t vec_width);

// The private ops (selfattn.cpp), for tests and build_info: _cpu_caches reports the caches in use
// as [l1d, l2, sharers] (bytes), or sets them when given (0, 0, 0: detect again);
// _cpu_forward_query_block runs the model on caches [l1d, l2, sharers] given (clamped).
std::vector<int64_t> cpu_caches_op(int64_t l1d, int64_t l2, int64_t sharers);
int64_t cpu_forward_query_block_op(std::vector<int64_t> caches, int64_t dim, int64_t dim_v, int64_t elem_bytes,
                                   int64_t vec_width);

}  // namespace selfattn
