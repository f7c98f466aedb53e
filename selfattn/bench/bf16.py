"""``python -m selfattn.bench --sweep bf16``: bfloat16 on the CPU.

selfattn's bf16 kernels (``selfattn-bf16``) against SDPA in bf16 (the strongest fair baseline),
against the same kernels on their other tile GEMM (oneDNN's brgemm where the AVX512-BF16
micro-kernel is the default, and the other way round on an AMX CPU: SELFATTN_BF16_GEMM), against
selfattn's float32 path for bf16 inputs (SELFATTN_BF16_KERNELS=0) and against selfattn in float32.
Core (selfattn.attention vs F.scaled_dot_product_attention) and layer (selfattn.self_attention
vs F.linear + SDPA), forward (no grad) and forward+backward, causal and not; every call of a case
and the GEMM-rate probes (a square sgemm and bf16 matmul of --gemm-size) interleaved in rounds.
Reported: the median (min–max) time per call, selfattn-bf16's speedup over each other row
(t_row / t_selfattn-bf16 per round), its GFLOP/s (the package docstring's count) and its % of
the probes' rates.

On a CPU without bf16 arithmetic (no AVX512-BF16 or AMX-BF16) the bf16 kernels run the float32
path whatever the settings: the other-tile-GEMM and float32-path rows (the same code) and the
bf16 matmul probe (~30x slower than float32 there) are skipped, and --quick keeps to the core
level (the layer's projections are bf16 GEMMs); the output says so.

    python -m selfattn.bench --sweep bf16 [--shapes 8x512x512x8,2x2048x512x8] [--levels core,layer]
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import selfattn

from .cases import Shape, attention_flops, parse_shapes, projection_flops
from .contest import (
    Outcome,
    bf16_arithmetic,
    contest,
    machine,
    markdown,
    no_bf16_note,
    parser,
    start,
    with_backward,
    with_settings,
    write_json,
)

SHAPES, QUICK_SHAPES = "8x512x512x8,2x2048x512x8", "2x256x256x4"
GEMM_SIZE, QUICK_GEMM_SIZE = 2048, 512
OURS = "selfattn-bf16"


def other_tile_gemm() -> str:
    """The SELFATTN_BF16_GEMM setting that is not this CPU's default."""
    return "avx512bf16" if torch.ops.selfattn._bf16_tile_gemm().startswith("onednn-brgemm") else "brgemm"


def _forwards(shape: Shape, causal: bool, level: str, dtype: torch.dtype):
    """(selfattn's forward, SDPA's forward, their inputs) at one level."""
    b, n, e, h = shape.batch, shape.seq, shape.embed, shape.heads
    d = e // h
    if level == "core":
        inputs = [torch.randn(b, h, n, d, dtype=dtype) for _ in range(3)]
        return (partial(selfattn.attention, causal=causal), partial(F.scaled_dot_product_attention, is_causal=causal),
                inputs)

    def linear_sdpa(x, w):
        q, k, v = F.linear(x, w).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, e)
    inputs = [torch.randn(b, n, e, dtype=dtype), torch.randn(3 * e, e, dtype=dtype) * e ** -0.5]
    return partial(selfattn.self_attention, num_heads=h, causal=causal), linear_sdpa, inputs


def _timed_call(forward: Callable, leaves: List[Tensor], grad_out: Tensor, mode: str) -> Callable[[], object]:
    return with_backward(forward, leaves, grad_out) if mode != "fwd" else partial(forward, *leaves)


def calls(shape: Shape, causal: bool, level: str, mode: str, native: bool) -> Dict[str, Callable[[], object]]:
    """Each row's call; fwd+bwd ones return the input gradients. native: the CPU has bf16 arithmetic
    (else the rows that would run the same float32 path as selfattn-bf16 are left out)."""
    torch.manual_seed(0)
    out = {}
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        ours, sdpa, inputs = _forwards(shape, causal, level, dtype)
        leaves = [t.requires_grad_(mode != "fwd") for t in inputs]
        grad_out = torch.randn_like(ours(*leaves)).detach()
        call = partial(_timed_call, leaves=leaves, grad_out=grad_out, mode=mode)
        out[f"selfattn-{tag}"] = call(ours)
        if dtype == torch.bfloat16:
            out["sdpa-bf16"] = call(sdpa)
            if native:
                out[f"selfattn-bf16 ({other_tile_gemm()})"] = with_settings(call(ours), SELFATTN_BF16_GEMM=other_tile_gemm())
                out["selfattn-bf16 (fp32 path)"] = with_settings(call(ours), SELFATTN_BF16_KERNELS="0")
    return out


