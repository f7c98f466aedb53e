"""``python -m selfattn.bench --sweep jvp``: forward mode on the CPU, float32.

torch.func.jvp of selfattn.attention (its forward op, then the attention_jvp op) against
torch.func.jvp of F.scaled_dot_product_attention under the math backend (matmul, softmax, matmul
with forward AD, an N×N matrix; SDPA's other CPU backends refuse forward mode), interleaved.
Reported: the median (min–max) time per jvp call, selfattn's speedup over SDPA math,
t_math / t_selfattn per round (> 1: selfattn faster), and the largest difference between the two
tangents (what is timed computes the same derivative).

    python -m selfattn.bench --sweep jvp [--shapes 1x8x1024x64,2x16x256x64] [--causal both] [--repeats 7]
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import selfattn

from .contest import Outcome, contest, machine, markdown, parse_bhnd, parser, start, write_json

SHAPES, QUICK_SHAPES = "1x8x1024x64,2x16x256x64", "1x4x128x32"


def calls(shape: Tuple[int, int, int, int], causal: bool) -> Dict[str, Callable[[], Tuple[torch.Tensor, ...]]]:
    """Each returns jvp's (output, tangent) for the same inputs and tangents."""
    torch.manual_seed(0)
    primals = tuple(torch.randn(shape) for _ in range(3))
    tangents = tuple(torch.randn(shape) for _ in range(3))

    def ours():
        return torch.func.jvp(lambda q, k, v: selfattn.attention(q, k, v, is_causal=causal), primals, tangents)

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                  primals, tangents)
    return {"selfattn": ours, "sdpa math": math}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser("jvp", __doc__)
    p.add_argument("--shapes", type=parse_bhnd, default=None,
                   help=f"BxHxNxD[,...] (default {SHAPES}; --quick {QUICK_SHAPES})")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    args = p.parse_args(argv)
    dev = start(args)
    header = machine(dev)
    outcomes: List[Outcome] = []
    for shape in args.shapes or parse_bhnd(QUICK_SHAPES if args.quick else SHAPES):
        for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
            fns = calls(shape, causal)
            tangents = [fn()[1] for fn in fns.values()]  # (also a first warm-up)
            outcome = contest(dev, fns, [("selfattn speedup over SDPA math", "sdpa math", "selfattn")],
                              args.repeats, args.quick, f"{shape} {'causal' if causal else 'not causal'}", grad=False)
            outcome.extra["max_tangent_difference"] = (tangents[0] - tangents[1]).abs().max().item()
            outcomes.append(outcome)
    write_json(args, "jvp", header, outcomes)
    notes = [f"{args.repeats} interleaved rounds; (B, H, N, D); torch.func.jvp with q, k, v all carrying tangents",
             "largest tangent difference, selfattn vs SDPA math: " +
             ", ".join(f"{o.case} {o.extra['max_tangent_difference']:.1e}" for o in outcomes)]
    print(markdown("Forward mode (jvp): selfattn vs SDPA math, float32", header, outcomes, notes))
    return 0
