"""A small forward + backward through every CUDA kernel, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python scripts/sanitize_case.py
    compute-sanitizer --tool racecheck python scripts/sanitize_case.py

(scripts/gpu_check.sh runs both.) It imports the installed selfattn, or with PYTHONPATH=. the tree's.

Covers each tiled configuration's code paths in miniature: every head-dim bucket, float32 /
float16 / bfloat16 and the float64 kernels, causal and not, partial blocks, Nq != Nk, D != Dv,
element-wise (odd head dim, sliced) and vector (aligned) accesses, and the fused layer; and the
tensor-core kernels (half / bfloat16 at D = 64 and 128) over several tiles, so that racecheck
sees their cp.async double buffering turn over.
Sizes are small because the tools slow kernels down by orders of magnitude.
"""

from __future__ import annotations

import torch

import selfattn

ops = torch.ops.selfattn


def run(batch, heads, nq, nk, dim, dim_v, dtype, causal, sliced=False):
    def make(n, d):
        if sliced:  # every other (b, h) slice of a larger tensor, and an odd row stride
            return torch.randn(2 * batch, heads, n, d + 1, dtype=dtype, device="cuda")[::2, :, :, :d]
        return torch.randn(batch, heads, n, d, dtype=dtype, device="cuda")

    q, k, v = make(nq, dim), make(nk, dim), make(nk, dim_v)
    scale = dim ** -0.5
    out, lse = ops.attention_fwd(q, k, v, causal, scale)
    grads = ops.attention_bwd(torch.randn_like(out), q, k, v, out, lse, causal, scale)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def main() -> None:
    print(selfattn.build_info(), flush=True)
    cases = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for dim, dim_v in ((16, 16), (64, 64), (100, 128), (256, 200)):  # every bucket
            for causal in (False, True):
                run(1, 2, 37, 21, dim, dim_v, dtype, causal)
                cases += 1
    for dtype in (torch.float16, torch.bfloat16):  # tensor cores: 2+ blocks and 3+ tiles each way
        for dim in (64, 128):
            run(1, 1, 200, 150, dim, dim, dtype, True)
            cases += 1
    run(1, 1, 130, 260, 128, 128, torch.bfloat16, False)
    cases += 1
    run(1, 2, 33, 40, 33, 33, torch.float16, True, sliced=True)  # element-wise path
    run(2, 1, 19, 19, 40, 40, torch.float32, False, sliced=True)
    for causal in (False, True):
        run(1, 2, 9, 11, 24, 20, torch.float64, causal)
    run(1, 1, 5, 0, 8, 8, torch.float32, False)  # no keys
    cases += 5
    layer = selfattn.SelfAttention(32, 64, 4, bias=True, causal=True).cuda().half()
    x = torch.randn(2, 25, 32, device="cuda", dtype=torch.half, requires_grad=True)
    layer(x).float().sum().backward()
    torch.cuda.synchronize()
    print(f"sanitize_case: {cases + 1} cases ran", flush=True)


if __name__ == "__main__":
    main()
