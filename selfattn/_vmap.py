"""Batching rules (torch.vmap) of the ops, run before autograd at each vmap level: the vmapped dim
is folded into the batch dim (a view where the strides allow), so one op call serves every sample;
the varlen ops, whose packed layout has no batch dim, take one call per sample. Autograd, forward
and reverse, is in _autograd.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._op_handles import (_attention_bwd, _attention_fwd, _attention_jvp, _self_attention_bwd, _self_attention_fwd,
                          _varlen_attention_bwd, _varlen_attention_fwd)
from ._torch_internals import META_KEYSET

_lib = torch.library.Library("selfattn", "IMPL")


# ---------------------------------------------------------------------------------------------
# Batching rules (torch.vmap), run before autograd at each vmap level. Each rule first checks the
# arguments as the op sees them, on meta tensors without the vmapped dim, so that a bad argument
# is reported in the op's own words and sizes rather than those of the folded batch.

def _check_unbatched(op, *args) -> None:
    """The op's own checks (its Meta kernel: csrc/checks.cpp) on arguments without the vmapped dim."""
    op.redispatch(META_KEYSET, *args)


def _unbatched_meta(t, bdim: Optional[int]):
    if not isinstance(t, Tensor):
        return t
    shape = list(t.shape)
    if bdim is not None:
        del shape[bdim]
    return torch.empty(shape, dtype=t.dtype, device="meta")


