"""The public functions over torch.ops.selfattn.*, their fake kernels and their autograd.

The C++ library (csrc/) registers four ops with the dispatcher:

    attention_fwd(q, k, v, causal, scale) -> (out, lse)
    attention_bwd(grad_out, q, k, v, out, lse, causal, scale) -> (grad_q, grad_k, grad_v)
    self_attention_fwd(x, w_qkv, b_qkv, num_heads, causal, scale) -> (out, qkv, lse)
    self_attention_bwd(grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale, output_mask)
        -> (grad_x, grad_w, grad_b)

This file gives each a fake kernel (shapes, dtypes and strides, for torch.compile and meta
tensors; it checks the arguments as the C++ op does, with _checks.py), wires the backward ops in
as the forward ops' autograd, and offers the two public functions, which resolve ``scale`` and
accept SDPA's spellings; the ops check the rest.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _checks, masks

_ops = torch.ops.selfattn


# ---------------------------------------------------------------------------------------------
# Argument normalisation. The ops check every argument themselves (csrc/checks.cpp, and
# _checks.py in the fake kernels); the public functions only turn SDPA's spellings, 3-D inputs
# and scale=None into the ops' arguments, checking just what that needs.


def _require_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"selfattn: {name} must be a torch.Tensor, got {type(t).__name__}")


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"selfattn: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"selfattn: causal must be a bool, got {type(causal).__name__}")
    return causal


def _check_num_heads(num_heads) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"selfattn: num_heads must be an int, got {type(num_heads).__name__}")
    return num_heads


# ---------------------------------------------------------------------------------------------
# Public functions


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
              causal=False, window=None) -> Tensor:
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

    A query that sees no key gets output 0 (SDPA ≥ 2.5 too) and zero gradients, never NaN.
    ``dropout_p > 0`` is not supported yet and is refused.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(f"selfattn.attention: dropout_p must be 0.0 (dropout is not supported "
                                  f"yet), got {dropout_p}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"selfattn: is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and causal not in (False, True, "top_left"):
        raise ValueError(f"selfattn.attention: is_causal=True (top-left) and causal={causal!r} disagree; pass one")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _require_tensor(t, name)
    three_d = q.dim() == 3
    if three_d:
        if k.dim() != 3 or v.dim() != 3:
            raise ValueError("selfattn: q, k and v must all be 3-D (B, N, D) or all 4-D (B, H, N, D), got "
                             f"shapes {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    if not enable_gqa and q.dim() == 4 and k.dim() == 4 and q.shape[1] != k.shape[1]:
        raise ValueError(f"selfattn: q has {q.shape[1]} heads and k {k.shape[1]}: pass enable_gqa=True for "
                         "grouped-query attention (Hk dividing Hq), or give k and v q's heads")
    if q.dim() < 3 or k.dim() < 3:  # the op says what is wrong; a mask needs Nq and Nk first
        mask = masks.MaskArgs(False, None, -1, -1, 0)
    else:
        mask = masks.mask_args(attn_mask, is_causal or causal, window, q.shape[-2], k.shape[-2],
                               3 if three_d else 4)
    out, _ = _ops.attention_fwd(q, k, v, mask.causal, _resolve_scale(scale, q.shape[-1]), mask.attn_mask,
                                mask.window_left, mask.window_right, mask.diagonal_offset)
    return out.squeeze(1) if three_d else out


def self_attention(x: Tensor, w_qkv: Tensor, b_qkv: Optional[Tensor] = None, *, num_heads: int = 1,
                   causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """Projections and multi-head attention in one op, with no output projection.

    x (N, E) or (B, N, E); w_qkv (3·M, E) = [W_q; W_k; W_v] in nn.Linear layout (as
    nn.MultiheadAttention's in_proj_weight); b_qkv (3·M) or None. Returns (…, N, M) with the
    heads side by side. ``scale=None`` is 1/sqrt(M / num_heads).
    """
    causal = _check_causal(causal)
    num_heads = _check_num_heads(num_heads)
    _require_tensor(x, "x")
    _require_tensor(w_qkv, "w_qkv")
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    # head_dim for scale=None; 0 when the arguments cannot give one (the op then says why).
    head_dim = w_qkv.shape[0] // 3 // num_heads if w_qkv.dim() == 2 and num_heads > 0 else 0
    scale = _resolve_scale(scale, head_dim)
    out, _, _ = _ops.self_attention_fwd(x, w_qkv, b_qkv, num_heads, causal, scale)
    return out.squeeze(0) if single else out


# ---------------------------------------------------------------------------------------------
# Fake kernels: outputs with the shapes, dtypes and strides the C++ kernels give.


@torch.library.register_fake("selfattn::attention_fwd")
def _attention_fwd_fake(q, k, v, causal, scale, attn_mask=None, window_left=-1, window_right=-1,
                        diagonal_offset=0):
    s = _checks.check_attention_inputs(q, k, v, scale)
    _checks.check_mask_inputs(s, q, attn_mask, window_left, window_right)
    out = q.new_empty((s.batch, s.nq, s.heads, s.dim_v)).transpose(1, 2)
    lse = q.new_empty((s.batch, s.heads, s.nq), dtype=_checks.accumulate_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("selfattn::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, causal, scale, attn_mask=None, window_left=-1,
                        window_right=-1, diagonal_offset=0):
    s = _checks.check_attention_inputs(q, k, v, scale)
    _checks.check_mask_inputs(s, q, attn_mask, window_left, window_right)
    _checks.check_attention_grad_inputs(s, q, grad_out, out, lse)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("selfattn::self_attention_fwd")
def _self_attention_fwd_fake(x, w_qkv, b_qkv, num_heads, causal, scale):
    s = _checks.check_layer_inputs(x, w_qkv, b_qkv, num_heads, scale)
    out = x.new_empty((s.batch, s.seq, s.model))
    qkv = x.new_empty((s.batch, s.seq, 3 * s.model))
    lse = x.new_empty((s.batch, s.heads, s.seq), dtype=_checks.accumulate_dtype(x.dtype))
    return out, qkv, lse


@torch.library.register_fake("selfattn::self_attention_bwd")
def _self_attention_bwd_fake(grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale, output_mask):
    s = _checks.check_layer_inputs(x, w_qkv, None, num_heads, scale)
    _checks.check_layer_grad_inputs(s, x, grad_out, qkv, out, lse, output_mask)
    # A skipped gradient is an empty tensor of its own (outputs must not alias).
    grad_x = x.new_empty(x.shape if output_mask[0] else (0,))
    grad_w = x.new_empty(w_qkv.shape if output_mask[1] else (0,))
    grad_b = x.new_empty((3 * s.model,) if output_mask[2] else (0,))
    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# Autograd: each forward op's backward is the matching backward op. lse (and the fused op's
# qkv buffer) are kept for backward and are not differentiable.


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset = inputs
    if attn_mask is not None and attn_mask.requires_grad:
        # The kernels do not compute a mask's gradient; refuse rather than hand back None.
        raise NotImplementedError(
            "selfattn.attention: attn_mask requires grad, but selfattn does not compute the gradient "
            "of a mask; detach it, or use F.scaled_dot_product_attention for a learned additive mask")
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero tensor for lse's (absent) gradient
    ctx.save_for_backward(q, k, v, out, lse, attn_mask)
    ctx.mask_args = (causal, scale)
    ctx.window = (window_left, window_right, diagonal_offset)


def _attention_backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return (None,) * 9
    q, k, v, out, lse, attn_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = _ops.attention_bwd(grad_out, q, k, v, out, lse, *ctx.mask_args, attn_mask,
                                                *ctx.window)
    return (grad_q, grad_k, grad_v) + (None,) * 6


def _self_attention_setup_context(ctx, inputs, output):
    x, w_qkv, b_qkv, num_heads, causal, scale = inputs
    out, qkv, lse = output
    ctx.mark_non_differentiable(qkv, lse)
    # Otherwise autograd hands the backward a zero tensor the size of qkv (B·N·3M) as the
    # gradient of that non-differentiable output: measured +48 MiB peak at N = 8192, E = 512.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w_qkv, qkv, out, lse)
    ctx.has_bias = b_qkv is not None
    ctx.num_heads = num_heads
    ctx.causal = causal
    ctx.scale = scale


def _self_attention_backward(ctx, grad_out, _grad_qkv, _grad_lse):
    if grad_out is None:
        return None, None, None, None, None, None
    x, w_qkv, qkv, out, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask: Sequence[bool] = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2])]
    grad_x, grad_w, grad_b = _ops.self_attention_bwd(grad_out, x, w_qkv, qkv, out, lse, ctx.num_heads,
                                                     ctx.causal, ctx.scale, mask)
    return (grad_x if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
            None, None, None)


torch.library.register_autograd("selfattn::attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)
torch.library.register_autograd("selfattn::self_attention_fwd", _self_attention_backward,
                                setup_context=_self_attention_setup_context)