def probes(size: int, native: bool) -> Dict[str, Callable[[], object]]:
    """The GEMM-rate probes timed in the same rounds: sgemm, and bf16 matmul where bf16 has arithmetic."""
    dtypes = {"sgemm": torch.float32, "bf16 matmul": torch.bfloat16} if native else {"sgemm": torch.float32}
    out = {}
    for name, dtype in dtypes.items():
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        out[f"{name} {size}³"] = partial(torch.mm, a, b)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser("bf16", __doc__)
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help=f"BxNxExH[,...] (default {SHAPES}; --quick {QUICK_SHAPES})")
    p.add_argument("--levels", default=None, help="comma-separated, of core, layer (default both; --quick without "
                   "bf16 arithmetic: core)")
    p.add_argument("--gemm-size", type=int, default=None,
                   help=f"the probes' square GEMMs (default {GEMM_SIZE}; --quick {QUICK_GEMM_SIZE})")
    args = p.parse_args(argv)
    dev = start(args)
    header = machine(dev)
    native = bf16_arithmetic()
    levels = args.levels.split(",") if args.levels else ["core"] if args.quick and not native else ["core", "layer"]
    size = args.gemm_size or (QUICK_GEMM_SIZE if args.quick else GEMM_SIZE)
    notes = [f"{args.repeats} interleaved rounds; shapes B x N x E x H (core: q, k, v (B, H, N, E/H))",
             f"{OURS} speedup over a row: t_row / t_{OURS} per round (> 1: {OURS} faster)"]
    if not native:
        notes.append(f"skipped: {no_bf16_note()}; the bf16 kernels run the float32 path here, so the other tile "
                     "GEMM and float32-path rows, the bf16 matmul probe" +
                     (" and (--quick) the layer level" if args.quick and not args.levels else "") + " are not timed")
    outcomes: List[Outcome] = []
    for shape in args.shapes or parse_shapes(QUICK_SHAPES if args.quick else SHAPES):
        for level in levels:
            for causal in (False, True):
                for mode in ("fwd", "fwd+bwd"):
                    fns = calls(shape, causal, level, mode, native)
                    gemms = probes(size, native)
                    comparisons = [(f"{OURS} speedup over {name}", name, OURS) for name in fns if name != OURS]
                    case = f"{shape.batch}x{shape.seq}x{shape.embed}x{shape.heads} {level} " \
                           f"{'causal' if causal else 'not causal'} {mode}"
                    outcome = contest(dev, {**fns, **gemms}, comparisons, args.repeats, args.quick, case,
                                      grad=mode != "fwd")
                    flops = attention_flops(shape, causal, mode) + (projection_flops(shape, mode) if level == "layer"
                                                                    else 0)
                    rate = flops / (outcome.times[OURS].median_ms / 1e3)
                    outcome.extra[f"{OURS} GFLOP/s"] = rate / 1e9
                    for name in gemms:
                        gemm_rate = 2.0 * size**3 / (outcome.times[name].median_ms / 1e3)
                        outcome.extra[f"% of {name}"] = 100 * rate / gemm_rate
                    outcomes.append(outcome)
    write_json(args, "bf16", header, outcomes, gemm_size=size, bf16_arithmetic=native, levels=levels)
    notes.append("rates: " + "; ".join(f"{o.case}: " + ", ".join(f"{k} {v:.3g}" for k, v in o.extra.items())
                                       for o in outcomes))
    print(markdown("bfloat16 on the CPU: selfattn's bf16 kernels against SDPA-bf16 and selfattn's other paths",
                   header, outcomes, notes))
    return 0
