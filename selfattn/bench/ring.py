"""``python -m selfattn.bench --sweep ring``: per-rank peak memory and time of ring attention
(selfattn.distributed.ring_attention, forward + backward) at one total sequence length, for each
world size W (default 1, 2, 4).

Each W runs W fresh processes on gloo over the loopback address (this command starts them: no
torchrun needed), with MALLOC_MMAP_THRESHOLD_=65536 and OMP_NUM_THREADS=1 (one thread per rank).
The fixed mmap threshold makes glibc map every tensor of 64 KiB or more on its own and unmap it
when freed, so that the resident size follows the live tensors instead of the heap's high water.
Each rank holds N / W rows (zigzag, causal, float32, B = 1, H heads, D = 64), P kv heads per pass
of the ring (default: ring_attention's, 1; one pass at W = 1).

Memory: the rise of a rank's peak RSS (VmHWM, reset before each call) over its RSS before the
call — what the call allocates beyond the inputs: activations, buffers and gradients. Time: wall
time per call and the CPU time of all ranks together (the total work: with more ranks than cores
the wall time measures the sharing, not the ring). Median (min–max) of --repeats calls after one
warm-up. World sizes run one after another (each needs its own processes), so W = 1 — no ring —
is the baseline each W is compared with: per-rank peak and all ranks' CPU time as ratios to it.

    python -m selfattn.bench --sweep ring [--world-sizes 1,2,4] [--seq 8192] [--heads 16] [--kv-heads-per-pass P]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from selfattn import _system

from .measure import MIN_PAIRS, child_env

B, D = 1, 64
RANK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
TIMEOUT_S = 600


def rank_main(n_total: int, heads: int, per_pass: Optional[int], repeats: int) -> None:
    """One rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): time and measure the calls; rank 0
    prints the ranks' results as one JSON line."""
    import torch.distributed as dist

    import selfattn.distributed as sd
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = n_total // world
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(B, heads, rows, D, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(B, heads, rows, D, generator=gen)
    peaks, walls, cpus = [], [], []
    for _ in range(repeats + 1):  # the first call warms up
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
        peaks.append((_system.status_kib("VmHWM") - before) * 1024)
    mine = torch.tensor([statistics.median(peaks[1:]), max(peaks[1:]), statistics.median(cpus[1:])],
                        dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)  # (the report only; the ring itself uses no all-gather)
    if rank == 0:
        print(json.dumps({"world": world, "seq": n_total, "heads": heads, "kv_heads_per_pass": per_pass,
                          "rows_per_rank": rows, "input_bytes_per_rank": 3 * B * heads * rows * D * 4,
                          "peak_bytes": [[g[0].item(), g[1].item()] for g in gathered], "wall_s": walls[1:],
                          "cpu_s_all_ranks": sum(g[2].item() for g in gathered),
                          "rank_env": {name: os.environ.get(name) for name in RANK_ENV}}), flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, n_total: int, heads: int, per_pass: Optional[int], repeats: int) -> dict:
    """Starts the W ranks, waits for them (all killed after TIMEOUT_S), returns rank 0's JSON."""
    port = _free_port()
    argv = [sys.executable, "-m", "selfattn.bench.ring", "--rank-main", str(n_total), str(heads),
            str(per_pass or 0), str(repeats)]
    procs = [subprocess.Popen(argv, env=child_env(**RANK_ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S))
    finally:
        for proc in procs:
            proc.kill()
    failed = [f"rank {r} (exit {p.returncode}): {err[-1500:]}" for r, (p, (_, err)) in enumerate(zip(procs, outputs))
              if p.returncode != 0]
    if failed:
        raise SystemExit(f"selfattn.bench --sweep ring: world size {world} failed:\n" + "\n".join(failed))
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def markdown(header: str, runs: List[dict]) -> str:
    base = runs[0] if runs and runs[0]["world"] == 1 else None
    base_peak = statistics.median(p[0] for p in base["peak_bytes"]) if base else None
    mib = 2**20
    out = ["# Ring attention: per-rank peak memory and time, forward + backward", "", header, "",
           "| W | rows per rank | q, k, v per rank MiB | peak RSS rise per rank MiB, median (max) | vs W = 1 | "
           "wall per call s, median (min–max) | CPU s, all ranks | vs W = 1 |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        peak = statistics.median(p[0] for p in run["peak_bytes"])
        walls, cpu = run["wall_s"], run["cpu_s_all_ranks"]
        per_rank = ", ".join(f"{p[0] / mib:.1f} ({p[1] / mib:.1f})" for p in run["peak_bytes"])
        cells = [str(run["world"]), str(run["rows_per_rank"]), f"{run['input_bytes_per_rank'] / mib:.1f}", per_rank,
                 f"{peak / base_peak:.2f}×" if base else "—",
                 f"{statistics.median(walls):.3f} ({min(walls):.3f}–{max(walls):.3f})", f"{cpu:.3f}",
                 f"{cpu / base['cpu_s_all_ranks']:.2f}×" if base else "—"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .contest import machine
    from .measure import CpuDevice
    from .run import log
    p = argparse.ArgumentParser(prog="python -m selfattn.bench --sweep ring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", default="1,2,4", help="comma-separated (default %(default)s)")
    p.add_argument("--seq", type=int, default=None, help="total sequence length N (default 8192; --quick 1024)")
    p.add_argument("--heads", type=int, default=None, help="H = Hk (default 16; --quick 4)")
    p.add_argument("--kv-heads-per-pass", type=int, default=None, help="P (default: ring_attention's)")
    p.add_argument("--repeats", type=int, default=MIN_PAIRS, help="timed calls per rank (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a small problem (tests, a first look)")
    p.add_argument("--json", type=Path, default=None, help="results file (default: bench_results/ring-<time>.json)")
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    n_total = args.seq or (1024 if args.quick else 8192)
    heads = args.heads or (4 if args.quick else 16)
    if any(n_total % (2 * w) for w in worlds):
        raise SystemExit(f"selfattn.bench --sweep ring: N = {n_total} must split into 2·W zigzag chunks for each W")
    header = (f"{machine(CpuDevice(1))}; each rank 1 thread, {' '.join(f'{k}={v}' for k, v in RANK_ENV.items())}; "
              f"N = {n_total}, H = {heads}, D = {D}, B = {B}, causal, zigzag, float32; "
              f"kv heads per pass {args.kv_heads_per_pass or 'default (1)'}; {args.repeats} calls after a warm-up")
    runs = []
    for world in worlds:
        log(f"ring: world size {world}")
        runs.append(run_world(world, n_total, heads, args.kv_heads_per_pass, args.repeats))
    path = args.json or Path("bench_results") / f"ring-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sweep": "ring", "machine": header, "cpu": _system.cpu_model(), "runs": runs}, indent=1))
    log(f"wrote {path}")
    print(markdown(header, runs))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-main"]:
        n, h, per_pass, repeats = (int(x) for x in sys.argv[2:6])
        rank_main(n, h, per_pass or None, repeats)
    else:
        sys.exit(main(sys.argv[1:]))