def _vmapped_first(t: Tensor, bdim: Optional[int], size: int) -> Tensor:
    """t with the vmapped dim first; an unbatched t expanded to it (stride 0, no copy)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def _fold(tensors: Sequence[Tensor], bdims: Sequence[Optional[int]], size: int):
    """Each (V, B, ...) tensor as (V·B, ...): the samples become batch entries. A view when the
    strides allow; a copy otherwise (e.g. an unbatched tensor expanded over V, with B > 1)."""
    leading = [_vmapped_first(t, d, size) for t, d in zip(tensors, bdims)]
    return [t.flatten(0, 1) for t in leading], leading[0].shape[1]


def _vmap_by_loop(op, info, in_dims, args):
    """One op call per sample, outputs stacked: for what cannot be folded into the batch."""
    # in_dims holds None for a non-tensor argument, or a list of Nones for a list (output_mask).
    batched = [isinstance(a, Tensor) and d is not None for a, d in zip(args, in_dims)]
    if info.batch_size == 0:
        # No sample to run: one of zeros gives the outputs' shapes.
        zeros = [a.new_zeros(_unbatched_meta(a, d).shape) if b else a for a, d, b in zip(args, in_dims, batched)]
        outputs = tuple(o.new_empty((0, *o.shape)) for o in op(*zeros))
    else:
        per_sample = [op(*(a.select(d, i) if b else a for a, d, b in zip(args, in_dims, batched)))
                      for i in range(info.batch_size)]
        outputs = tuple(torch.stack(parts) for parts in zip(*per_sample))
    return outputs, (0,) * len(outputs)


def _padded(in_dims, num_args: int) -> tuple:
    """in_dims for all the op's arguments: the dispatcher leaves out trailing ones at their
    defaults (an attn_mask of None and the rest), and so does in_dims."""
    return tuple(in_dims) + (None,) * (num_args - len(in_dims))


def _fold_mask(attn_mask: Optional[Tensor], bdim: Optional[int], size: int, batch: int) -> Optional[Tensor]:
    """The op's attn_mask (B or 1, H or 1, Nq or 1, Nk or 1) for the folded (V·B, ...) batch.

    Unvmapped with a batch dim of 1, it broadcasts over V·B as it is (no copy). Otherwise it
    becomes (V, B, ...) — the vmapped dim first, or stride 0 when it has none; its batch dim
    expanded to B when it is 1 — then (V·B, ...): a view when the strides allow (a vmapped mask
    with B entries, contiguous), else a copy of V·B·(its other dims) elements, the price of one
    op call for every sample."""
    if attn_mask is None or (bdim is None and attn_mask.shape[0] == 1):
        return attn_mask
    leading = _vmapped_first(attn_mask, bdim, size)
    if leading.dim() != 5:
        return leading  # not 4-D per sample: the checks before the fold have refused it already
    return leading.expand(size, batch, *leading.shape[2:]).flatten(0, 1)


@torch.library.register_vmap("selfattn::attention_fwd", lib=_lib)
def _attention_fwd_vmap(info, in_dims, q, k, v, causal, scale, attn_mask=None, window_left=-1, window_right=-1,
                        diagonal_offset=0, dropout_p=0.0, rng_state=None):
    in_dims = _padded(in_dims, 11)
    m_q, m_k, m_v, m_mask = (_unbatched_meta(t, d) for t, d in zip((q, k, v, attn_mask), in_dims[:3] + in_dims[5:6]))
    _check_unbatched(_attention_fwd, m_q, m_k, m_v, causal, scale, m_mask, window_left, window_right, diagonal_offset)
    if dropout_p != 0.0 or rng_state is not None:
        # Folding the samples into the batch would change each sample's b, so its keep mask: one
        # call per sample keeps every sample's mask that of its own (B, Hq, Nq, Nk).
        return _vmap_by_loop(_attention_fwd, info, in_dims, (q, k, v, causal, scale, attn_mask, window_left,
                                                             window_right, diagonal_offset, dropout_p, rng_state))
    (q, k, v), batch = _fold((q, k, v), in_dims[:3], info.batch_size)
    attn_mask = _fold_mask(attn_mask, in_dims[5], info.batch_size, batch)
    out, lse = _attention_fwd(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset)
    return (out.unflatten(0, (info.batch_size, batch)), lse.unflatten(0, (info.batch_size, batch))), (0, 0)


@torch.library.register_vmap("selfattn::attention_bwd", lib=_lib)
def _attention_bwd_vmap(info, in_dims, grad_out, q, k, v, out, lse, causal, scale, attn_mask=None, window_left=-1,
                        window_right=-1, diagonal_offset=0, dropout_p=0.0, rng_state=None):
    tensors = (grad_out, q, k, v, out, lse)
    in_dims = _padded(in_dims, 14)
    m_grad_out, m_q, m_k, m_v, m_out, m_lse = (_unbatched_meta(t, d) for t, d in zip(tensors, in_dims))
    mask_dim = in_dims[8]
    _check_unbatched(_attention_bwd, m_grad_out, m_q, m_k, m_v, m_out, m_lse, causal, scale,
                     _unbatched_meta(attn_mask, mask_dim), window_left, window_right, diagonal_offset)
    if dropout_p != 0.0 or rng_state is not None:  # as in the forward: one call per sample
        return _vmap_by_loop(_attention_bwd, info, in_dims, (*tensors, causal, scale, attn_mask, window_left,
                                                             window_right, diagonal_offset, dropout_p, rng_state))
    folded, batch = _fold(tensors, in_dims[:6], info.batch_size)
    # _fold takes the batch size from its first tensor, grad_out: (B, H, Nq, Dv), checked above.
    attn_mask = _fold_mask(attn_mask, mask_dim, info.batch_size, batch)
    grads = _attention_bwd(*folded, causal, scale, attn_mask, window_left, window_right, diagonal_offset)
    return tuple(g.unflatten(0, (info.batch_size, batch)) for g in grads), (0, 0, 0)


@torch.library.register_vmap("selfattn::attention_jvp", lib=_lib)
def _attention_jvp_vmap(info, in_dims, q, k, v, tangent_q, tangent_k, tangent_v, causal, scale, attn_mask=None,
                        window_left=-1, window_right=-1, diagonal_offset=0):
    tensors = (q, k, v, tangent_q, tangent_k, tangent_v)
    in_dims = _padded(in_dims, 12)
    metas = [_unbatched_meta(t, d) for t, d in zip(tensors, in_dims)]
    _check_unbatched(_attention_jvp, *metas, causal, scale, _unbatched_meta(attn_mask, in_dims[8]), window_left,
                     window_right, diagonal_offset)
    present = [i for i, t in enumerate(tensors) if t is not None]  # q first: _fold's batch size is q's
    folded, batch = _fold([tensors[i] for i in present], [in_dims[i] for i in present], info.batch_size)
    args = list(tensors)
    for i, t in zip(present, folded):
        args[i] = t
    attn_mask = _fold_mask(attn_mask, in_dims[8], info.batch_size, batch)
    outputs = _attention_jvp(*args, causal, scale, attn_mask, window_left, window_right, diagonal_offset)
    return tuple(t.unflatten(0, (info.batch_size, batch)) for t in outputs), (0, 0, 0)


@torch.library.register_vmap("selfattn::self_attention_fwd", lib=_lib)
def _self_attention_fwd_vmap(info, in_dims, x, w_qkv, b_qkv, num_heads, causal, scale, num_kv_heads=0,
                             attn_mask=None, window_left=-1, window_right=-1, dropout_p=0.0, rng_state=None):
    args = (x, w_qkv, b_qkv, num_heads, causal, scale, num_kv_heads, attn_mask, window_left, window_right,
            dropout_p, rng_state)
    in_dims = _padded(in_dims, len(args))
    m_x, m_w, m_b = (_unbatched_meta(t, d) for t, d in zip((x, w_qkv, b_qkv), in_dims))
    _check_unbatched(_self_attention_fwd, m_x, m_w, m_b, num_heads, causal, scale, num_kv_heads,
                     _unbatched_meta(attn_mask, in_dims[7]), window_left, window_right)
    if in_dims[1] is not None or in_dims[2] is not None or dropout_p != 0.0 or rng_state is not None:
        # A weight per sample: the op takes one weight for its whole batch. Dropout: a fold would
        # change each sample's b, so its keep mask.
        return _vmap_by_loop(_self_attention_fwd, info, in_dims, args)
    (x,), batch = _fold((x,), in_dims[:1], info.batch_size)
    attn_mask = _fold_mask(attn_mask, in_dims[7], info.batch_size, batch)
    outputs = _self_attention_fwd(x, w_qkv, b_qkv, num_heads, causal, scale, num_kv_heads, attn_mask, window_left,
                                  window_right)
    return tuple(t.unflatten(0, (info.batch_size, batch)) for t in outputs), (0, 0, 0)


@torch.library.register_vmap("selfattn::self_attention_bwd", lib=_lib)
def _self_attention_bwd_vmap(info, in_dims, grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale,
                             output_mask, num_kv_heads=0, attn_mask=None, window_left=-1, window_right=-1,
                             dropout_p=0.0, rng_state=None):
    args = (grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale, output_mask, num_kv_heads, attn_mask,
            window_left, window_right, dropout_p, rng_state)
    in_dims = _padded(in_dims, len(args))
    m_grad_out, m_x, m_w, m_qkv, m_out, m_lse = (_unbatched_meta(t, d) for t, d in zip(args[:6], in_dims))
    _check_unbatched(_self_attention_bwd, m_grad_out, m_x, m_w, m_qkv, m_out, m_lse, num_heads, causal, scale,
                     output_mask, num_kv_heads, _unbatched_meta(attn_mask, in_dims[11]), window_left, window_right)
    if in_dims[2] is not None or output_mask[1] or output_mask[2] or dropout_p != 0.0 or rng_state is not None:
        # A weight per sample, or a weight gradient per sample (vmap(grad(f)) with respect to the
        # weights): the op's grad_w and grad_b sum over its batch, which would mix the samples.
        return _vmap_by_loop(_self_attention_bwd, info, in_dims, args)
    per_sample = (grad_out, x, qkv, out, lse)
    (grad_out, x, qkv, out, lse), batch = _fold(per_sample, [in_dims[i] for i in (0, 1, 3, 4, 5)], info.batch_size)
    attn_mask = _fold_mask(attn_mask, in_dims[11], info.batch_size, batch)
    grad_x, grad_w, grad_b = _self_attention_bwd(grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale,
                                                 output_mask, num_kv_heads, attn_mask, window_left, window_right)
    # grad_w and grad_b are not wanted here (empty, the same for every sample); grad_x may not be.
    if output_mask[0]:
        return (grad_x.unflatten(0, (info.batch_size, batch)), grad_w, grad_b), (0, None, None)
    return (grad_x, grad_w, grad_b), (None, None, None)


# The varlen ops: the packed layout has no batch dim to fold into (a fold would shift every
# sample's cu_seqlens, whose values only the host sees), so one op call per sample.


@torch.library.register_vmap("selfattn::varlen_attention_fwd", lib=_lib)
def _varlen_attention_fwd_vmap(info, in_dims, *args):
    return _vmap_by_loop(_varlen_attention_fwd, info, in_dims, args)


@torch.library.register_vmap("selfattn::varlen_attention_bwd", lib=_lib)
def _varlen_attention_bwd_vmap(info, in_dims, *args):
    return _vmap_by_loop(_varlen_attention_bwd, info, in_dims, args)
