"""Tensor parallelism over heads (DTensor): sharding rules for the ops and a ParallelStyle for the
fused layer.

**Sharding rules** (registered when this module is imported, with
``torch.distributed.tensor.experimental.register_sharding``): every op runs locally, without
communication, on inputs that are all replicated, or all sharded on the batch dim (Shard(0)), or
— the attention ops — all sharded on the head dim (Shard(1) of q, k, v, out, lse and the
gradients; the number of q heads and of kv heads must both divide by the mesh size, so that each
rank's query heads read its own kv heads). A tensor mask follows the dim it is sharded on when
it has that dim, and is replicated when it broadcasts over it. The fused layer's weight gradient
under batch sharding is Partial (summed over the ranks when it is redistributed).

**The fused layer** cannot take its stacked ``in_proj_weight = [W_q; W_k; W_v]`` as Shard(0):
rank 0 would get all of W_q and part of W_k. ``SelfAttentionParallel`` gives rank r the rows of
its own heads, ``[W_q,r; W_k,r; W_v,r]``, held as a DTensor Shard(0) of the *interleaved* weight
``[W_q,0; W_k,0; W_v,0; W_q,1; …]`` (``interleave_qkv`` / ``deinterleave_qkv`` convert), and
runs the op on each rank's local heads: input replicated, output the rank's heads side by side,
(…, N, H·D / tp) — the Shard(-1) that ``RowwiseParallel`` expects for the out-projection.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import ParallelStyle

from .._torch_internals import op_schema
from ..ops import self_attention

__all__ = ["SelfAttentionParallel", "interleave_qkv", "deinterleave_qkv", "qkv_rows_of_rank",
           "register_sharding_rules"]

_ops = torch.ops.selfattn


# ---------------------------------------------------------------------------------------------
# Sharding rules. A rule gets the op's arguments (tensors as DTensorSpecs) and returns the
# acceptable ([output placements], [input placements]) pairs, None for a non-tensor argument.


def _is_spec(arg) -> bool:
    return hasattr(arg, "placements") and hasattr(arg, "tensor_meta")


def _shape(spec):
    return tuple(spec.tensor_meta.shape)


def _inputs(args, roles: dict, dim: int):
    """Each argument's placement when the op is sharded on ``dim``: Shard(dim) for the tensors
    with role "shard"; for the mask (role "mask") Shard(dim) if its size there is above 1, else
    Replicate (it broadcasts); Replicate for any other tensor; None for non-tensors."""
    placements = []
    for i, arg in enumerate(args):
        role = roles.get(i)
        if not _is_spec(arg):
            placements.append(None)
        elif role == "shard" or (role == "mask" and _shape(arg)[dim] > 1):
            placements.append(Shard(dim))
        else:
            placements.append(Replicate())
    return placements


def _replicated(args, num_outputs: int):
    return ([Replicate()] * num_outputs, [Replicate() if _is_spec(a) else None for a in args])


def _divides(spec, dim: int, size: int) -> bool:
    return _shape(spec)[dim] % size == 0


def _dropout_index(op) -> Optional[int]:
    names = [a.name for a in op_schema(op).arguments]
    return names.index("dropout_p") if "dropout_p" in names else None


def _with_dropout(args, kwargs, index: Optional[int]) -> bool:
    """Whether the call applies dropout: its keep mask is a function of the (batch, head) indices,
    which a sharded call would see renumbered from 0 on every rank — only replication keeps them."""
    if index is None:
        return False
    value = args[index] if index < len(args) else kwargs.get("dropout_p", 0.0)
    return bool(value)


def _score_tensor_indices(op) -> tuple:
    names = [a.name for a in op_schema(op).arguments]
    return tuple(names.index(n) for n in ("alibi_slopes", "sinks") if n in names)


def _with_score_tensors(args, kwargs, indices: tuple) -> bool:
    """Whether the call has ALiBi slopes or sinks: per-head tensors that the sharded rules do not
    place yet — replication computes them right."""
    return any((i < len(args) and args[i] is not None) for i in indices) or \
        any(kwargs.get(n) is not None for n in ("alibi_slopes", "sinks"))


def _rule(op, num_outputs: int, sharded: tuple, mask_index: int, dims, num_partial: int = 0,
          heads: Optional[tuple] = None, num_replicated: int = 0):
    """The rule of an op whose tensors at positions ``sharded`` (and the mask) may be sharded on each
    of ``dims``; the last ``num_replicated`` outputs are then Replicate (grad_sinks, empty without
    sinks) and the ``num_partial`` before them Partial (sums over the sharded dim)."""
    dropout_index = _dropout_index(op)
    score_indices = _score_tensor_indices(op)
    roles = {i: "shard" for i in sharded}
    roles[mask_index] = "mask"

    def rule(*args, **kwargs):
        rules = [_replicated(args, num_outputs)]
        if _with_dropout(args, kwargs, dropout_index) or _with_score_tensors(args, kwargs, score_indices):
            return rules
        for dim in dims:
            if dim == 1:  # heads: each rank's q heads must read its own kv heads
                size = args[heads[0]].mesh.size()
                if not all(_divides(args[i], 1, size) for i in heads):
                    continue
            outputs = ([Shard(dim)] * (num_outputs - num_partial - num_replicated) + [Partial()] * num_partial
                       + [Replicate()] * num_replicated)
            rules.append((outputs, _inputs(args, roles, dim)))
        return rules
    return rule


_registered = False


def register_sharding_rules() -> None:
    """Registers the ops' DTensor sharding rules (done on import of this module; idempotent)."""
    global _registered
    if _registered:
        return
    fwd, bwd = _ops.attention_fwd.default, _ops.attention_bwd.default
    register_sharding(fwd)(_rule(fwd, 2, (0, 1, 2), 5, (0, 1), heads=(0, 1)))
    register_sharding(bwd)(_rule(bwd, 4, (0, 1, 2, 3, 4, 5), 8, (0, 1), heads=(1, 2), num_replicated=1))
    # The fused layer: batch sharding only (head sharding changes num_heads per rank, which is
    # what SelfAttentionParallel does); its weight gradient is a sum over the batch.
    fwd, bwd = _ops.self_attention_fwd.default, _ops.self_attention_bwd.default
    register_sharding(fwd)(_rule(fwd, 3, (0,), 7, (0,)))
    register_sharding(bwd)(_rule(bwd, 4, (0, 1, 3, 4, 5), 11, (0,), num_partial=2, num_replicated=1))
    _registered = True


