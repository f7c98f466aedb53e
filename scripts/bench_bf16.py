"""bfloat16 on the CPU: selfattn's native bf16 kernels against SDPA-bf16, against the same kernels
with their other tile GEMM (oneDNN's brgemm where the micro-kernel is the default, and the other way
round on an AMX CPU: SELFATTN_BF16_GEMM), against selfattn's float32 path for bf16 inputs
(SELFATTN_BF16_KERNELS=0, what ran before) and against selfattn in float32.

Core (selfattn.attention vs F.scaled_dot_product_attention) and layer (selfattn.self_attention vs
F.linear + SDPA), forward and forward+backward, causal and not. Every contestant of a case — and a
2048³ (--gemm-size) matmul in float32 and in bfloat16 (512³ without bf16 arithmetic) — runs once
per round, rounds rotate the order (interleaved);
reported: median (min–max) ms, GFLOP/s (core: the visible pairs, backward 2.5× forward, as
selfattn.bench counts), % of the same-run matmul rates, and per-round ratios' median (min–max).

    python scripts/bench_bf16.py [--repeats 7] [--shapes 8x512x512x8,2x2048x512x8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import selfattn
from selfattn import _system
from selfattn.bench.cases import Shape, attention_flops, projection_flops
from selfattn.bench.isa import matmul_size


def timed(fn, min_seconds=0.2):
    """Seconds per call: as many calls as fill min_seconds (at least one)."""
    start = time.perf_counter()
    calls = 0
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def with_settings(fn, **settings):
    """fn run with these environment settings, restored after."""
    def run():
        before = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            return fn()
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return run


def other_tile_gemm() -> str:
    """The SELFATTN_BF16_GEMM setting that is not this CPU's default."""
    return "avx512bf16" if torch.ops.selfattn._bf16_tile_gemm().startswith("onednn-brgemm") else "brgemm"


def step(forward, inputs, backward):
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    grad = None

    def run():
        nonlocal grad
        if not backward:
            with torch.no_grad():
                return forward(*leaves)
        out = forward(*leaves)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        for t in leaves:
            t.grad = None
    return run


def matmul(n, dtype):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return lambda: torch.mm(a, b)


def contestants(shape: Shape, causal: bool, level: str, backward: bool):
    b, n, e, h = shape.batch, shape.seq, shape.embed, shape.heads
    d = e // h
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        if level == "core":
            qkv = [torch.randn(b, h, n, d, dtype=dtype) for _ in range(3)]
            ours = step(lambda q, k, v: selfattn.attention(q, k, v, causal=causal), qkv, backward)
            sdpa = step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), qkv, backward)
        else:
            x, w = torch.randn(b, n, e, dtype=dtype), torch.randn(3 * e, e, dtype=dtype) * e ** -0.5

            def linear_sdpa(x, w):
                q, k, v = F.linear(x, w).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, e)
            ours = step(lambda x, w: selfattn.self_attention(x, w, num_heads=h, causal=causal), [x, w], backward)
            sdpa = step(linear_sdpa, [x, w], backward)
        if dtype == torch.bfloat16:
            out["selfattn-bf16"] = ours
            out[f"selfattn-bf16 ({other_tile_gemm()})"] = with_settings(ours, SELFATTN_BF16_GEMM=other_tile_gemm())
            out["selfattn-bf16 (fp32 path)"] = with_settings(ours, SELFATTN_BF16_KERNELS="0")
            out["sdpa-bf16"] = sdpa
        else:
            out["selfattn-fp32"] = ours
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", default="8x512x512x8,2x2048x512x8")
    parser.add_argument("--levels", default="core,layer")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--json")
    parser.add_argument("--gemm-size", type=int, default=2048, help="the square GEMMs timed in the same rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(selfattn.build_info(), flush=True)
    n_bf16 = matmul_size(args.gemm_size, torch.bfloat16)
    gemms = {"sgemm": (matmul(args.gemm_size, torch.float32), 2 * args.gemm_size ** 3),
             "bf16 matmul": (matmul(n_bf16, torch.bfloat16), 2 * n_bf16 ** 3)}
    results = []
    for spec in args.shapes.split(","):
        shape = Shape(*map(int, spec.split("x")))
        for level in args.levels.split(","):
            for causal in (False, True):
                for mode in ("fwd", "fwd+bwd"):
                    runs = contestants(shape, causal, level, mode == "fwd+bwd")
                    runs.update({name: fn for name, (fn, _) in gemms.items()})
                    for fn in runs.values():
                        fn()
                    samples = {name: [] for name in runs}
                    names = list(runs)
                    for r in range(args.repeats):
                        for name in names[r % len(names):] + names[:r % len(names)]:
                            samples[name].append(timed(runs[name]))
                    rates = {g: flops / statistics.median(samples[g]) / 1e9 for g, (_, flops) in gemms.items()}
                    flops = attention_flops(shape, causal, mode)
                    if level == "layer":
                        flops += projection_flops(shape, mode)
                    row = {"shape": spec, "level": level, "causal": causal, "mode": mode, "gemm_gflops": rates,
                           "ms": {k: [1e3 * t for t in v] for k, v in samples.items() if k not in gemms}}
                    ours = samples["selfattn-bf16"]
                    line = f"{spec} {level} causal={causal} {mode}: "
                    for name in row["ms"]:
                        med = statistics.median(samples[name])
                        line += f"{name} {1e3 * med:.1f} ms ({1e3 * min(samples[name]):.1f}-{1e3 * max(samples[name]):.1f}); "
                    gflops = flops / statistics.median(ours) / 1e9
                    row["selfattn_bf16_gflops"] = gflops
                    line += f"selfattn-bf16 {gflops:.0f} GFLOP/s = {100 * gflops / rates['bf16 matmul']:.0f}% bf16 matmul " \
                            f"({rates['bf16 matmul']:.0f}), {100 * gflops / rates['sgemm']:.0f}% sgemm ({rates['sgemm']:.0f}); "
                    row["speedup"] = {}
                    for base in ("sdpa-bf16", f"selfattn-bf16 ({other_tile_gemm()})", "selfattn-bf16 (fp32 path)",
                                 "selfattn-fp32"):
                        ratios = [b_ / o for b_, o in zip(samples[base], ours)]
                        row["speedup"][base] = [statistics.median(ratios), min(ratios), max(ratios)]
                        line += f"vs {base} {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}); "
                    print(line, flush=True)
                    results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": _system.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "build": str(selfattn.build_info()), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
