"""The public functions over torch.ops.selfattn.*, their fake kernels and their autograd.

The C++ library (csrc/) registers four ops with the dispatcher:

    attention_fwd(q, k, v, causal, scale) -> (out, lse)
    attention_bwd(grad_out, q, k, v, out, lse, causal, scale) -> (grad_q, grad_k, grad_v)
    self_attention_fwd(x, w_qkv, b_qkv, num_heads, causal, scale) -> (out, qkv, lse)
    self_attention_bwd(grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale, output_mask)
        -> (grad_x, grad_w, grad_b)

This file gives each a fake kernel (shapes, dtypes and strides, for torch.compile and meta
tensors), wires the backward ops in as the forward ops' autograd, and offers the two public
functions, which resolve ``scale``, accept SDPA's spellings and check their arguments.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

_ops = torch.ops.selfattn

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Argument checks. The C++ ops make the same checks for direct callers of torch.ops.selfattn;
# these run first, and in the fake kernels, so that torch.compile reports them at trace time.


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"selfattn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"selfattn: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_same(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"selfattn: {name} and {ref_name} must have the same dtype, got {t.dtype} and {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"selfattn: {name} and {ref_name} must be on the same device, got {t.device} and {ref.device}")


def _check_attention_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(t, name)
    for t, name, shape in ((q, "q", "(B, H, Nq, D)"), (k, "k", "(B, H, Nk, D)"), (v, "v", "(B, H, Nk, Dv)")):
        if t.dim() != 4:
            raise ValueError(f"selfattn: {name} must be 4-D {shape}, got shape {tuple(t.shape)}")
    _check_same(k, "k", q, "q")
    _check_same(v, "v", q, "q")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError("selfattn: q, k and v must have the same batch size (dim 0), got "
                         f"{q.shape[0]}, {k.shape[0]} and {v.shape[0]}")
    if not q.shape[1] == k.shape[1] == v.shape[1]:
        raise ValueError("selfattn: q, k and v must have the same number of heads (dim 1), got "
                         f"{q.shape[1]}, {k.shape[1]} and {v.shape[1]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"selfattn: k must have the head dim of q (dim 3), got {k.shape[3]} for k "
                         f"and {q.shape[3]} for q")
    if v.shape[2] != k.shape[2]:
        raise ValueError("selfattn: k and v must have the same sequence length (dim 2), got "
                         f"{k.shape[2]} and {v.shape[2]}")


def _check_layer_inputs(x: Tensor, w_qkv: Tensor, b_qkv: Optional[Tensor], num_heads: int) -> int:
    """Checks the fused op's arguments; returns model_dim."""
    _check_tensor(x, "x")
    _check_tensor(w_qkv, "w_qkv")
    if x.dim() != 3:
        raise ValueError(f"selfattn: x must be 3-D (B, N, E), got shape {tuple(x.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"selfattn: num_heads must be an int >= 1, got {num_heads!r}")
    if w_qkv.dim() != 2 or w_qkv.shape[0] % 3 != 0 or w_qkv.shape[0] == 0 or w_qkv.shape[1] != x.shape[2]:
        raise ValueError("selfattn: w_qkv must have shape (3 * model_dim, embed_dim) with embed_dim = "
                         f"x.size(-1) = {x.shape[2]}, got {tuple(w_qkv.shape)}")
    _check_same(w_qkv, "w_qkv", x, "x")
    model_dim = w_qkv.shape[0] // 3
    if model_dim % num_heads != 0:
        raise ValueError(f"selfattn: model_dim = w_qkv.size(0) / 3 = {model_dim} must be divisible by "
                         f"num_heads = {num_heads}")
    if b_qkv is not None:
        _check_tensor(b_qkv, "b_qkv")
        if tuple(b_qkv.shape) != (3 * model_dim,):
            raise ValueError(f"selfattn: b_qkv must have shape (3 * model_dim,) = ({3 * model_dim},), "
                             f"got {tuple(b_qkv.shape)}")
        _check_same(b_qkv, "b_qkv", x, "x")
    return model_dim


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


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Public functions


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, *, causal: bool = False, scale: Optional[float] = None,
              is_causal: Optional[bool] = None, enable_gqa: bool = False) -> Tensor:
    """softmax(scale · q kᵀ) v, the meaning of ``F.scaled_dot_product_attention``.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), any strides, or the same without the
    head dim (B, N, D). Nq may differ from Nk. ``causal`` (SDPA's ``is_causal`` is accepted
    too) masks top-left aligned, as SDPA does: query i sees keys j <= i. ``scale=None`` is
    1/sqrt(D). Returns (B, H, Nq, Dv) (or (B, Nq, Dv)), laid out in memory as (B, Nq, H, Dv)
    so that ``out.transpose(1, 2).flatten(2)`` is free.

    Not supported yet, and refused if passed: ``attn_mask``, ``dropout_p > 0``, ``enable_gqa``.
    """
    if attn_mask is not None:
        raise NotImplementedError("selfattn.attention: attn_mask is not supported yet (only causal "
                                  "masking is); use F.scaled_dot_product_attention for arbitrary masks")
    if dropout_p != 0.0:
        raise NotImplementedError(f"selfattn.attention: dropout_p must be 0.0 (dropout is not supported "
                                  f"yet), got {dropout_p}")
    if enable_gqa:
        raise NotImplementedError("selfattn.attention: enable_gqa is not supported yet; repeat k and v "
                                  "over the query heads instead")
    if is_causal is not None:
        if causal and not is_causal:
            raise ValueError("selfattn.attention: causal=True and is_causal=False disagree; pass one")
        causal = _check_causal(is_causal) or causal
    causal = _check_causal(causal)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(t, name)
    three_d = q.dim() == 3
    if three_d:
        if k.dim() != 3 or v.dim() != 3:
            raise ValueError("selfattn: q, k and v must all be 3-D (B, N, D) or all 4-D (B, H, N, D), got "
                             f"shapes {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    _check_attention_inputs(q, k, v)
    out, _ = _ops.attention_fwd(q, k, v, causal, _resolve_scale(scale, q.shape[-1]))
    return out.squeeze(1) if three_d else out


def self_attention(x: Tensor, w_qkv: Tensor, b_qkv: Optional[Tensor] = None, *, num_heads: int = 1,
                   causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """Projections and multi-head attention in one op, with no output projection.

    x (N, E) or (B, N, E); w_qkv (3·M, E) = [W_q; W_k; W_v] in nn.Linear layout (as
    nn.MultiheadAttention's in_proj_weight); b_qkv (3·M) or None. Returns (…, N, M) with the
    heads side by side. ``scale=None`` is 1/sqrt(M / num_heads).
    """
    causal = _check_causal(causal)
    _check_tensor(x, "x")
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    model_dim = _check_layer_inputs(x, w_qkv, b_qkv, num_heads)
    scale = _resolve_scale(scale, model_dim // num_heads)
    out, _, _ = _ops.self_attention_fwd(x, w_qkv, b_qkv, num_heads, causal, scale)
    return out.squeeze(0) if single else out


# ---------------------------------------------------------------------------------------------
# Fake kernels: outputs with the shapes, dtypes and strides the C++ kernels give.


@torch.library.register_fake("selfattn::attention_fwd")
def _attention_fwd_fake(q, k, v, causal, scale):
    _check_attention_inputs(q, k, v)
    batch, heads, nq, _ = q.shape
    out = q.new_empty((batch, nq, heads, v.shape[3])).transpose(1, 2)
    lse = q.new_empty((batch, heads, nq), dtype=_accumulate_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("selfattn::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
    _check_attention_inputs(q, k, v)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("selfattn::self_attention_fwd")
def _self_attention_fwd_fake(x, w_qkv, b_qkv, num_heads, causal, scale):
    model_dim = _check_layer_inputs(x, w_qkv, b_qkv, num_heads)
    batch, seq, _ = x.shape
    out = x.new_empty((batch, seq, model_dim))
    qkv = x.new_empty((batch, seq, 3 * model_dim))
    lse = x.new_empty((batch, num_heads, seq), dtype=_accumulate_dtype(x.dtype))
    return out, qkv, lse


@torch.library.register_fake("selfattn::self_attention_bwd")
def _self_attention_bwd_fake(grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale, output_mask):
    model_dim = _check_layer_inputs(x, w_qkv, None, num_heads)
    # A skipped gradient is an empty tensor of its own (outputs must not alias).
    grad_x = x.new_empty(x.shape if output_mask[0] else (0,))
    grad_w = x.new_empty(w_qkv.shape if output_mask[1] else (0,))
    grad_b = x.new_empty((3 * model_dim,) if output_mask[2] else (0,))
    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# Autograd: each forward op's backward is the matching backward op. lse (and the fused op's
# qkv buffer) are kept for backward and are not differentiable.


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero tensor for lse's (absent) gradient
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.scale = scale


def _attention_backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return None, None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _ops.attention_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return grad_q, grad_k, grad_v, None, None


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
