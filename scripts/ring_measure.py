"""Per-rank peak memory and time of ring attention (forward + backward) at one total sequence length.

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=W scripts/ring_measure.py [N [H [P]]]

for W = 1, 2, 4. Each rank holds N / W rows (zigzag, causal, float32, B = 1, H heads (default 16),
D = 64), P kv heads per pass of the ring (default: ring_attention's, 1; one pass at W = 1). Memory:
the rise of the process's peak RSS (VmHWM, reset before each call) over the RSS before it, i.e.
what the call allocates beyond the inputs — the activations, buffers and gradients. (The fixed
mmap threshold makes glibc map every tensor of 64 KiB or more on its own and unmap it when
freed, so that the resident size follows the live tensors instead of the heap's high water.) Time: wall
time per call and the CPU time of all ranks together (the total work: with more ranks than cores
the wall time measures the sharing, not the ring). Median of 7 calls, min–max.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist

import selfattn.distributed as sd
from selfattn import _system

B, D, REPEATS = 1, 64, 7


def setup(default_total: int):
    """Joins the gloo group (one thread per rank) and makes this rank's problem from the command line
    [N [H [P]]]: (rank, world, N, H, P or None, rows per rank, q, k, v, the output gradient)."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    n_total = int(sys.argv[1]) if len(sys.argv) > 1 else default_total
    H = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    per_pass = int(sys.argv[3]) if len(sys.argv) > 3 else None
    rows = n_total // world
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(B, H, rows, D, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, rows, D, generator=gen)
    return rank, world, n_total, H, per_pass, rows, q, k, v, grad


def main():
    rank, world, n_total, H, per_pass, rows, q, k, v, grad = setup(8192)
    peaks, walls, cpus = [], [], []
    for _ in range(REPEATS + 1):  # the first call warms up
        q.grad = k.grad = v.grad = None
        _system.malloc_trim()
        dist.barrier()
        before = _system.status_kib("VmRSS")
        _system.reset_peak_rss()
        wall, cpu = time.perf_counter(), time.process_time()
        sd.ring_attention(q, k, v, causal=True, layout="zigzag", kv_heads_per_pass=per_pass).backward(grad)
        dist.barrier()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        peaks.append((_system.status_kib("VmHWM") - before) / 1024)
    peaks, walls, cpus = peaks[1:], walls[1:], cpus[1:]
    stats = torch.tensor([statistics.median(peaks), max(peaks), statistics.median(cpus)], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)  # (the report only; the ring itself uses no all-gather)
    if rank == 0:
        inputs_mib = 3 * B * H * rows * D * 4 / 2**20
        passes = "one pass (a single rank)" if world == 1 else f"kv heads per pass {per_pass or 1}"
        print(f"N = {n_total}, H = {H}, world size {world}, {passes}: {rows} rows per rank, "
              f"q/k/v {inputs_mib:.1f} MiB per rank")
        print("  peak RSS rise per rank (median, max over calls), MiB: "
              + ", ".join(f"{g[0]:.1f} ({g[1]:.1f})" for g in gathered))
        print(f"  wall per call: median {statistics.median(walls):.3f} s (min {min(walls):.3f}, max {max(walls):.3f}); "
              f"CPU time of all ranks per call: {sum(g[2].item() for g in gathered):.3f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
