"""The query-block benchmark: the CPU forward at each query block the cache model could choose.

``python -m selfattn.bench --sweep blocking [--rounds 9] [--shapes 8x8x512x64,...] [--blocks 32,64,96,128]``

The forward's query block comes from the caches (csrc/cpu/blocking.h; DESIGN.md, "Blocking from the
caches"). This times selfattn's float32 forward with caches set (the op ``_cpu_caches``) so the
model gives each block in turn — results are bitwise the same, only the speed differs — against
SDPA and a 2048³ sgemm, interleaved in every round. Reported per shape (B x H x N x D, causal and
not): each block's median time (min–max), GFLOP/s (4·B·H·N²·D, half when causal), % of the sgemm
timed in the same rounds, and the per-round ratio against the block the model gives on this
machine's own caches (> 1: faster than the model's choice).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import selfattn
from selfattn._system import cpu_model

KIB = 1024
SHAPES = [(8, 8, 512, 64), (2, 8, 2048, 64), (8, 8, 512, 128), (2, 8, 2048, 128)]
L2_FOR_TIMING = 4096 * KIB  # large enough that only the L1 bound decides


def parse_shape(text: str) -> Tuple[int, int, int, int]:
    values = tuple(int(x) for x in text.lower().split("x"))
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a shape is BxHxNxD, got {text!r}")
    return values  # type: ignore[return-value]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selfattn.bench --sweep blocking", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (median and min-max over them)")
    p.add_argument("--shapes", default=None, help="BxHxNxD[,...] (default: " +
                   ",".join("x".join(map(str, s)) for s in SHAPES) + ")")
    p.add_argument("--blocks", default="32,64,96,128", help="query blocks to time")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--gemm-size", type=int, default=2048, help="the roofline sgemm's size")
    args = p.parse_args(list(argv))
    args.shapes = [parse_shape(s) for s in args.shapes.split(",")] if args.shapes else SHAPES
    args.blocks = [int(b) for b in args.blocks.split(",")]
    return args


def l1d_for(block: int) -> int:
    """An L1d that makes the model give `block` for float32 (half of it holds 64 x block floats)."""
    return 2 * 64 * 4 * block


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_shape(shape, causal: bool, blocks: List[int], rounds: int, gemm) -> Dict[str, List[float]]:
    ops = torch.ops.selfattn
    b, h, n, d = shape
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    scale = 1 / math.sqrt(d)
    set_caches = {str(block): (lambda block=block: ops._cpu_caches(l1d_for(block), L2_FOR_TIMING, 1))
                  for block in blocks}
    contestants: Dict[str, Callable[[], object]] = {
        str(block): (lambda: ops.attention_fwd(q, k, v, causal, scale)) for block in blocks}
    contestants["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    contestants["sgemm"] = gemm
    times: Dict[str, List[float]] = {name: [] for name in contestants}
    names = list(contestants)
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
                if name in set_caches:
                    set_caches[name]()  # (outside the timed call)
                t = timed(contestants[name])
                if r:
                    times[name].append(t)
    finally:
        ops._cpu_caches(0, 0, 0)
    return times


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = torch.ops.selfattn
    width = 16 if selfattn.build_info().cpu_capability == "AVX512" else 8
    for block in args.blocks:
        given = ops._cpu_forward_query_block([l1d_for(block), L2_FOR_TIMING, 1], 64, 64, 4, width)
        if given != block:
            raise SystemExit(f"selfattn.bench: the model cannot give a query block of {block} with "
                             f"{width}-wide vectors (it gives {given}); choose multiples of {width} in [32, 128]")
    l1d, l2, sharers = ops._cpu_caches()
    n = args.gemm_size
    a, bm = torch.randn(n, n), torch.randn(n, n)
    gemm_flops = 2.0 * n**3
    print(f"CPU {cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}; {selfattn.build_info()}")
    print(f"{args.rounds} interleaved rounds; float32 forward; ratio = the model's block's time / this block's "
          f"(per round, median (min-max)); % sgemm against a {n}³ sgemm timed in the same rounds\n")
    for causal in (False, True):
        for shape in args.shapes:
            b, h, seq, d = shape
            own = ops._cpu_forward_query_block([l1d, l2, sharers], d, d, 4, width)
            times = measure_shape(shape, causal, args.blocks, args.rounds, lambda: torch.mm(a, bm))
            flops = 4.0 * b * h * seq * seq * d / (2 if causal else 1)
            sgemm_rate = gemm_flops / statistics.median(times["sgemm"])
            print(f"**{b}x{h}x{seq}x{d}, {'causal' if causal else 'non-causal'}** (the model's block here: {own}; "
                  f"sgemm {sgemm_rate / 1e9:.1f} GFLOP/s)\n")
            print("| query block | ms, median (min–max) | GFLOP/s | % sgemm | vs the model's block |")
            print("|---|---|---|---|---|")
            reference: Optional[List[float]] = times.get(str(own))
            for name in [str(x) for x in args.blocks] + ["sdpa"]:
                samples = times[name]
                med = statistics.median(samples)
                if reference is not None:
                    ratios = [ref / t for ref, t in zip(reference, samples)]
                    ratio = f"{statistics.median(ratios):.3f}× ({min(ratios):.2f}–{max(ratios):.2f})"
                else:
                    ratio = "(the model's block not timed)"
                label = "SDPA" if name == "sdpa" else name + (" (model)" if name == str(own) else "")
                print(f"| {label} | {med * 1e3:.2f} ({min(samples) * 1e3:.2f}–{max(samples) * 1e3:.2f}) | "
                      f"{flops / med / 1e9:.1f} | {100 * flops / med / sgemm_rate:.0f} | {ratio} |")
            print()
    return 0