register_sharding_rules()


# ---------------------------------------------------------------------------------------------
# The fused layer's weight, a rank's heads at a time


def _check_heads(num_heads: int, num_kv_heads: int, tp: int) -> None:
    if num_heads % tp != 0 or num_kv_heads % tp != 0:
        raise ValueError(f"selfattn tensor parallel: num_heads ({num_heads}) and num_kv_heads ({num_kv_heads}) "
                         f"must both be divisible by the tensor-parallel degree ({tp})")


def qkv_rows_of_rank(w: Tensor, num_heads: int, num_kv_heads: int, tp: int, rank: int) -> Tensor:
    """Rank ``rank``'s rows [W_q,r; W_k,r; W_v,r] of a stacked [W_q; W_k; W_v] (rows first; a
    bias works the same), for ``tp`` ranks."""
    _check_heads(num_heads, num_kv_heads, tp)
    head_dim = w.shape[0] // (num_heads + 2 * num_kv_heads)
    q_rows, kv_rows = num_heads * head_dim // tp, num_kv_heads * head_dim // tp
    starts = (rank * q_rows, num_heads * head_dim + rank * kv_rows,
              (num_heads + num_kv_heads) * head_dim + rank * kv_rows)
    return torch.cat([w[starts[0]:starts[0] + q_rows], w[starts[1]:starts[1] + kv_rows],
                      w[starts[2]:starts[2] + kv_rows]])


def interleave_qkv(w: Tensor, num_heads: int, num_kv_heads: int, tp: int) -> Tensor:
    """[W_q; W_k; W_v] → [W_q,0; W_k,0; W_v,0; W_q,1; …]: the layout whose Shard(0) gives each rank
    its heads (the global view of SelfAttentionParallel's parameters)."""
    return torch.cat([qkv_rows_of_rank(w, num_heads, num_kv_heads, tp, r) for r in range(tp)])


