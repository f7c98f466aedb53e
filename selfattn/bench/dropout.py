"""``python -m selfattn.bench --sweep dropout``: what dropout costs selfattn and SDPA.

selfattn.attention and F.scaled_dot_product_attention at dropout_p = 0 and at p (default 0.1),
float32, not causal, forward (under torch.no_grad) and forward+backward (autograd.grad of q, k
and v), the four calls interleaved in each round. Reported: the median (min–max) time per call;
each one's dropout cost, t(p) / t(0) per round; and selfattn's speedup over SDPA at p,
t_sdpa / t_selfattn per round (> 1: selfattn faster).

    python -m selfattn.bench --sweep dropout [--shapes 4x8x1024x64] [--p 0.1] [--repeats 9]
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import selfattn

from .contest import Outcome, contest, machine, markdown, parse_bhnd, parser, start, with_backward, write_json

SHAPES, QUICK_SHAPES = "4x8x1024x64", "2x4x256x64"
MODES = ("fwd", "fwd+bwd")


def calls(shape: Tuple[int, int, int, int], p: float, mode: str) -> Dict[str, Callable[[], object]]:
    """selfattn and SDPA at dropout 0 and p; fwd+bwd calls return the input gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape)
    forwards = {f"{name} p={p_}": partial(fn, dropout_p=p_) for name, fn in
                (("selfattn", selfattn.attention), ("sdpa", F.scaled_dot_product_attention)) for p_ in (0.0, p)}
    if mode == "fwd":
        return {name: partial(f, q, k, v) for name, f in forwards.items()}
    return {name: with_backward(f, (q, k, v), grad_out) for name, f in forwards.items()}


def comparisons(p: float):
    return [("selfattn dropout cost, t(p) / t(0)", f"selfattn p={p}", "selfattn p=0.0"),
            ("SDPA dropout cost, t(p) / t(0)", f"sdpa p={p}", "sdpa p=0.0"),
            (f"selfattn speedup over SDPA at p={p}", f"sdpa p={p}", f"selfattn p={p}")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser("dropout", __doc__)
    p.add_argument("--shapes", type=parse_bhnd, default=None,
                   help=f"BxHxNxD[,...] (default {SHAPES}; --quick {QUICK_SHAPES})")
    p.add_argument("--p", type=float, default=0.1, help="the dropout probability (default %(default)s)")
    args = p.parse_args(argv)
    if not 0 < args.p < 1:
        raise SystemExit("selfattn.bench --sweep dropout: --p must lie in (0, 1)")
    dev = start(args)
    header = machine(dev)
    outcomes: List[Outcome] = []
    for shape in args.shapes or parse_bhnd(QUICK_SHAPES if args.quick else SHAPES):
        for mode in MODES:
            outcomes.append(contest(dev, calls(shape, args.p, mode), comparisons(args.p), args.repeats, args.quick,
                                    f"{shape} {mode}", grad=mode != "fwd"))
    write_json(args, "dropout", header, outcomes, p=args.p)
    print(markdown(f"Dropout's cost: selfattn vs SDPA, p = 0 and {args.p}, float32", header, outcomes,
                   [f"{args.repeats} interleaved rounds; (B, H, N, D), not causal",
                    "fwd: under torch.no_grad(); fwd+bwd: forward, then autograd.grad of q, k, v"]))
    return 0
