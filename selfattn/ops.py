"""The public functions over torch.ops.selfattn.* (attention and the fused layer).

The C++ library registers the ops; their schemas, with what each argument means, are in one place:
csrc/selfattn.cpp (`python -c "import selfattn, torch; print(torch.ops.selfattn.attention_fwd.default._schema)"`
prints one). Each op's autograd (reverse and forward mode, torch.func, the refusal of second
derivatives) and batching rule are generated from its description in the op table (_op_table.py,
_autograd.py, _vmap.py).

Dropout (rng.py): rng_state, int64 (seed, offset) on the inputs' device, decides the keep mask; the
public functions draw it from the device's default generator when it is not given.

Each op checks its arguments and allocates its outputs in C++ on every dispatch key, Meta
included, which meta tensors and torch.compile's fake tensors reach (csrc/checks.cpp,
csrc/op_kernels.h). This file offers the two public functions, which resolve ``scale`` and accept
SDPA's spellings, and pass the ops' arguments by name; the ops check the rest.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _autograd, masks
from ._args import check_bool, check_int, dropout_args, require_tensor, resolve_scale

# ---------------------------------------------------------------------------------------------
# Argument normalisation. The ops check every argument themselves (csrc/checks.cpp, on every
# dispatch key); the public functions only turn SDPA's spellings, 3-D inputs and scale=None into
# the ops' arguments, checking just what that needs (_args.py).


def _broadcasts(shape, full) -> bool:
    return len(shape) == len(full) and all(m == f or m == 1 for m, f in zip(shape, full))


def _layer_mask(key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], batch: int, seq: int,
                num_heads: int, single: bool, device: torch.device) -> Optional[Tensor]:
    """The layer's one mask tensor for the op, or None.

    key_padding_mask (B, N) bool, True = a real token, becomes a (B, 1, 1, N) view (the op
    expands it with stride 0); an attn_mask of fewer than 4 dims gets leading dims of 1 (SDPA's
    broadcasting). Both given: one mask of the broadcast of their shapes — (B, 1, N, N) for an
    (N, N) attn_mask — bool: both must allow; float: -inf where the key is padding.
    """
    if key_padding_mask is not None:
        require_tensor(key_padding_mask, "key_padding_mask")
        expected = [seq] if single else [batch, seq]
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"selfattn: key_padding_mask must be bool (True = a real token), got "
                            f"{key_padding_mask.dtype}")
        if key_padding_mask.device != device:
            raise ValueError(f"selfattn: key_padding_mask must be on the device of x ({device}), got "
                             f"{key_padding_mask.device}")
        if list(key_padding_mask.shape) != expected:
            what = "(N,) for a single sequence" if single else "(B, N)"
            raise ValueError(f"selfattn: key_padding_mask must have shape {what} = {expected}, got "
                             f"{list(key_padding_mask.shape)}")
        key_padding_mask = key_padding_mask.reshape(batch, seq)[:, None, None, :]  # a view
    if attn_mask is not None:
        require_tensor(attn_mask, "attn_mask")
        if attn_mask.dim() < 4:
            attn_mask = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if key_padding_mask is None:
        return attn_mask
    if attn_mask is None:
        return key_padding_mask
    if not _broadcasts(attn_mask.shape, (batch, num_heads, seq, seq)):
        return attn_mask  # the op names the mask's shape
    if attn_mask.dtype == torch.bool:
        return attn_mask & key_padding_mask
    if attn_mask.is_floating_point():
        return torch.where(key_padding_mask, attn_mask, float("-inf"))
    return attn_mask  # the op names the mask's dtype


def _score_mods(softcap, alibi_slopes, sinks) -> dict:
    """The score-modification arguments that differ from their defaults, by the ops' names (the
    op checks their values)."""
    scores = {}
    if softcap != 0.0:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"selfattn: softcap must be a float, got {type(softcap).__name__}")
        scores["softcap"] = float(softcap)
    if alibi_slopes is not None:
        require_tensor(alibi_slopes, "alibi_slopes")
        scores["alibi_slopes"] = alibi_slopes
    if sinks is not None:
        require_tensor(sinks, "sinks")
        scores["sinks"] = sinks
    return scores


# ---------------------------------------------------------------------------------------------
# Public functions


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
              causal=False, window=None, rng_state: Optional[Tensor] = None, softcap: float = 0.0,
              alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """softmax(scale · q kᵀ + mask) v, with the meaning of ``F.scaled_dot_product_attention``.

    Arguments in SDPA's order, so a call written for SDPA works unchanged.
    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), any strides, or (B, N, D) without a
    head dim. Returns (B, Hq, Nq, Dv) (or (B, Nq, Dv)), laid out in memory as (B, Nq, Hq, Dv) so
    that ``out.transpose(1, 2).flatten(2)`` is free.

    * ``attn_mask``: bool (True = take part) or float (added to the scaled scores; float32 or q's
      dtype), broadcastable to (B, Hq, Nq, Nk) — size-1 and stride-0 dims are read through their
      strides, never expanded; or ``torch.nn.attention.bias.causal_upper_left`` /
      ``causal_lower_right``. Its gradient is not computed: a mask that requires grad is refused.
    * ``is_causal`` / ``causal``: True is top-left (SDPA's meaning: query i sees keys j <= i);
      ``causal="bottom_right"``: query i sees keys j <= i + Nk - Nq (a KV cache). Unlike SDPA,
      causal and attn_mask may be combined: both apply.
    * ``window=(left, right)``: query i sees keys i + off - left <= j <= i + off + right, -1 for an
      unbounded side; off = 0, or Nk - Nq under ``causal="bottom_right"`` (FlashAttention aligns
      its window bottom-right always). Under causal, right > 0 is clamped to 0.
    * ``enable_gqa``: Hk may divide Hq (grouped-query attention); k and v are not repeated.
    * ``scale=None`` is 1/sqrt(D).

    * ``dropout_p`` in [0, 1): after the softmax, each probability is kept with probability
      1 - p and scaled by 1/(1 - p), as SDPA does — whenever p > 0 (there is no training flag;
      modules pass 0 in eval). The keep mask comes from ``rng_state``, int64 (seed, offset) on q's
      device, drawn from the device's default generator when not given (so ``torch.manual_seed``
      reproduces it and ``torch.utils.checkpoint`` recomputes the same); pass one to reuse a
      mask. ``selfattn.dropout_mask(rng_state, (B, Hq, Nq, Nk), p)`` returns that mask.

    Score modifications (FlashAttention's and Gemma 2's ``softcap``, FlashAttention's
    ``alibi_slopes``, GPT-OSS's ``sinks``), applied in this order to the scaled score
    s = scale · q kᵀ before the causal band, window, attn_mask or dropout:

    * ``softcap`` > 0: s becomes softcap · tanh(s / softcap) (0, the default: off).
    * ``alibi_slopes``: float32 (Hq,) or (B, Hq); adds -slope · |i + off - j| with off the
      diagonal offset above (0, or Nk - Nq under ``causal="bottom_right"``: FlashAttention's
      |i + Nk - Nq - j|). lse includes the bias as written. Not differentiable: slopes that
      require grad are refused.
    * ``sinks``: (Hq,), float32 or q's dtype, differentiable: each row's softmax gets one more
      logit sinks[h] that carries no value, so out_i = Σ_j e^{s_ij} v_j / (e^{sinks[h]} + Σ_j e^{s_ij}).
      A row that sees no key gets output 0 and contributes nothing to sinks.grad.

    A query that sees no key gets output 0 (SDPA ≥ 2.5 too) and zero gradients, never NaN.
    """
    if dropout_p != 0.0 or rng_state is not None:
        dropout_p, rng_state = dropout_args(dropout_p, rng_state, q.device if isinstance(q, Tensor) else None)
    if not isinstance(is_causal, bool):
        raise TypeError(f"selfattn: is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and causal not in (False, True, "top_left"):
        raise ValueError(f"selfattn.attention: is_causal=True (top-left) and causal={causal!r} disagree; pass one")
    # One test on the common path (a small call spends most of its time in such Python).
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        for t, name in ((q, "q"), (k, "k"), (v, "v")):
            require_tensor(t, name)
    shape = q.shape  # once: each tensor attribute read costs ~0.1 µs
    three_d = len(shape) == 3
    if three_d:
        if k.dim() != 3 or v.dim() != 3:
            raise ValueError("selfattn: q, k and v must all be 3-D (B, N, D) or all 4-D (B, H, N, D), got "
                             f"shapes {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    if not enable_gqa and q.dim() == 4 and k.dim() == 4 and q.shape[1] != k.shape[1]:
        raise ValueError(f"selfattn: q has {q.shape[1]} heads and k {k.shape[1]}: pass enable_gqa=True for "
                         "grouped-query attention (Hk dividing Hq), or give k and v q's heads")
    # (The plain call skips building the modifications' dict: one test of each.)
    scores = (_score_mods(softcap, alibi_slopes, sinks)
              if softcap != 0.0 or alibi_slopes is not None or sinks is not None else {})
    if (attn_mask is None and window is None and causal is False and not is_causal and rng_state is None
            and not scores):
        # no mask, no dropout, no score modification: skip masks.py
        out = _autograd.attention(q, k, v, False, resolve_scale(scale, shape[-1] if shape else 0))
    else:
        if q.dim() < 3 or k.dim() < 3:  # the op says what is wrong; a mask needs Nq and Nk first
            mask = masks.NO_MASK
        else:
            mask = masks.mask_args(attn_mask, is_causal or causal, window, q.shape[-2], k.shape[-2],
                                   3 if three_d else 4)
        # The mask's arguments travel by name (masks.MaskArgs holds them under the ops' names).
        out = _autograd.attention(q, k, v, scale=resolve_scale(scale, shape[-1] if shape else 0),
                                  dropout_p=dropout_p, rng_state=rng_state, **mask.by_name(), **scores)
    return out.squeeze(1) if three_d else out


def self_attention(x: Tensor, w_qkv: Tensor, b_qkv: Optional[Tensor] = None, *, num_heads: int = 1,
                   num_kv_heads: Optional[int] = None, causal: bool = False, scale: Optional[float] = None,
                   key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                   window: Optional[tuple] = None, dropout_p: float = 0.0,
                   rng_state: Optional[Tensor] = None, softcap: float = 0.0,
                   alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """Projections and multi-head (or grouped-query) attention in one op, with no output projection.

    x (N, E) or (B, N, E). With H = ``num_heads``, Hkv = ``num_kv_heads`` (default H; it must
    divide H: query head h reads kv head h // (H // Hkv); 1 is multi-query attention) and head
    dim D: w_qkv ((H + 2·Hkv)·D, E) in nn.Linear layout, rows q heads, then k heads, then v heads
    (Llama's ``q_proj; k_proj; v_proj`` weights stacked; with Hkv = H it is
    nn.MultiheadAttention's in_proj_weight); b_qkv the same rows, or None. Returns (…, N, H·D)
    with the heads side by side. ``scale=None`` is 1/sqrt(D).

    Masks (all that are given apply together):

    - ``causal``: query i sees keys j <= i (Nq = Nk here, so top-left and bottom-right agree).
    - ``window=(left, right)``: query i sees keys i - left <= j <= i + right, -1 for an unbounded
      side (FlashAttention's ``window_size``); with ``causal``, right is clamped to 0.
    - ``key_padding_mask`` (B, N) bool ((N,) for a single sequence), **True = a real token**
      (nn.MultiheadAttention's is the inverse: True = padding). Keys that are padding take no
      part. A padded query row is still computed — it attends to the real keys — as with SDPA
      and a key-padding mask; ignore those rows downstream. Passed to the op as a (B, 1, 1, N)
      view, never expanded in memory.
    - ``attn_mask`` as in ``selfattn.attention``: bool (True = take part) or float (added to the
      scaled scores; float32 or x's dtype), broadcastable to (B, H, N, N); fewer than 4 dims get
      leading dims of 1 (an (N, N) mask is shared by every batch and head). It cannot require grad.
      Given with ``key_padding_mask``, the two become one mask of their broadcast shape — (B, 1,
      N, N) for an (N, N) or (1, 1, N, N) attn_mask (bool: both must allow; float: -inf on
      padded keys) — the only case where a mask of N² elements per batch is built.

    ``dropout_p`` and ``rng_state`` as in ``selfattn.attention`` (applied whenever p > 0;
    ``SelfAttention`` passes its dropout in training mode only).

    ``softcap``, ``alibi_slopes`` ((H,) or (B, H)) and ``sinks`` ((H,), differentiable) as in
    ``selfattn.attention``.

    A row that sees no key (all its keys masked) gives 0.
    """
    causal = check_bool(causal, "causal")
    dropout_p, rng_state = dropout_args(dropout_p, rng_state, x.device if isinstance(x, Tensor) else None)
    num_heads = check_int(num_heads, "num_heads")
    num_kv_heads = 0 if num_kv_heads is None else check_int(num_kv_heads, "num_kv_heads")
    window = masks.window_arguments(window)
    require_tensor(x, "x")
    require_tensor(w_qkv, "w_qkv")
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    # head_dim for scale=None; 0 when the arguments cannot give one (the op then says why).
    slots = num_heads + 2 * (num_kv_heads or num_heads)
    head_dim = w_qkv.shape[0] // slots if w_qkv.dim() == 2 and num_heads > 0 and slots > 0 else 0
    scale = resolve_scale(scale, head_dim)
    mask = None
    if key_padding_mask is not None or attn_mask is not None:
        if x.dim() != 3:  # the op names x's shape
            mask = attn_mask
        else:
            mask = _layer_mask(key_padding_mask, attn_mask, x.shape[0], x.shape[1], num_heads, single, x.device)
    out, _, _ = _autograd.forward("self_attention_fwd", x=x, w_qkv=w_qkv, b_qkv=b_qkv, num_heads=num_heads,
                                  causal=causal, scale=scale, num_kv_heads=num_kv_heads, attn_mask=mask,
                                  dropout_p=dropout_p, rng_state=rng_state, **window,
                                  **_score_mods(softcap, alibi_slopes, sinks))
    return out.squeeze(0) if single else out