def deinterleave_qkv(w: Tensor, num_heads: int, num_kv_heads: int, tp: int) -> Tensor:
    """The inverse of ``interleave_qkv``: back to [W_q; W_k; W_v] (for a single-process model)."""
    _check_heads(num_heads, num_kv_heads, tp)
    head_dim = w.shape[0] // (num_heads + 2 * num_kv_heads)
    q_rows, kv_rows = num_heads * head_dim // tp, num_kv_heads * head_dim // tp
    per_rank = w.split(q_rows + 2 * kv_rows)
    parts = [r.split([q_rows, kv_rows, kv_rows]) for r in per_rank]
    return torch.cat([p[0] for p in parts] + [p[1] for p in parts] + [p[2] for p in parts])


# ---------------------------------------------------------------------------------------------
# The ParallelStyle


def _local_heads_of_mask(mask: Optional[Tensor], num_heads: int, tp: int, rank: int) -> Optional[Tensor]:
    """A layer attn_mask with a head dim of H keeps this rank's heads; one that broadcasts over
    the heads (size 1, or fewer than 3 dims) is passed as it is."""
    if mask is None or mask.dim() < 3 or mask.shape[-3] != num_heads or num_heads == 1:
        return mask
    local = num_heads // tp
    return mask.narrow(-3, rank * local, local)


class SelfAttentionParallel(ParallelStyle):
    """Shards a ``selfattn.SelfAttention`` over its heads: each rank of the (1-D) mesh holds
    [W_q,r; W_k,r; W_v,r] (and the bias rows) for its H / tp query heads and Hkv / tp kv heads,
    as a DTensor Shard(0) of the interleaved weight (``deinterleave_qkv`` gives the layer's own
    order back), and computes those heads with the fused op, no communication. Input: replicated
    (a plain tensor, or a DTensor that is redistributed to Replicate); output: the rank's heads,
    (…, N, H·D / tp) — a plain tensor by default (``use_local_output``), else a DTensor Shard(-1);
    either is what ``RowwiseParallel`` takes for the out-projection. Hkv must divide by tp.
    """

    def __init__(self, *, use_local_output: bool = True):
        super().__init__()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for attr in ("in_proj_weight", "in_proj_bias", "num_heads", "num_kv_heads"):
            if not hasattr(module, attr):
                raise TypeError(f"SelfAttentionParallel: expected a selfattn.SelfAttention, got "
                                f"{type(module).__name__} without {attr}")
        if device_mesh.ndim != 1:
            raise ValueError(f"SelfAttentionParallel: needs a 1-D device mesh, got {device_mesh.ndim}-D")
        tp, rank = device_mesh.size(), device_mesh.get_local_rank()
        heads, kv_heads = module.num_heads, module.num_kv_heads
        _check_heads(heads, kv_heads, tp)
        for name in ("in_proj_weight", "in_proj_bias"):
            param = getattr(module, name)
            if param is None:
                continue
            local = qkv_rows_of_rank(param.detach(), heads, kv_heads, tp, rank)
            shape = (param.shape[0], *param.shape[1:])
            sharded = DTensor.from_local(local, device_mesh, [Shard(0)], run_check=False, shape=shape,
                                         stride=param.stride())
            setattr(module, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        style = self

        def forward(x: Tensor, key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None):
            # Replicated in, and in backward each rank's heads give a partial sum of dx: marked
            # Partial, it is all-reduced where x came in (Megatron's f; ColwiseParallel's too).
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
            x = x.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            bias = module.in_proj_bias
            out = self_attention(x, module.in_proj_weight.to_local(), None if bias is None else bias.to_local(),
                                 num_heads=heads // tp, num_kv_heads=kv_heads // tp, causal=module.causal,
                                 scale=module.scale,
                                 key_padding_mask=key_padding_mask,
                                 attn_mask=_local_heads_of_mask(attn_mask, heads, tp, rank), window=module.window)
            if style.use_local_output:
                return out
            return DTensor.from_local(out, device_mesh, [Shard(out.dim() - 1)], run_check=False)

        module.forward = forward
        return module
