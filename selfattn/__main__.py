"""python -m selfattn: the newcomer's tour.

1. the tutorial's worked example through the C++ op, next to the reference module;
2. a batched multi-head causal layer, forward and gradients, against the reference module;
3. one forward at (B, N, E, H) = (8, 512, 512, 8) against eager PyTorch.

The full benchmark is `python -m selfattn.bench`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import selfattn
from selfattn import reference, tutorial
from selfattn._system import mem_available_bytes


def rows(t: torch.Tensor) -> list[str]:
    return ["[" + ", ".join(f"{x:7.4f}" for x in row) + "]" for row in t.tolist()]


def worked_example() -> None:
    print("1. The tutorial's worked example: 3 tokens, embed dim 4, model dim 3, scores unscaled")
    x = tutorial.inputs()
    ref = tutorial.reference_module()
    fused = selfattn.SelfAttention.from_reference(ref)
    expected, got = ref(x).detach(), fused(x).detach()
    print(f"   inputs {tutorial.INPUTS}")
    print(f"   {'reference module (five steps)':<32}{'selfattn.SelfAttention (C++ op)'}")
    for left, right in zip(rows(expected), rows(got)):
        print(f"   {left:<32}{right}")
    print(f"   largest difference: {(expected - got).abs().max().item():.1e}\n")


def batched_check() -> None:
    batch, n, e, m, heads = 4, 100, 64, 64, 8
    print(f"2. Batched multi-head causal layer (B={batch}, N={n}, E={e}, M={m}, H={heads}), float32")
    ref = reference.SelfAttention(e, m, num_heads=heads, bias=True, causal=True)
    fused = selfattn.SelfAttention.from_reference(ref)
    x = torch.randn(batch, n, e, requires_grad=True)
    out_ref = ref(x)
    (grad_ref,) = torch.autograd.grad(out_ref.square().sum(), x)
    out = fused(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    w_ref = torch.autograd.grad(ref(x).square().sum(), ref.to_query.weight)[0]
    w = torch.autograd.grad(fused(x).square().sum(), fused.in_proj_weight)[0][:m]
    print(f"   output       largest difference {(out - out_ref).abs().max().item():.1e}")
    print(f"   d input      largest difference {(grad - grad_ref).abs().max().item():.1e}")
    print(f"   d W_query    largest difference {(w - w_ref).abs().max().item():.1e}\n")


def compare_with_eager(repeats: int) -> None:
    batch, n, e, heads = 8, 512, 512, 8
    print(f"3. One forward, (B, N, E, H) = ({batch}, {n}, {e}, {heads}), float32, "
          f"{torch.get_num_threads()} threads, median of {repeats} interleaved runs")
    ref = reference.SelfAttention(e, e, num_heads=heads, bias=True)
    fused = selfattn.SelfAttention.from_reference(ref)
    w, b = fused.in_proj_weight.detach(), fused.in_proj_bias.detach()
    x = torch.randn(batch, n, e)

    def linear_sdpa():
        q, k, v = F.linear(x, w, b).view(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n, e)

    impls = {"selfattn.SelfAttention": lambda: fused(x), "F.linear + F.scaled_dot_product_attention": linear_sdpa}
    # The tutorial's broadcast holds B·H·N²·D products at once (twice, briefly).
    broadcast_bytes = 2 * batch * n * n * e * 4
    if broadcast_bytes < 0.6 * (mem_available_bytes() or 0):
        impls["tutorial's reference module"] = lambda: ref(x)
    else:
        print(f"   (skipping the reference module: its broadcast needs {broadcast_bytes / 2**30:.1f} GiB)")
    times = {name: [] for name in impls}
    with torch.no_grad():
        for fn in impls.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in impls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["selfattn.SelfAttention"])
    print(f"   {'implementation':<44}{'median ms':>10}{'selfattn speedup':>18}")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"   {name:<44}{median * 1e3:>10.1f}{median / base:>17.2f}x")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation in part 3")
    parser.add_argument("--no-timing", action="store_true", help="skip part 3")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{selfattn.build_info()}\n")
    worked_example()
    batched_check()
    if not args.no_timing:
        compare_with_eager(args.repeats)
    print("Full benchmark: python -m selfattn.bench")


if __name__ == "__main__":
    main()
