"""Per-call time of selfattn.attention against F.scaled_dot_product_attention on tiny inputs,
where the Python and dispatcher overhead is most of the cost:

    python scripts/small_calls.py                  # default shapes, 9 rounds
    python scripts/small_calls.py --rounds 15 --threads 1

For each shape (B, H, N, D) (Nq = Nk = N, float32) and mode — "no grad" (inside torch.no_grad())
and "grad" (inputs requiring grad, forward only) — each round times a loop of the same number of
calls of each implementation, the two back to back in alternating order. Prints a markdown table:
the median per-call time over rounds, and the median of the per-round ratios selfattn / SDPA with
their min–max.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import selfattn  # noqa: E402
from selfattn._system import cpu_model  # noqa: E402

SHAPES = [(1, 1, 1, 64), (1, 8, 16, 64), (1, 32, 1, 128)]
MODES = ["no grad", "grad"]


def time_loop(fn, calls: int) -> float:
    """Seconds per call of fn() over a loop of ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(shape, mode: str, rounds: int, round_seconds: float):
    requires_grad = mode == "grad"
    q, k, v = (torch.randn(shape).requires_grad_(requires_grad) for _ in range(3))
    implementations = {
        "selfattn": lambda: selfattn.attention(q, k, v),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    grad_context = contextlib.nullcontext if requires_grad else torch.no_grad
    with grad_context():
        # Warm up, then size the loop so that one implementation's loop takes ~round_seconds.
        for fn in implementations.values():
            time_loop(fn, 200)
        slowest = max(time_loop(fn, 500) for fn in implementations.values())
        calls = max(1000, int(round_seconds / slowest))
        per_call = {name: [] for name in implementations}
        for r in range(rounds):
            order = list(implementations) if r % 2 == 0 else list(reversed(implementations))
            for name in order:
                per_call[name].append(time_loop(implementations[name], calls))
    ratios = [a / b for a, b in zip(per_call["selfattn"], per_call["sdpa"])]
    return {
        "calls": calls,
        "selfattn_us": statistics.median(per_call["selfattn"]) * 1e6,
        "sdpa_us": statistics.median(per_call["sdpa"]) * 1e6,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="rounds per row (median over them; >= 7)")
    parser.add_argument("--round-seconds", type=float, default=0.1,
                        help="approximate length of one implementation's loop in a round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{selfattn.build_info()}")
    print(f"float32, Nq = Nk = N; median of {args.rounds} interleaved rounds; ratio = selfattn / SDPA "
          f"per round, median (min–max)\n")
    print("| (B, H, N, D) | mode | calls/round | selfattn µs/call | SDPA µs/call | ratio (min–max) |")
    print("|---|---|---:|---:|---:|---|")
    for shape in SHAPES:
        for mode in MODES:
            r = measure(shape, mode, args.rounds, args.round_seconds)
            print(f"| {shape} | {mode} | {r['calls']} | {r['selfattn_us']:.1f} | {r['sdpa_us']:.1f} | "
                  f"{r['ratio']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
