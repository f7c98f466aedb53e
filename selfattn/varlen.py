"""Variable-length (packed) attention in FlashAttention's layout: the public function over
torch.ops.selfattn.varlen_attention_fwd / _bwd (csrc/varlen.cpp; their schemas in
csrc/selfattn.cpp, their autograd generated from the op table with the other ops'). It passes the
ops' arguments by name.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

from . import _autograd, masks
from ._args import check_bool, check_int, dropout_args, require_tensor, resolve_scale
from .ops import _score_mods


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: Union[bool, str] = False,
                     scale: Optional[float] = None, enable_gqa: bool = False,
                     window: Optional[Tuple[int, int]] = None, dropout_p: float = 0.0,
                     rng_state: Optional[Tensor] = None, softcap: float = 0.0,
                     alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """Attention over S sequences packed back to back, FlashAttention's varlen layout.

    q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv), any strides. ``cu_seqlens_q`` and
    ``cu_seqlens_k``: int32 (S + 1,) on q's device, starting at 0, non-decreasing, ending at Tq
    and Tk; sequence s is rows ``cu[s]:cu[s+1]`` of q (nq_s rows) and of k and v (nk_s rows), and
    attends to itself only. Empty sequences are allowed (a query row of a sequence with no key
    gives 0). ``max_seqlen_q`` / ``max_seqlen_k`` must be at least every sequence's length.
    Work is proportional to Σ nq_s·nk_s.

    Masks apply within each sequence. ``causal=True`` (or "top_left") is top-left aligned, as in
    ``selfattn.attention`` and SDPA: query i of a sequence sees its keys j <= i.
    **FlashAttention's varlen causal is bottom-right** when nq_s != nk_s (query i sees
    j <= i + nk_s - nq_s, the KV-cache alignment): pass ``causal="bottom_right"`` for that.
    ``window=(left, right)``, -1 for an unbounded side: query i sees keys
    i + off - left <= j <= i + off + right, with off = 0, or nk_s - nq_s under
    ``causal="bottom_right"`` (FlashAttention's window is always bottom-right); with causal set, a
    right side > 0 is clamped to 0. ``scale=None`` is 1/sqrt(D). Hk != Hq (grouped-query
    attention, Hk dividing Hq) needs ``enable_gqa=True``.

    ``dropout_p`` and ``rng_state`` as in ``selfattn.attention``; the keep decision of row i and
    key j of sequence s is that of element (s, h, i, j) of
    ``selfattn.dropout_mask(rng_state, (S, Hq, max_seqlen_q, max_seqlen_k), dropout_p)``.

    Returns out (Tq, Hq, Dv). The raw op ``torch.ops.selfattn.varlen_attention_fwd`` also
    returns lse (Hq, Tq), float32 (float64 for float64 inputs).

    The op needs the sequence boundaries on the host: on CUDA it copies both cu_seqlens to the
    host once per call (forward, and again in backward), which waits for the stream, so it cannot
    be captured in a CUDA graph.
    ``softcap``, ``alibi_slopes`` ((Hq,) or (S, Hq): a row per sequence; the distance within each
    sequence, |i + off_s - j| with off_s = 0, or nk_s - nq_s under ``causal="bottom_right"``) and
    ``sinks`` ((Hq,), differentiable) as in ``selfattn.attention``.
    """
    alignment = masks.causal_alignment(causal)  # the spellings of selfattn.attention
    dropout_p, rng_state = dropout_args(dropout_p, rng_state, q.device if isinstance(q, Tensor) else None)
    window = masks.window_arguments(window)
    check_bool(enable_gqa, "enable_gqa")
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        require_tensor(t, name)
    check_int(max_seqlen_q, "max_seqlen_q")
    check_int(max_seqlen_k, "max_seqlen_k")
    if q.dim() == 3 and k.dim() == 3 and q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(f"selfattn: q has {q.shape[1]} heads and k {k.shape[1]}: pass enable_gqa=True for "
                         "grouped-query attention (Hk dividing Hq), or give k and v q's heads")
    scale = resolve_scale(scale, q.shape[-1] if q.dim() >= 1 else 0)
    out, _ = _autograd.forward("varlen_attention_fwd", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                               causal=alignment is not None, scale=scale, bottom_right=alignment == "bottom_right",
                               dropout_p=dropout_p, rng_state=rng_state, **window,
                               **_score_mods(softcap, alibi_slopes, sinks))
    return out
