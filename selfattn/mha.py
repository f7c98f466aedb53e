"""selfattn.MultiheadAttention, a drop-in for torch.nn.MultiheadAttention on selfattn's kernels,
and swap_attention(model), which puts it in place of every nn.MultiheadAttention of a model.

It subclasses nn.MultiheadAttention and keeps its constructor, parameters, initialisation and
state dict unchanged; only ``forward`` differs, and it keeps nn.MultiheadAttention's conventions:
bool masks True = NOT allowed (selfattn's are the inverse), float masks added to the scores,
``(L, N, E)`` unless ``batch_first``, ``(N·H, L, S)`` attn_masks with row b·H + h, ``is_causal``
a hint that needs ``attn_mask``. Where the two differ: a query row that sees no key gives output
0 and weights 0 (nn.MultiheadAttention gives NaN).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import attention, self_attention


def _off_native_fast_path(module, args):
    """A forward pre-hook that does nothing. nn.TransformerEncoderLayer's inference fast path
    (torch._transformer_encoder_layer_fwd, a native op given self_attn's weights) is skipped when
    any of its modules has a forward hook; with this one, the layer calls our forward instead."""
    return None


# nn.Module's hook dicts (torch/nn/modules/module.py), shared between a module and its replacement.
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                "_backward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def _bool_or_float(mask: Optional[Tensor], name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"MultiheadAttention: {name} must be bool (True = not allowed) or floating point "
                        f"(added to the scores), got {mask.dtype}")


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An nn.MultiheadAttention mask as a float mask: bool True -> -inf, as torch converts it."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask


def _one_input(a: Tensor, b: Tensor) -> bool:
    """Whether a and b are one input, for the fused self-attention route: the same tensor, or
    aliases of it that are outputs of one autograd node. FSDP2 passes each forward input through
    its own output of one autograd Function, so `query is key` fails in its forward yet holds in
    a checkpoint's recompute (no hook there): the route, and the tensors saved, would differ
    between the two. A detached or separately created alias has no shared grad_fn: not fused."""
    if a is b:
        return True
    return (a.grad_fn is not None and a.grad_fn is b.grad_fn and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device)


def _op_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int, heads: int,
             extra_keys: int, dtype: torch.dtype) -> Optional[Tensor]:
    """nn.MultiheadAttention's two masks as the one 4-D mask selfattn's ops take, or None.

    attn_mask (L, S) becomes a (1, 1, L, S) view and (N·H, L, S) an (N, H, L, S) view (row b·H + h
    is batch b, head h); key_padding_mask (N, S) an (N, 1, 1, S) view. Bool masks stay bool,
    inverted to selfattn's True = take part; if either is float, both are added as float masks
    (bool True -> -inf). ``extra_keys`` columns (bias_k, add_zero_attn) are appended, open to all.
    """
    if attn_mask is not None:
        attn_mask = attn_mask.view(-1, heads, *attn_mask.shape[-2:]) if attn_mask.dim() == 3 \
            else attn_mask.view(1, 1, *attn_mask.shape)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(batch, 1, 1, -1)
    given = [m for m in (attn_mask, key_padding_mask) if m is not None]
    if not given:
        return None
    if all(m.dtype == torch.bool for m in given):
        hidden = given[0] if len(given) == 1 else given[0] | given[1]
        mask = hidden.logical_not()
        fill = True
    else:
        mask = _as_additive(given[0], dtype)
        if len(given) == 2:
            mask = mask + _as_additive(given[1], dtype)
        fill = 0.0
    if extra_keys:
        mask = torch.cat([mask, mask.new_full(mask.shape[:-1] + (extra_keys,), fill)], dim=-1)
    return mask


def _weights(q: Tensor, k: Tensor, mask: Optional[Tensor]) -> Tensor:
    """softmax(q kᵀ / sqrt(D) + mask) per head, (N, H, L, S), differentiable in q and k; a row that
    sees no key gets 0 (softmax would give NaN, and NaN gradients through it)."""
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # the shift never changes the result
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(total == 0, 1.0, total)


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs on selfattn's fused kernels.

    Same constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``out_proj``, ``bias_k``, ``bias_v``), initialisation and state dict as nn.MultiheadAttention,
    and the same ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)`` with its conventions (bool masks
    True = not allowed). Self-attention (``query is key is value``, kdim = vdim = embed_dim, no
    bias_k / add_zero_attn) with ``need_weights=False`` runs the fused projection op
    (selfattn.self_attention); otherwise the projections are F.linear and the attention
    selfattn.attention. ``need_weights=True`` computes the weights in a second, eager pass (an
    N×N matrix per head); the output still comes from the fused kernels. Dropout applies in
    training mode only; the returned weights are then the post-dropout ones, with the output's
    keep mask. A row that sees no key gives output 0 and weights 0, where nn.MultiheadAttention
    gives NaN. Nested-tensor input (what nn.TransformerEncoder makes of a padded batch in
    inference) is padded, run with a key padding mask and returned nested.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.register_forward_pre_hook(_off_native_fast_path)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """The same layer as ``mha``, sharing its parameters (the same nn.Parameter objects, so an
        optimizer built over ``mha`` keeps training them) and its hooks, with its training mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttention.from_torch: mha must be a torch.nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        module = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                     add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                     vdim=mha.vdim, batch_first=mha.batch_first, device="meta")
        for name, param in mha.named_parameters(recurse=False):
            setattr(module, name, param)
        module.out_proj = mha.out_proj
        module.train(mha.training)
        # mha's hooks run on the replacement, never silently lost: the two share their hook tables
        # (the same dicts, so a handle taken before the swap still removes its hook). The no-op
        # pre-hook that keeps the encoder layer's native fast path off then sits in mha's table too.
        for table in _HOOK_TABLES:
            object.__setattr__(module, table, getattr(mha, table))
        module._is_full_backward_hook = mha._is_full_backward_hook
        if _off_native_fast_path not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_off_native_fast_path)
        return module

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        for t, name in ((query, "query"), (key, "key"), (value, "value")):
            if not isinstance(t, Tensor):
                raise TypeError(f"MultiheadAttention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, attn_mask, need_weights,
                                        average_attn_weights)
        is_self = _one_input(query, key) and _one_input(key, value)
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:  # torch's rule: the hint describes attn_mask
            raise ValueError("MultiheadAttention: is_causal=True needs attn_mask (is_causal is a hint that "
                             "attn_mask is causal); nn.Transformer.generate_square_subsequent_mask makes one")
        # Batch first inside, as views: (N, L, E).
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, heads = query.shape[0], self.num_heads
        # As nn.MultiheadAttention: the hint replaces attn_mask only without key padding and weights.
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        extra_keys = int(self.bias_k is not None) + int(self.add_zero_attn)
        mask = _op_mask(attn_mask, key_padding_mask, batch, heads, extra_keys, query.dtype)
        dropout_p = float(self.dropout) if self.training else 0.0
        dropout = {"dropout_p": dropout_p} if dropout_p > 0 else {}  # (absent: works before dropout exists)

        if is_self and self._qkv_same_embed_dim and not extra_keys and not need_weights:
            out = self_attention(query, self.in_proj_weight, self.in_proj_bias, num_heads=heads, causal=causal,
                                 attn_mask=mask, **dropout)
            weights = None
        else:
            q, k, v = self._project(query, key, value, is_self)
            if extra_keys:
                k, v = self._extra_keys(k, v)
            q, k, v = (t.unflatten(-1, (heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
            if dropout_p > 0 and need_weights:  # one keep mask for the output and the weights
                from . import rng
                dropout["rng_state"] = rng.draw_rng_state(query.device)
            out = attention(q, k, v, mask, is_causal=causal, **dropout).transpose(1, 2).flatten(2)
            weights = None
            if need_weights:
                weights = _weights(q, k, mask)
                if dropout_p > 0:
                    from . import dropout_mask
                    keep = dropout_mask(dropout["rng_state"], tuple(weights.shape), dropout_p)
                    weights = weights * keep / (1.0 - dropout_p)
                if average_attn_weights:
                    weights = weights.mean(dim=1)
                if not batched:
                    weights = weights.squeeze(0)
        if batched and not self.batch_first:
            out = out.transpose(0, 1)  # F.linear then writes (L, N, E) contiguously, as torch's
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out.squeeze(0)), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor, is_self: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """q, k, v (N, ·, E) by nn.MultiheadAttention's in-projection, one GEMM where inputs are shared."""
        e = self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                    F.linear(value, self.v_proj_weight, b_v))
        w = self.in_proj_weight
        if is_self:
            return F.linear(query, w, bias).chunk(3, dim=-1)
        q = F.linear(query, w[:e], b_q)
        if key is value:
            k, v = F.linear(key, w[e:], None if bias is None else bias[e:]).chunk(2, dim=-1)
            return q, k, v
        return q, F.linear(key, w[e:2 * e], b_k), F.linear(value, w[2 * e:], b_v)

    def _extra_keys(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """bias_k / bias_v, then a zero key and value (add_zero_attn), appended to every sequence."""
        extra_k, extra_v = [k], [v]
        batch = k.shape[0]
        if self.bias_k is not None:
            extra_k.append(self.bias_k.expand(batch, 1, -1))
            extra_v.append(self.bias_v.expand(batch, 1, -1))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(batch, 1, k.shape[-1]))
            extra_v.append(v.new_zeros(batch, 1, v.shape[-1]))
        return torch.cat(extra_k, dim=1), torch.cat(extra_v, dim=1)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                      attn_mask: Optional[Tensor]) -> bool:
        """Whether the input is batched; a ValueError or TypeError naming what is wrong otherwise."""
        if query.dim() not in (2, 3):
            raise ValueError(f"MultiheadAttention: query must be 2-D (L, E) unbatched or 3-D ((L, N, E), or (N, L, "
                             f"E) with batch_first), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"MultiheadAttention: key and value must be {query.dim()}-D like query, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        for t, name, size in ((query, "query", self.embed_dim), (key, "key", self.kdim),
                              (value, "value", self.vdim)):
            if t.shape[-1] != size:
                what = "embed_dim" if name == "query" else ("kdim" if name == "key" else "vdim")
                raise ValueError(f"MultiheadAttention: {name}'s last dim must be {what} = {size}, got shape "
                                 f"{tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"MultiheadAttention: key and value must have the same sequence and batch dims, got "
                             f"shapes {tuple(key.shape)} and {tuple(value.shape)}")
        seq_dim = 1 if batched and self.batch_first else 0
        tgt, src = query.shape[seq_dim], key.shape[seq_dim]
        batch = query.shape[1 - seq_dim] if batched else 1
        if batched and key.shape[1 - seq_dim] != batch:
            raise ValueError(f"MultiheadAttention: query and key must have the same batch size, got shapes "
                             f"{tuple(query.shape)} and {tuple(key.shape)}")
        _bool_or_float(key_padding_mask, "key_padding_mask")
        _bool_or_float(attn_mask, "attn_mask")
        if key_padding_mask is not None:
            expected = (batch, src) if batched else (src,)
            if tuple(key_padding_mask.shape) != expected:
                what = "(N, S)" if batched else "(S,)"
                raise ValueError(f"MultiheadAttention: key_padding_mask must have shape {what} = {expected}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            heads = batch * self.num_heads if batched else self.num_heads
            if tuple(attn_mask.shape) not in ((tgt, src), (heads, tgt, src)):
                rows = "N·num_heads" if batched else "num_heads"
                raise ValueError(f"MultiheadAttention: attn_mask must have shape (L, S) = {(tgt, src)} or ({rows}, "
                                 f"L, S) = {(heads, tgt, src)}, got {tuple(attn_mask.shape)}")
        return batched

    def _forward_nested(self, query, key, value, key_padding_mask, attn_mask, need_weights, average_attn_weights):
        """A nested (N, L_i, E) batch, as nn.TransformerEncoder passes a padded batch in inference: padded,
        run with a key padding mask, returned nested (and padded weights zero outside each sequence)."""
        if not (query is key and key is value) or key_padding_mask is not None or attn_mask is not None:
            raise ValueError("MultiheadAttention: nested tensor input needs self-attention (query is key is value) "
                             "and no key_padding_mask or attn_mask (the nesting holds the padding)")
        if not self.batch_first or query.dim() != 3:
            raise ValueError("MultiheadAttention: nested tensor input must be 3-D (N, L_i, E) with batch_first=True")
        lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
        padded = torch.nested.to_padded_tensor(query, 0.0)
        padding = torch.arange(padded.shape[1], device=query.device) >= lengths[:, None]
        out, weights = self.forward(padded, padded, padded, key_padding_mask=padding, need_weights=need_weights,
                                    average_attn_weights=average_attn_weights)
        out = torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths.tolist())], layout=query.layout)
        if weights is not None:
            rows = padding[:, :, None] if average_attn_weights else padding[:, None, :, None]
            weights = weights.masked_fill(rows, 0.0)
        return out, weights


def swap_attention(model: nn.Module) -> nn.Module:
    """Replace, in place, every torch.nn.MultiheadAttention in ``model`` (exactly that class, not a
    subclass) by a selfattn.MultiheadAttention sharing its parameters, device, dtype and training
    mode; a module shared between parents is replaced by one module. Hooks registered on a replaced
    module run on its replacement (from_torch shares them). Returns ``model`` (or, if ``model`` itself is an
    nn.MultiheadAttention, its replacement)."""
    if type(model) is nn.MultiheadAttention:
        return MultiheadAttention.from_torch(model)
    replaced = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                if id(child) not in replaced:
                    replaced[id(child)] = MultiheadAttention.from_torch(child)
                setattr(parent, name, replaced[id(child)])
    return model
