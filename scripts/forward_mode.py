"""Forward mode (jvp) on the CPU, float32: torch.func.jvp of selfattn.attention (its forward op, then
the attention_jvp op) against torch.func.jvp of F.scaled_dot_product_attention under the math backend
(matmul, softmax, matmul with forward AD, an N×N matrix; SDPA's other CPU backends refuse forward
mode), the two interleaved, 7 rounds:

    python scripts/forward_mode.py

Prints a markdown table: median ms per jvp call of each, and the median of the per-round ratios
math / selfattn (min–max), and the largest difference between the two tangents.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import selfattn  # noqa: E402
from selfattn._system import cpu_model  # noqa: E402

CASES = [(1, 8, 1024, 64, False), (1, 8, 1024, 64, True), (2, 16, 256, 64, False)]
ROUNDS = 7


def main() -> None:
    torch.manual_seed(0)
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| (B, H, N, D) | mask | selfattn ms | SDPA math ms | speedup (min–max) | max difference |")
    print("|---|---|---:|---:|---|---:|")
    for batch, heads, n, dim, causal in CASES:
        q, k, v = (torch.randn(batch, heads, n, dim) for _ in range(3))
        tangents = tuple(torch.randn_like(t) for t in (q, k, v))

        def ours():
            return torch.func.jvp(lambda q, k, v: selfattn.attention(q, k, v, is_causal=causal), (q, k, v), tangents)

        def math():
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                      (q, k, v), tangents)

        difference = (ours()[1] - math()[1]).abs().max().item()  # also the warm-up
        seconds = {"selfattn": [], "math": []}
        for r in range(ROUNDS):
            pair = [("selfattn", ours), ("math", math)]
            for name, fn in pair if r % 2 == 0 else reversed(pair):
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
        ratios = [m / s for s, m in zip(seconds["selfattn"], seconds["math"])]
        print(f"| ({batch}, {heads}, {n}, {dim}) | {'causal' if causal else 'none'} | "
              f"{statistics.median(seconds['selfattn']) * 1e3:.1f} | {statistics.median(seconds['math']) * 1e3:.1f} | "
              f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | {difference:.1e} |")


if __name__ == "__main__":
    main()
