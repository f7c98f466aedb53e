"""Everything a user may pass as a mask, turned into the one description the ops take.

The ops (csrc/mask.h) take a band of visible keys — ``causal``, ``window_left``,
``window_right`` and an integer ``diagonal_offset`` (query i sits at key position
i + offset) — and at most one tensor mask, 4-D and broadcastable to (B, Hq, Nq, Nk), read
through its strides. This module maps the public spellings onto that, never expanding a mask
in memory:

* ``causal``: False, True (= "top_left", SDPA's ``is_causal``: query i sees keys j <= i), or
  "bottom_right" (query i sees keys j <= i + Nk - Nq: a KV cache's last Nq positions);
* ``window=(left, right)``: FlashAttention's sliding window, -1 for an unbounded side; aligned
  top-left unless causal is "bottom_right" (FlashAttention's window is always bottom-right);
  under causal a right side > 0 is clamped to 0;
* ``attn_mask``: a bool (True = take part) or float (added to the scaled scores) tensor
  broadcastable to (B, Hq, Nq, Nk), or one of torch.nn.attention.bias's
  ``causal_upper_left`` / ``causal_lower_right`` objects (structural: no tensor, tiles skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

CAUSAL_SPELLINGS = (False, True, "top_left", "bottom_right")


@dataclass(frozen=True)
class MaskArgs:
    """The ops' mask arguments, under the ops' names (the public functions pass them by name)."""

    causal: bool
    attn_mask: Optional[Tensor]
    window_left: int
    window_right: int
    diagonal_offset: int

    def by_name(self) -> dict:
        # Spelt out: dynamo in torch 2.6 cannot trace vars() or dataclasses.asdict() of a frozen dataclass.
        return {"causal": self.causal, "attn_mask": self.attn_mask, "window_left": self.window_left,
                "window_right": self.window_right, "diagonal_offset": self.diagonal_offset}


NO_MASK = MaskArgs(False, None, -1, -1, 0)


def causal_alignment(causal) -> Optional[str]:
    """None (not causal), "top_left" or "bottom_right"."""
    if causal is False or causal is None:
        return None
    if causal is True or causal == "top_left":
        return "top_left"
    if causal == "bottom_right":
        return "bottom_right"
    raise ValueError(f"selfattn: causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")


def window_sides(window) -> Tuple[int, int]:
    """(left, right) of a window=(left, right) argument; (-1, -1) for None."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"selfattn: window must be a pair (left, right) of ints, -1 for unbounded, got {window!r}")
    left, right = window
    for side, name in ((left, "left"), (right, "right")):
        if isinstance(side, bool) or not isinstance(side, int):
            raise TypeError(f"selfattn: window's {name} side must be an int, got {type(side).__name__}")
    return left, right  # (the op checks the values)


def window_arguments(window) -> dict:
    """The ops' window arguments, by name, for a window=(left, right) argument."""
    left, right = window_sides(window)
    return {"window_left": left, "window_right": right}


def _bias_alignment(bias: CausalBias, nq: int, nk: int) -> str:
    if (bias.seq_len_q, bias.seq_len_kv) != (nq, nk):
        raise ValueError(f"selfattn: attn_mask is a causal bias for ({bias.seq_len_q}, {bias.seq_len_kv}) "
                         f"queries and keys, but q and k have {nq} and {nk}")
    return "top_left" if bias.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def mask_args(attn_mask, causal, window, nq: int, nk: int, mask_rank_of_inputs: int = 4) -> MaskArgs:
    """The ops' mask arguments for q of Nq rows and k of Nk rows.

    ``mask_rank_of_inputs`` is the rank of the caller's q (3 for SDPA's (B, N, D) inputs, which
    the caller has given a head dim of 1: a mask broadcasting to (B, Nq, Nk) then gains it too).
    """
    alignment = causal_alignment(causal)
    tensor_mask = None
    if isinstance(attn_mask, CausalBias):
        bias_alignment = _bias_alignment(attn_mask, nq, nk)
        if alignment is not None and alignment != bias_alignment:
            raise ValueError(f"selfattn: attn_mask is a {bias_alignment} causal bias, but causal is {causal!r}")
        alignment = bias_alignment
    elif attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"selfattn: attn_mask must be a tensor, a causal bias or None, got "
                            f"{type(attn_mask).__name__}")
        tensor_mask = attn_mask
        if mask_rank_of_inputs == 3 and tensor_mask.dim() == 3:
            tensor_mask = tensor_mask.unsqueeze(1)
        if tensor_mask.dim() < 4:  # broadcasting aligns trailing dims: add leading ones (a view)
            tensor_mask = tensor_mask.view((1,) * (4 - tensor_mask.dim()) + tuple(tensor_mask.shape))
    left, right = window_sides(window)
    offset = nk - nq if alignment == "bottom_right" else 0
    return MaskArgs(alignment is not None, tensor_mask, left, right, offset)
