"""Does the attention core slow down on the fused layer's q/k/v views? (issue 11, part 3)

The layer runs attention on strided views of its packed projection, (B, N, H + 2·Hkv, D) viewed as
(B, H, N, D): a head's rows lie (H + 2·Hkv)·D elements apart instead of D. This times the core on
those views against the same values made contiguous, for selfattn and for SDPA, forward and
forward+backward, interleaved rounds; reported: median (min–max) ms and the per-round ratio
views / contiguous (> 1: the views are slower). In the same rounds it times the whole layer
(selfattn.self_attention) and its projection alone (F.linear), so that the layer's time splits into
projection + core on the views + the rest (the output's layout, autograd's glue).

    python scripts/bench_layout.py [--shapes 2x2048x512x8,8x512x512x8] [--dtype float32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import selfattn
from selfattn import _system
from selfattn.bench.cases import Shape

from bench_bf16 import step, timed  # same directory


def layer_inputs(shape: Shape, dtype: torch.dtype):
    x = torch.randn(shape.batch, shape.seq, shape.embed, dtype=dtype)
    return [x, torch.randn(3 * shape.embed, shape.embed, dtype=dtype) * shape.embed ** -0.5]


def layouts(shape: Shape, dtype: torch.dtype):
    """q, k, v as the layer's views of one packed buffer, and the same values contiguous."""
    b, n, e, h = shape.batch, shape.seq, shape.embed, shape.heads
    packed = torch.randn(b, n, 3 * h, e // h, dtype=dtype)
    views = [packed.narrow(2, i * h, h).transpose(1, 2) for i in range(3)]
    return {"views": views, "contiguous": [t.contiguous() for t in views]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="2x2048x512x8,8x512x512x8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{selfattn.build_info()}\nCPU {_system.cpu_model()}, {torch.get_num_threads()} threads, {args.dtype}")
    print("| (B, N, E, H) | causal | mode | impl | contiguous ms | views ms | views / contiguous |")
    print("|---|---|---|---|---|---|---|")
    splits = []
    for spec in args.shapes.split(","):
        shape = Shape(*map(int, spec.split("x")))
        inputs = layouts(shape, dtype)
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                runs = {}
                for layout, qkv in inputs.items():
                    runs[("selfattn", layout)] = step(
                        lambda q, k, v: selfattn.attention(q, k, v, causal=causal), qkv, mode == "fwd+bwd")
                    runs[("sdpa", layout)] = step(
                        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), qkv,
                        mode == "fwd+bwd")
                x_w = layer_inputs(shape, dtype)
                runs[("layer", "")] = step(
                    lambda x, w: selfattn.self_attention(x, w, num_heads=shape.heads, causal=causal), x_w,
                    mode == "fwd+bwd")
                runs[("projection", "")] = step(F.linear, x_w, mode == "fwd+bwd")
                for fn in runs.values():
                    fn()
                names = list(runs)
                samples = {name: [] for name in names}
                for r in range(args.repeats):
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        samples[name].append(timed(runs[name]))
                fmt = lambda s: f"{1e3 * statistics.median(s):.1f} ({1e3 * min(s):.1f}–{1e3 * max(s):.1f})"
                layer, projection = samples[("layer", "")], samples[("projection", "")]
                rest = [a - p - c for a, p, c in zip(layer, projection, samples[("selfattn", "views")])]
                splits.append(f"| {spec} | {'yes' if causal else 'no'} | {mode} | {fmt(layer)} | {fmt(projection)} | "
                              f"{fmt(samples[('selfattn', 'views')])} | {1e3 * statistics.median(rest):.1f} |")
                for impl in ("selfattn", "sdpa"):
                    cont, view = samples[(impl, "contiguous")], samples[(impl, "views")]
                    ratios = [v / c for v, c in zip(view, cont)]
                    print(f"| {spec} | {'yes' if causal else 'no'} | {mode} | {impl} | {fmt(cont)} | {fmt(view)} | "
                          f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |", flush=True)
    print("\nThe whole layer, ms: median (min–max); rest = median over rounds of layer − projection − core on views")
    print("| (B, N, E, H) | causal | mode | layer | projection (F.linear) | core on views | rest |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(splits))


if __name__ == "__main__":
    main()
