"""CPU time of one decode call against a copy_ of the same bytes, for A/B runs on a loaded machine.

    PYTHONPATH=. python scripts/decode_cpu_time.py --dtype bfloat16 --batch 1 --nk 8192 --rounds 7

Wall time on a machine shared with other processes measures the scheduler; the process's CPU time
(`time.process_time`, one intra-op thread) measures the call. Run two builds in alternating
processes (e.g. from two worktrees) and compare. Prints the median CPU ms per call and k + v bytes
read per CPU second as a fraction of copy_'s (read + write) bytes per CPU second, median (min-max).
Caches rotate over > 128 MiB so that every call reads from memory.
"""

import argparse
import statistics
import time

import torch

import selfattn  # noqa: F401  (registers torch.ops.selfattn)

HQ, HK, D = 32, 8, 128


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nk", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kv_bytes = 2 * args.batch * HK * args.nk * D * dtype.itemsize
    sets = max(2, (128 << 20) // kv_bytes + 1)
    qs = [torch.randn(args.batch, HQ, 1, D, dtype=dtype) for _ in range(sets)]
    ks = [torch.randn(args.batch, HK, args.nk, D, dtype=dtype) for _ in range(sets)]
    vs = [torch.randn(args.batch, HK, args.nk, D, dtype=dtype) for _ in range(sets)]
    srcs = [torch.randn(kv_bytes // 4) for _ in range(sets)]
    dsts = [torch.empty_like(s) for s in srcs]

    def cpu_seconds(fn):
        start = time.process_time()
        for i in range(sets):
            fn(i)
        return (time.process_time() - start) / sets

    def decode(i):
        torch.ops.selfattn.attention_fwd(qs[i], ks[i], vs[i], False, D**-0.5, None, -1, -1, 0)

    def copy(i):
        dsts[i].copy_(srcs[i])

    cpu_seconds(decode), cpu_seconds(copy)  # first touch
    times, fractions = [], []
    for _ in range(args.rounds):
        t, c = cpu_seconds(decode), cpu_seconds(copy)
        times.append(t)
        fractions.append((kv_bytes / t) / (2 * kv_bytes / c))
    print(f"{args.dtype} B={args.batch} Nk={args.nk} threads={args.threads}: {statistics.median(times) * 1e3:.2f} "
          f"CPU ms/call; k+v read = {statistics.median(fractions):.0%} of copy_ "
          f"({min(fractions):.0%}-{max(fractions):.0%})")


if __name__ == "__main__":
    main()
