"""``python -m selfattn.bench --sweep overhead``: the per-call time of selfattn.attention against
F.scaled_dot_product_attention on tiny inputs, where the Python and dispatcher overhead is most of
the cost.

For each shape (B, H, N, D) (Nq = Nk = N, float32) and mode — ``no grad`` (the calls inside
torch.no_grad()) and ``grad`` (inputs requiring grad, forward only: the autograd graph is built) —
the two are timed in interleaved rounds, each sample a loop of calls. Reported: the median
(min–max) time per call and selfattn's speedup over SDPA, t_sdpa / t_selfattn per round (> 1:
selfattn's call is cheaper).

    python -m selfattn.bench --sweep overhead [--shapes 1x1x1x64,1x32x1x128] [--repeats 9] [--threads 1]
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import selfattn

from .contest import Outcome, contest, machine, markdown, parse_bhnd, parser, start, write_json

SHAPES = "1x1x1x64,1x32x1x128"
MODES = ("no grad", "grad")


def calls(shape: Tuple[int, int, int, int], mode: str) -> Dict[str, Callable[[], torch.Tensor]]:
    q, k, v = (torch.randn(shape).requires_grad_(mode == "grad") for _ in range(3))
    return {"selfattn": lambda: selfattn.attention(q, k, v), "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser("overhead", __doc__)
    p.add_argument("--shapes", type=parse_bhnd, default=parse_bhnd(SHAPES), help=f"BxHxNxD[,...] (default {SHAPES})")
    args = p.parse_args(argv)
    dev = start(args)
    header = machine(dev)
    outcomes: List[Outcome] = []
    for shape in args.shapes:
        for mode in MODES:
            outcomes.append(contest(dev, calls(shape, mode), [("selfattn speedup over SDPA", "sdpa", "selfattn")],
                                    args.repeats, args.quick, f"{shape} {mode}", grad=mode == "grad"))
    write_json(args, "overhead", header, outcomes)
    print(markdown("Per-call overhead: selfattn.attention vs SDPA, float32", header, outcomes,
                   [f"{args.repeats} interleaved rounds; a sample is a loop of calls; (B, H, N, D), Nq = Nk = N",
                    "no grad: under torch.no_grad(); grad: inputs require grad, forward only"]))
    return 0
