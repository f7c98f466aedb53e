"""Batching rules (torch.vmap) of the ops, run before autograd at each vmap level: the vmapped dim
is folded into the batch dim (a view where the strides allow), so one op call serves every sample;
the varlen ops, whose packed layout has no batch dim, take one call per sample. Autograd, forward
and reverse, is in _autograd.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._op_table import OPS, OpDescription
from ._torch_internals import META_KEYSET

_lib = torch.library.Library("selfattn", "IMPL")


# ---------------------------------------------------------------------------------------------
# Batching rules (torch.vmap), run before autograd at each vmap level, generated from the op table.
# Each rule first has the op check the arguments as one sample has them (the op's Meta kernel, on
# meta tensors without the vmapped dim), so that a bad argument is reported in the op's own words and
# sizes rather than those of the folded batch.


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


def _register_vmap(description: OpDescription) -> None:
    """The op's batching rule: the samples folded into the batch dim of the arguments the table
    calls ``folded`` (and ``folded_masks``), one op call; or one call per sample when the op
    folds nothing, when another tensor argument is vmapped (a weight per sample: the op takes one
    for its whole batch), while a ``per_sample`` group is active (dropout: a fold would change each
    sample's batch index, so its keep mask), or when the table says so."""
    op = description.handle
    signature = description.signature
    foldable = set(description.folded) | set(description.folded_masks)
    per_sample_groups = tuple(g for g in description.groups if g.per_sample)

    def rule(info, in_dims, *args):
        in_dims = _padded(in_dims, len(signature.names))
        values = signature.bind(args)
        dims = dict(zip(signature.names, in_dims))
        # The op's own checks (its Meta kernel: csrc/checks.cpp) on arguments without the vmapped dim.
        op.redispatch(META_KEYSET, *(_unbatched_meta(values[n], dims[n]) for n in signature.names))
        everything = [values[n] for n in signature.names]
        if (not description.folded or description.per_sample_when(values)
                or any(g.active(values) for g in per_sample_groups)
                or any(dims[n] is not None and n not in foldable for n in signature.tensor_names)):
            return _vmap_by_loop(op, info, in_dims, everything)
        # The first folded tensor present (q, grad_out, x) gives the batch size B.
        present = [n for n in description.folded if values[n] is not None]
        folded, batch = _fold([values[n] for n in present], [dims[n] for n in present], info.batch_size)
        values.update(zip(present, folded))
        for name in description.folded_masks:
            values[name] = _fold_mask(values[name], dims[name], info.batch_size, batch)
        outputs = op(*signature.positional(values))
        per_sample = (description.per_sample_outputs(values) if description.per_sample_outputs
                      else (True,) * len(outputs))
        return (tuple(t.unflatten(0, (info.batch_size, batch)) if p else t for t, p in zip(outputs, per_sample)),
                tuple(0 if p else None for p in per_sample))

    torch.library.register_vmap(f"selfattn::{description.name}", rule, lib=_lib)


for _description in OPS.values():
    _register_vmap(_description)
