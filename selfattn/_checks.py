"""The ops' argument checks for the fake kernels: csrc/checks.cpp, function by function and
message by message, so that meta tensors and torch.compile's tracing report a bad argument in
the words the kernels use. Change both together; tests/test_bad_inputs.py compares them.

Works on fake tensors with symbolic sizes (comparisons of sizes become guards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse and of all accumulation for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    heads_kv: int
    nq: int
    nk: int
    dim: int
    dim_v: int


@dataclass(frozen=True)
class VarlenShape:
    total_q: int
    total_k: int
    heads: int
    heads_kv: int
    dim: int
    dim_v: int
    num_seqs: int


@dataclass(frozen=True)
class LayerShape:
    batch: int
    seq: int
    embed: int
    model: int  # heads * head_dim
    heads: int
    heads_kv: int
    head_dim: int

    @property
    def qkv_dim(self):
        """Width of the projections: q heads, then k heads, then v heads."""
        return (self.heads + 2 * self.heads_kv) * self.head_dim


def _sizes(t: Tensor) -> list:
    return list(t.shape)


def _check_float_tensor(t: Optional[Tensor], name: str) -> None:
    if t is None:
        raise ValueError(f"selfattn: {name} must be a tensor, got None")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"selfattn: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_rank(t: Tensor, name: str, rank: int, meaning: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"selfattn: {name} must be {rank}-D {meaning}, got shape {_sizes(t)}")


def _check_like(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"selfattn: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"selfattn: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def _check_shape(t: Tensor, name: str, expected: Sequence, meaning: str) -> None:
    if _sizes(t) != list(expected):
        raise ValueError(f"selfattn: {name} must have shape {meaning} = {list(expected)}, got {_sizes(t)}")


def _check_lse(lse: Optional[Tensor], ref: Tensor, ref_name: str, expected: Sequence, meaning: str) -> None:
    if lse is None:
        raise ValueError("selfattn: lse must be a tensor, got None")
    want = accumulate_dtype(ref.dtype)
    if lse.dtype != want:
        raise TypeError(f"selfattn: lse must be {want} for {ref.dtype} inputs, got {lse.dtype}")
    if lse.device != ref.device:
        raise ValueError(f"selfattn: lse must be on the device of {ref_name} ({ref.device}), got {lse.device}")
    _check_shape(lse, "lse", expected, meaning)


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"selfattn: scale must be finite, got {scale}")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, rank: int, q_meaning: str, k_meaning: str, v_meaning: str) -> None:
    _check_float_tensor(q, "q")
    _check_float_tensor(k, "k")
    _check_float_tensor(v, "v")
    _check_rank(q, "q", rank, q_meaning)
    _check_rank(k, "k", rank, k_meaning)
    _check_rank(v, "v", rank, v_meaning)
    _check_like(k, "k", q, "q")
    _check_like(v, "v", q, "q")


def _check_heads_divide(heads: int, heads_kv: int) -> None:
    if not (heads % heads_kv == 0 if heads_kv >= 1 else heads == 0):
        raise ValueError("selfattn: k must have a number of heads that divides q's (grouped-query "
                         f"attention), got {heads_kv} for k and {heads} for q")


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float) -> AttentionShape:
    _check_qkv(q, k, v, 4, "(B, Hq, Nq, D)", "(B, Hk, Nk, D)", "(B, Hk, Nk, Dv)")
    s = AttentionShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
    _check_heads_divide(s.heads, s.heads_kv)
    _check_shape(k, "k", [s.batch, s.heads_kv, s.nk, s.dim], "(B, Hk, Nk, D) with B, D of q")
    _check_shape(v, "v", [s.batch, s.heads_kv, s.nk, s.dim_v], "(B, Hk, Nk, Dv) with B, Hk, Nk of k")
    _check_scale(scale)
    return s


def check_window(window_left: int, window_right: int) -> None:
    if window_left < -1:
        raise ValueError(f"selfattn: window_left must be >= -1 (-1: unbounded), got {window_left}")
    if window_right < -1:
        raise ValueError(f"selfattn: window_right must be >= -1 (-1: unbounded), got {window_right}")


def check_dropout_p(dropout_p: float) -> None:
    """The range of dropout_p (also checked by the public functions before they draw an rng_state)."""
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"selfattn: dropout_p must be in [0, 1), got {dropout_p:g}")


def check_dropout(dropout_p: float, rng_state: Optional[Tensor], ref: Tensor, ref_name: str) -> None:
    check_dropout_p(dropout_p)
    if rng_state is None:
        if dropout_p != 0.0:
            raise ValueError("selfattn: rng_state must be a tensor when dropout_p > 0, got None")
        return
    if rng_state.dtype != torch.int64:
        raise TypeError(f"selfattn: rng_state must be torch.int64 (seed, offset), got {rng_state.dtype}")
    _check_shape(rng_state, "rng_state", [2], "(seed, offset)")
    if rng_state.device != ref.device:
        raise ValueError(f"selfattn: rng_state must be on the device of {ref_name} ({ref.device}), got "
                         f"{rng_state.device}")


def check_mask_inputs(s: AttentionShape, q: Tensor, attn_mask: Optional[Tensor], window_left: int,
                      window_right: int) -> None:
    check_window(window_left, window_right)
    if attn_mask is None:
        return
    if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise TypeError(f"selfattn: attn_mask must be bool, float32 or the dtype of q ({q.dtype}), "
                        f"got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"selfattn: attn_mask must be on the device of q ({q.device}), got {attn_mask.device}")
    full = [s.batch, s.heads, s.nq, s.nk]
    if attn_mask.dim() != 4 or any(m != f and m != 1 for m, f in zip(attn_mask.shape, full)):
        raise ValueError(f"selfattn: attn_mask must be 4-D and broadcast to (B, Hq, Nq, Nk) = {full}, "
                         f"got shape {_sizes(attn_mask)}")


def check_attention_tangents(s: AttentionShape, q: Tensor, tangent_q: Optional[Tensor], tangent_k: Optional[Tensor],
                             tangent_v: Optional[Tensor]) -> None:
    for tangent, name, shape, meaning in (
            (tangent_q, "tangent_q", [s.batch, s.heads, s.nq, s.dim], "(B, Hq, Nq, D), q's"),
            (tangent_k, "tangent_k", [s.batch, s.heads_kv, s.nk, s.dim], "(B, Hk, Nk, D), k's"),
            (tangent_v, "tangent_v", [s.batch, s.heads_kv, s.nk, s.dim_v], "(B, Hk, Nk, Dv), v's")):
        if tangent is not None:
            _check_float_tensor(tangent, name)
            _check_like(tangent, name, q, "q")
            _check_shape(tangent, name, shape, meaning)


def check_attention_grad_inputs(s: AttentionShape, q: Tensor, grad_out: Tensor, out: Tensor, lse: Tensor) -> None:
    _check_float_tensor(grad_out, "grad_out")
    _check_float_tensor(out, "out")
    _check_like(grad_out, "grad_out", q, "q")
    _check_like(out, "out", q, "q")
    out_shape = [s.batch, s.heads, s.nq, s.dim_v]
    _check_shape(grad_out, "grad_out", out_shape, "(B, Hq, Nq, Dv)")
    _check_shape(out, "out", out_shape, "(B, Hq, Nq, Dv)")
    _check_lse(lse, q, "q", [s.batch, s.heads, s.nq], "(B, Hq, Nq)")


def _check_cu_seqlens(cu: Optional[Tensor], name: str, q: Tensor) -> None:
    if cu is None:
        raise ValueError(f"selfattn: {name} must be a tensor, got None")
    if cu.dtype != torch.int32:
        raise TypeError(f"selfattn: {name} must be torch.int32, got {cu.dtype}")
    if cu.device != q.device:
        raise ValueError(f"selfattn: {name} must be on the device of q ({q.device}), got {cu.device}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"selfattn: {name} must be 1-D (S + 1,) with S >= 0 sequences, got shape {_sizes(cu)}")


def check_varlen_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                        max_seqlen_q: int, max_seqlen_k: int, scale: float) -> VarlenShape:
    """Everything about varlen_attention_fwd's arguments that needs no data. The values of
    cu_seqlens (0 first, non-decreasing, T last, no sequence longer than max_seqlen) only the
    kernels check (checks.cpp, check_cu_seqlens_values): fake tensors carry none."""
    _check_qkv(q, k, v, 3, "(Tq, Hq, D)", "(Tk, Hk, D)", "(Tk, Hk, Dv)")
    total_q, total_k, heads, heads_kv, dim, dim_v = (q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2],
                                                     v.shape[2])
    _check_heads_divide(heads, heads_kv)
    _check_shape(k, "k", [total_k, heads_kv, dim], "(Tk, Hk, D) with D of q")
    _check_shape(v, "v", [total_k, heads_kv, dim_v], "(Tk, Hk, Dv) with Tk, Hk of k")
    _check_scale(scale)
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q)
    num_seqs = cu_seqlens_q.shape[0] - 1
    _check_shape(cu_seqlens_k, "cu_seqlens_k", [num_seqs + 1], "(S + 1,) with S of cu_seqlens_q")
    if max_seqlen_q < 0:
        raise ValueError(f"selfattn: max_seqlen_q must be >= 0, got {max_seqlen_q}")
    if max_seqlen_k < 0:
        raise ValueError(f"selfattn: max_seqlen_k must be >= 0, got {max_seqlen_k}")
    return VarlenShape(total_q, total_k, heads, heads_kv, dim, dim_v, num_seqs)


def check_varlen_grad_inputs(s: VarlenShape, q: Tensor, grad_out: Tensor, out: Tensor, lse: Tensor) -> None:
    _check_float_tensor(grad_out, "grad_out")
    _check_float_tensor(out, "out")
    _check_like(grad_out, "grad_out", q, "q")
    _check_like(out, "out", q, "q")
    out_shape = [s.total_q, s.heads, s.dim_v]
    _check_shape(grad_out, "grad_out", out_shape, "(Tq, Hq, Dv)")
    _check_shape(out, "out", out_shape, "(Tq, Hq, Dv)")
    _check_lse(lse, q, "q", [s.heads, s.total_q], "(Hq, Tq)")


def check_layer_inputs(x: Tensor, w_qkv: Tensor, b_qkv: Optional[Tensor], num_heads: int,
                       num_kv_heads: int, scale: float) -> LayerShape:
    _check_float_tensor(x, "x")
    _check_float_tensor(w_qkv, "w_qkv")
    _check_rank(x, "x", 3, "(B, N, E)")
    _check_rank(w_qkv, "w_qkv", 2, "((num_heads + 2 * num_kv_heads) * head_dim, embed_dim)")
    _check_like(w_qkv, "w_qkv", x, "x")
    if num_heads < 1:
        raise ValueError(f"selfattn: num_heads must be >= 1, got {num_heads}")
    if not (num_kv_heads == 0 or (num_kv_heads >= 1 and num_heads % num_kv_heads == 0)):
        raise ValueError(f"selfattn: num_kv_heads must be >= 1 and divide num_heads = {num_heads} "
                         f"(0 means num_heads), got {num_kv_heads}")
    heads_kv = num_heads if num_kv_heads == 0 else num_kv_heads
    slots = num_heads + 2 * heads_kv
    rows, embed = w_qkv.shape[0], x.shape[2]
    if not (rows >= slots and rows % slots == 0 and w_qkv.shape[1] == embed):
        raise ValueError("selfattn: w_qkv must have shape ((num_heads + 2 * num_kv_heads) * head_dim, "
                         f"embed_dim) with num_heads + 2 * num_kv_heads = {slots} and embed_dim = "
                         f"x.size(-1) = {embed}, got {_sizes(w_qkv)}")
    if b_qkv is not None:
        _check_float_tensor(b_qkv, "b_qkv")
        _check_like(b_qkv, "b_qkv", x, "x")
        _check_shape(b_qkv, "b_qkv", [rows], "((num_heads + 2 * num_kv_heads) * head_dim,)")
    _check_scale(scale)
    head_dim = rows // slots
    return LayerShape(x.shape[0], x.shape[1], embed, num_heads * head_dim, num_heads, heads_kv, head_dim)


def check_layer_mask_inputs(s: LayerShape, x: Tensor, attn_mask: Optional[Tensor], window_left: int,
                            window_right: int) -> None:
    attention = AttentionShape(s.batch, s.heads, s.heads_kv, s.seq, s.seq, s.head_dim, s.head_dim)
    check_mask_inputs(attention, x, attn_mask, window_left, window_right)


def check_layer_grad_inputs(s: LayerShape, x: Tensor, grad_out: Tensor, qkv: Tensor, out: Tensor,
                            lse: Tensor, output_mask: Sequence[bool]) -> None:
    if len(output_mask) != 3:
        raise ValueError(f"selfattn: output_mask must have 3 entries (grad_x, grad_w, grad_b), got "
                         f"{len(output_mask)}")
    _check_float_tensor(grad_out, "grad_out")
    _check_float_tensor(qkv, "qkv")
    _check_float_tensor(out, "out")
    _check_like(grad_out, "grad_out", x, "x")
    _check_like(qkv, "qkv", x, "x")
    _check_like(out, "out", x, "x")
    out_shape = [s.batch, s.seq, s.model]
    _check_shape(grad_out, "grad_out", out_shape, "(B, N, M)")
    _check_shape(out, "out", out_shape, "(B, N, M)")
    _check_shape(qkv, "qkv", [s.batch, s.seq, s.qkv_dim], "(B, N, (num_heads + 2 * num_kv_heads) * head_dim)")
    _check_lse(lse, x, "x", [s.batch, s.heads, s.seq], "(B, num_heads, N)")
