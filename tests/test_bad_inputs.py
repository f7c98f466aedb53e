"""Every bad tensor argument, through every door that can carry it, gets the same clear error.

The doors: the public function (where it can carry the argument); the raw op
``torch.ops.selfattn.*`` (normal dispatch: the device's C++ kernel, or the Meta kernel when a meta
tensor is among the arguments); the device's C++ kernel called directly (``redispatch``, so a meta
tensor mixed with CPU ones still reaches the device's kernel); meta tensors (the Meta kernel); and
torch.compile, whose fake tensors, static or symbolic, run the Meta kernel while tracing. There is
one definition of the checks (csrc/checks.cpp), which every kernel runs: these tests hold every
door to it. A fault in a tensor's values (cu_seqlens) only the kernels can see: no meta door for
those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import selfattn

ops = torch.ops.selfattn
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DISPATCH_KEY = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}


@dataclass
class Case:
    name: str
    op: str                      # the raw op that takes the bad argument
    make: Callable               # device -> the op's arguments, one of them bad
    error: type
    message: str                 # a regex for the distinctive part of the message
    public: Optional[Callable] = None  # op arguments -> the public call that carries them
    mixes_devices: bool = False  # moving every tensor to meta would remove the fault
    needs_data: bool = False     # a fault in a tensor's values: meta tensors carry none


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# --- attention_fwd / attention_bwd ---------------------------------------------------------------

def attn_fwd(q_shape=(2, 2, 5, 8), k_shape=(2, 2, 6, 8), v_shape=(2, 2, 6, 4), dtypes=(torch.float32,) * 3,
             devices=(None,) * 3, scale=0.3):
    def make(device):
        tensors = [randn(*s, device=d or device).to(t) for s, t, d in zip((q_shape, k_shape, v_shape), dtypes, devices)]
        return (*tensors, False, scale)
    return make


def attention_public(q, k, v, causal, scale, attn_mask=None, window_left=-1, window_right=-1, diagonal_offset=0):
    assert diagonal_offset == 0, "the public function sets the offset from causal's alignment"
    return selfattn.attention(q, k, v, attn_mask, causal=causal, scale=scale, enable_gqa=True,
                              window=(window_left, window_right))


def masked(mask: Callable, window=(-1, -1), heads_kv=2):
    """attention_fwd's arguments on (2, 2, 5, 8) x (2, heads_kv, 6, 8) with mask(device) and a window."""
    def make(device):
        q, k, v = randn(2, 2, 5, 8, device=device), randn(2, heads_kv, 6, 8, device=device), randn(2, heads_kv, 6, 4, device=device)
        return (q, k, v, False, 0.3, mask(device), *window, 0)
    return make


def attn_bwd(change: Callable):
    """attention_bwd's arguments from a real forward on (2, 2, 5, 8) x (2, 2, 6, 8) x (2, 2, 6, 4),
    then ``change`` swaps one of them for a bad one."""
    def make(device):
        q, k, v = randn(2, 2, 5, 8, device=device), randn(2, 2, 6, 8, device=device), randn(2, 2, 6, 4, device=device)
        out, lse = ops.attention_fwd(q, k, v, False, 0.3)
        args = dict(grad_out=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse)
        args.update(change(args))
        return (*args.values(), False, 0.3)
    return make


def attn_jvp(change: Callable):
    """attention_jvp's arguments on (2, 2, 5, 8) x (2, 2, 6, 8) x (2, 2, 6, 4) with a tangent for each
    input, then ``change`` swaps one of them for a bad one."""
    def make(device):
        q, k, v = randn(2, 2, 5, 8, device=device), randn(2, 2, 6, 8, device=device), randn(2, 2, 6, 4, device=device)
        args = dict(q=q, k=k, v=v, tangent_q=torch.randn_like(q), tangent_k=torch.randn_like(k),
                    tangent_v=torch.randn_like(v))
        args.update(change(args))
        return (*args.values(), False, 0.3)
    return make


f32, f64, bf16, i64 = torch.float32, torch.float64, torch.bfloat16, torch.int64
ATTENTION = [
    Case("q 5-D", "attention_fwd", attn_fwd(q_shape=(1, 2, 2, 5, 8)), ValueError, r"q must be 4-D \(B, Hq, Nq, D\)"),
    Case("k 3-D", "attention_fwd", attn_fwd(k_shape=(2, 6, 8)), ValueError, r"k must be 4-D \(B, Hk, Nk, D\)"),
    Case("batch", "attention_fwd", attn_fwd(k_shape=(3, 2, 6, 8), v_shape=(3, 2, 6, 4)), ValueError,
         r"k must have shape \(B, Hk, Nk, D\) with B, D of q = \[2, 2, 6, 8\], got \[3, 2, 6, 8\]", attention_public),
    Case("heads", "attention_fwd", attn_fwd(v_shape=(2, 1, 6, 4)), ValueError,
         r"v must have shape \(B, Hk, Nk, Dv\) .* = \[2, 2, 6, 4\], got \[2, 1, 6, 4\]", attention_public),
    Case("head dim", "attention_fwd", attn_fwd(k_shape=(2, 2, 6, 7)), ValueError,
         r"k must have shape .* got \[2, 2, 6, 7\]", attention_public),
    Case("k/v lengths", "attention_fwd", attn_fwd(v_shape=(2, 2, 7, 4)), ValueError,
         r"v must have shape .* = \[2, 2, 6, 4\], got \[2, 2, 7, 4\]", attention_public),
    Case("mixed dtypes", "attention_fwd", attn_fwd(dtypes=(f32, f64, f32)), TypeError,
         r"k must have the dtype of q \(torch.float32\), got torch.float64", attention_public),
    Case("integer q", "attention_fwd", attn_fwd(dtypes=(i64,) * 3), TypeError,
         r"q must be float32, float64, bfloat16 or float16, got torch.int64", attention_public),
    Case("bool k", "attention_fwd", attn_fwd(dtypes=(f32, torch.bool, f32)), TypeError,
         r"k must be float32, .* got torch.bool", attention_public),
    Case("v on meta", "attention_fwd", attn_fwd(devices=(None, None, "meta")), ValueError,
         r"v must be on the device of q \((cpu|cuda:0)\), got meta", attention_public, mixes_devices=True),
    Case("scale nan", "attention_fwd", attn_fwd(scale=float("nan")), ValueError, r"scale must be finite, got nan",
         attention_public),
    Case("mask shape", "attention_fwd", masked(lambda d: torch.ones(2, 2, 5, 7, dtype=torch.bool, device=d)), ValueError,
         r"attn_mask must be 4-D and broadcast to \(B, Hq, Nq, Nk\) = \[2, 2, 5, 6\], got shape \[2, 2, 5, 7\]",
         attention_public),
    Case("mask 5-D", "attention_fwd", masked(lambda d: torch.ones(1, 2, 2, 5, 6, dtype=torch.bool, device=d)), ValueError,
         r"attn_mask must be 4-D and broadcast to .* got shape \[1, 2, 2, 5, 6\]", attention_public),
    Case("mask integer", "attention_fwd", masked(lambda d: torch.ones(2, 1, 1, 6, dtype=torch.int32, device=d)), TypeError,
         r"attn_mask must be bool, float32 or the dtype of q \(torch.float32\), got torch.int32", attention_public),
    Case("mask float64 for float32", "attention_fwd", masked(lambda d: torch.zeros(1, 1, 5, 6, dtype=f64, device=d)),
         TypeError, r"attn_mask must be bool, float32 or the dtype of q \(torch.float32\), got torch.float64",
         attention_public),
    Case("mask on meta", "attention_fwd", masked(lambda d: torch.ones(2, 1, 1, 6, dtype=torch.bool, device="meta")),
         ValueError, r"attn_mask must be on the device of q \((cpu|cuda:0)\), got meta", attention_public,
         mixes_devices=True),
    Case("gqa heads", "attention_fwd", masked(lambda d: None, heads_kv=3), ValueError,
         r"k must have a number of heads that divides q's \(grouped-query attention\), got 3 for k and 2 for q",
         attention_public),
    Case("window_left -2", "attention_fwd", masked(lambda d: None, window=(-2, 0)), ValueError,
         r"window_left must be >= -1 \(-1: unbounded\), got -2", attention_public),
    Case("window_right -3", "attention_fwd", masked(lambda d: None, window=(4, -3)), ValueError,
         r"window_right must be >= -1 \(-1: unbounded\), got -3", attention_public),
    Case("lse shape", "attention_bwd", attn_bwd(lambda a: {"lse": a["lse"][:, :, :4]}), ValueError,
         r"lse must have shape \(B, Hq, Nq\) = \[2, 2, 5\], got \[2, 2, 4\]"),
    Case("lse heads", "attention_bwd", attn_bwd(lambda a: {"lse": a["lse"][:, :1]}), ValueError,
         r"lse must have shape \(B, Hq, Nq\) = \[2, 2, 5\], got \[2, 1, 5\]"),
    Case("lse dtype", "attention_bwd", attn_bwd(lambda a: {"lse": a["lse"].double()}), TypeError,
         r"lse must be torch.float32 for torch.float32 inputs, got torch.float64"),
    Case("lse on meta", "attention_bwd", attn_bwd(lambda a: {"lse": a["lse"].to("meta")}), ValueError,
         r"lse must be on the device of q \((cpu|cuda:0)\), got meta", mixes_devices=True),
    Case("out shape", "attention_bwd", attn_bwd(lambda a: {"out": a["out"][:, :, :, :3]}), ValueError,
         r"out must have shape \(B, Hq, Nq, Dv\) = \[2, 2, 5, 4\], got \[2, 2, 5, 3\]"),
    Case("out dtype", "attention_bwd", attn_bwd(lambda a: {"out": a["out"].bfloat16()}), TypeError,
         r"out must have the dtype of q \(torch.float32\), got torch.bfloat16"),
    Case("grad_out shape", "attention_bwd", attn_bwd(lambda a: {"grad_out": a["grad_out"][:1]}), ValueError,
         r"grad_out must have shape \(B, Hq, Nq, Dv\) = \[2, 2, 5, 4\], got \[1, 2, 5, 4\]"),
    Case("grad_out on meta", "attention_bwd", attn_bwd(lambda a: {"grad_out": a["grad_out"].to("meta")}), ValueError,
         r"grad_out must be on the device of q \((cpu|cuda:0)\), got meta", mixes_devices=True),
    Case("q of bwd integer", "attention_bwd", attn_bwd(lambda a: {"q": a["q"].long()}), TypeError,
         r"q must be float32, .* got torch.int64"),
    Case("tangent_q shape", "attention_jvp", attn_jvp(lambda a: {"tangent_q": a["tangent_q"][:, :, :4]}), ValueError,
         r"tangent_q must have shape \(B, Hq, Nq, D\), q's = \[2, 2, 5, 8\], got \[2, 2, 4, 8\]"),
    Case("tangent_k heads", "attention_jvp", attn_jvp(lambda a: {"tangent_k": a["tangent_k"][:, :1]}), ValueError,
         r"tangent_k must have shape \(B, Hk, Nk, D\), k's = \[2, 2, 6, 8\], got \[2, 1, 6, 8\]"),
    Case("tangent_v head dim", "attention_jvp", attn_jvp(lambda a: {"tangent_v": a["tangent_v"][..., :3]}), ValueError,
         r"tangent_v must have shape \(B, Hk, Nk, Dv\), v's = \[2, 2, 6, 4\], got \[2, 2, 6, 3\]"),
    Case("tangent_k dtype", "attention_jvp", attn_jvp(lambda a: {"tangent_k": a["tangent_k"].double()}), TypeError,
         r"tangent_k must have the dtype of q \(torch.float32\), got torch.float64"),
    Case("tangent_q integer", "attention_jvp", attn_jvp(lambda a: {"tangent_q": a["tangent_q"].long()}), TypeError,
         r"tangent_q must be float32, float64, bfloat16 or float16, got torch.int64"),
    Case("tangent_v on meta", "attention_jvp", attn_jvp(lambda a: {"tangent_v": a["tangent_v"].to("meta")}),
         ValueError, r"tangent_v must be on the device of q \((cpu|cuda:0)\), got meta", mixes_devices=True),
    Case("q of jvp 3-D", "attention_jvp", attn_jvp(lambda a: {"q": a["q"][0]}), ValueError,
         r"q must be 4-D \(B, Hq, Nq, D\)"),
]


# --- self_attention_fwd / self_attention_bwd -----------------------------------------------------

def layer_fwd(change: Callable = lambda a: {}):
    """x (2, 5, 8), w_qkv (3·6, 8), b_qkv (18), 2 heads, no mask, then ``change`` makes one bad."""
    def make(device):
        args = dict(x=randn(2, 5, 8, device=device), w=randn(18, 8, device=device), b=randn(18, device=device), heads=2,
                    causal=False, scale=0.3, kv_heads=0, mask=None, window_left=-1, window_right=-1)
        args.update(change(args))
        if isinstance(args["mask"], Callable):
            args["mask"] = args["mask"](device)
        return tuple(args.values())
    return make


def layer_public(x, w, b, heads, causal, scale, kv_heads=0, mask=None, window_left=-1, window_right=-1):
    window = None if (window_left, window_right) == (-1, -1) else (window_left, window_right)
    return selfattn.self_attention(x, w, b, num_heads=heads, causal=causal, scale=scale,
                                   num_kv_heads=kv_heads or None, attn_mask=mask, window=window)


def layer_bwd(change: Callable, heads=2):
    """self_attention_bwd's arguments from a real forward (x (2, 5, 8), M = 8, 2 heads), then
    ``change`` swaps one of them for a bad one; ``heads`` is the num_heads the backward is given."""
    def make(device):
        x, w = randn(2, 5, 8, device=device), randn(24, 8, device=device)
        out, qkv, lse = ops.self_attention_fwd(x, w, None, 2, False, 0.3)
        args = dict(grad_out=torch.randn_like(out), x=x, w=w, qkv=qkv, out=out, lse=lse)
        args.update(change(args))
        mask = args.pop("mask", [True, True, False, False])
        extra = args.pop("extra", ())  # num_kv_heads, attn_mask, window_left, window_right
        return (*args.values(), heads, False, 0.3, mask, *extra)
    return make


def bool_mask(*shape, dtype=torch.bool):
    return lambda device: torch.ones(*shape, dtype=dtype, device=device)


ROWS = r"w_qkv must have shape \(\(num_heads \+ 2 \* num_kv_heads\) \* head_dim, embed_dim\)"
LAYER = [
    Case("x 4-D", "self_attention_fwd", layer_fwd(lambda a: {"x": a["x"][None]}), ValueError,
         r"x must be 3-D \(B, N, E\), got shape \[1, 2, 5, 8\]", layer_public),
    Case("w rows not 3M", "self_attention_fwd", layer_fwd(lambda a: {"w": a["w"][:-1]}), ValueError,
         ROWS + r" with num_heads \+ 2 \* num_kv_heads = 6 and embed_dim = x.size\(-1\) = 8, got \[17, 8\]",
         layer_public),
    Case("w width", "self_attention_fwd", layer_fwd(lambda a: {"w": a["w"][:, :-1]}), ValueError,
         ROWS + r" .* got \[18, 7\]", layer_public),
    Case("w 1-D", "self_attention_fwd", layer_fwd(lambda a: {"w": a["w"][0]}), ValueError,
         r"w_qkv must be 2-D \(\(num_heads \+ 2 \* num_kv_heads\) \* head_dim, embed_dim\), got shape \[8\]",
         layer_public),
    Case("b shape", "self_attention_fwd", layer_fwd(lambda a: {"b": a["b"][:-1]}), ValueError,
         r"b_qkv must have shape \(\(num_heads \+ 2 \* num_kv_heads\) \* head_dim,\) = \[18\], got \[17\]",
         layer_public),
    Case("heads do not divide rows", "self_attention_fwd", layer_fwd(lambda a: {"heads": 4}), ValueError,
         ROWS + r" with num_heads \+ 2 \* num_kv_heads = 12 and .* got \[18, 8\]", layer_public),
    Case("num_heads 0", "self_attention_fwd", layer_fwd(lambda a: {"heads": 0}), ValueError,
         r"num_heads must be >= 1, got 0", layer_public),
    Case("num_kv_heads does not divide num_heads", "self_attention_fwd",
         layer_fwd(lambda a: {"heads": 4, "kv_heads": 3}), ValueError,
         r"num_kv_heads must be >= 1 and divide num_heads = 4 \(0 means num_heads\), got 3", layer_public),
    Case("num_kv_heads -1", "self_attention_fwd", layer_fwd(lambda a: {"kv_heads": -1}), ValueError,
         r"num_kv_heads must be >= 1 and divide num_heads = 2 \(0 means num_heads\), got -1", layer_public),
    Case("w rows not (H + 2Hkv)D", "self_attention_fwd", layer_fwd(lambda a: {"kv_heads": 1}), ValueError,
         ROWS + r" with num_heads \+ 2 \* num_kv_heads = 4 and embed_dim = x.size\(-1\) = 8, got \[18, 8\]",
         layer_public),
    Case("b rows with GQA", "self_attention_fwd", layer_fwd(lambda a: {"kv_heads": 1, "w": a["w"][:16]}),
         ValueError, r"b_qkv must have shape \(\(num_heads \+ 2 \* num_kv_heads\) \* head_dim,\) = \[16\], "
         r"got \[18\]", layer_public),
    Case("window_left -2", "self_attention_fwd", layer_fwd(lambda a: {"window_left": -2}), ValueError,
         r"window_left must be >= -1 \(-1: unbounded\), got -2", layer_public),
    Case("window_right -2", "self_attention_fwd", layer_fwd(lambda a: {"window_right": -2}), ValueError,
         r"window_right must be >= -1 \(-1: unbounded\), got -2", layer_public),
    Case("attn_mask keys", "self_attention_fwd", layer_fwd(lambda a: {"mask": bool_mask(2, 1, 5, 4)}), ValueError,
         r"attn_mask must be 4-D and broadcast to \(B, Hq, Nq, Nk\) = \[2, 2, 5, 5\], got shape \[2, 1, 5, 4\]",
         layer_public),
    Case("attn_mask heads", "self_attention_fwd", layer_fwd(lambda a: {"mask": bool_mask(1, 3, 5, 5)}), ValueError,
         r"attn_mask must be 4-D and broadcast to .* got shape \[1, 3, 5, 5\]", layer_public),
    Case("attn_mask integer", "self_attention_fwd", layer_fwd(lambda a: {"mask": bool_mask(5, 5, dtype=torch.int64)}),
         TypeError, r"attn_mask must be bool, float32 or the dtype of q \(torch.float32\), got torch.int64",
         layer_public),
    Case("attn_mask float64", "self_attention_fwd",
         layer_fwd(lambda a: {"mask": bool_mask(1, 1, 5, 5, dtype=torch.float64)}), TypeError,
         r"attn_mask must be bool, float32 or the dtype of q \(torch.float32\), got torch.float64", layer_public),
    Case("w dtype", "self_attention_fwd", layer_fwd(lambda a: {"w": a["w"].double()}), TypeError,
         r"w_qkv must have the dtype of x \(torch.float32\), got torch.float64", layer_public),
    Case("b dtype", "self_attention_fwd", layer_fwd(lambda a: {"b": a["b"].bfloat16()}), TypeError,
         r"b_qkv must have the dtype of x \(torch.float32\), got torch.bfloat16", layer_public),
    Case("w on meta", "self_attention_fwd", layer_fwd(lambda a: {"w": a["w"].to("meta")}), ValueError,
         r"w_qkv must be on the device of x \((cpu|cuda:0)\), got meta", layer_public, mixes_devices=True),
    Case("attn_mask on meta", "self_attention_fwd", layer_fwd(lambda a: {"mask": bool_mask(1, 1, 5, 5)("meta")}),
         ValueError, r"attn_mask must be on the device of q \((cpu|cuda:0)\), got meta", layer_public,
         mixes_devices=True),
    Case("x integer", "self_attention_fwd", layer_fwd(lambda a: {"x": a["x"].long()}), TypeError,
         r"x must be float32, .* got torch.int64", layer_public),
    Case("layer lse shape", "self_attention_bwd", layer_bwd(lambda a: {"lse": a["lse"][:, :, 1:]}), ValueError,
         r"lse must have shape \(B, num_heads, N\) = \[2, 2, 5\], got \[2, 2, 4\]"),
    Case("layer lse dtype", "self_attention_bwd", layer_bwd(lambda a: {"lse": a["lse"].half()}), TypeError,
         r"lse must be torch.float32 for torch.float32 inputs, got torch.float16"),
    Case("layer lse on meta", "self_attention_bwd", layer_bwd(lambda a: {"lse": a["lse"].to("meta")}), ValueError,
         r"lse must be on the device of x \((cpu|cuda:0)\), got meta", mixes_devices=True),
    Case("num_heads disagrees", "self_attention_bwd", layer_bwd(lambda a: {}, heads=4), ValueError,
         r"lse must have shape \(B, num_heads, N\) = \[2, 4, 5\], got \[2, 2, 5\]"),
    # 24 rows read with 2 + 2·1 heads: head_dim 6, so M = 12 where the forward had 8.
    Case("num_kv_heads disagrees", "self_attention_bwd", layer_bwd(lambda a: {"extra": (1,)}), ValueError,
         r"grad_out must have shape \(B, N, M\) = \[2, 5, 12\], got \[2, 5, 8\]"),
    Case("num_kv_heads of bwd", "self_attention_bwd", layer_bwd(lambda a: {"extra": (3,)}), ValueError,
         r"num_kv_heads must be >= 1 and divide num_heads = 2 \(0 means num_heads\), got 3"),
    Case("attn_mask of bwd", "self_attention_bwd",
         layer_bwd(lambda a: {"extra": (0, torch.ones(2, 2, 4, 5, dtype=torch.bool, device=a["x"].device))}),
         ValueError, r"attn_mask must be 4-D and broadcast to \(B, Hq, Nq, Nk\) = \[2, 2, 5, 5\], got shape "
         r"\[2, 2, 4, 5\]"),
    Case("window of bwd", "self_attention_bwd", layer_bwd(lambda a: {"extra": (0, None, -1, -3)}), ValueError,
         r"window_right must be >= -1 \(-1: unbounded\), got -3"),
    Case("qkv shape", "self_attention_bwd", layer_bwd(lambda a: {"qkv": a["qkv"][:, :, :-1]}), ValueError,
         r"qkv must have shape \(B, N, \(num_heads \+ 2 \* num_kv_heads\) \* head_dim\) = \[2, 5, 24\], "
         r"got \[2, 5, 23\]"),
    Case("qkv dtype", "self_attention_bwd", layer_bwd(lambda a: {"qkv": a["qkv"].double()}), TypeError,
         r"qkv must have the dtype of x \(torch.float32\), got torch.float64"),
    Case("out shape (layer)", "self_attention_bwd", layer_bwd(lambda a: {"out": a["out"][:, 1:]}), ValueError,
         r"out must have shape \(B, N, M\) = \[2, 5, 8\], got \[2, 4, 8\]"),
    Case("grad_out shape (layer)", "self_attention_bwd", layer_bwd(lambda a: {"grad_out": a["grad_out"][None]}),
         ValueError, r"grad_out must have shape \(B, N, M\) = \[2, 5, 8\], got \[1, 2, 5, 8\]"),
    Case("output_mask short", "self_attention_bwd", layer_bwd(lambda a: {"mask": [True] * 3}), ValueError,
         r"output_mask must have 4 entries \(grad_x, grad_w, grad_b, grad_sinks\), got 3"),
    Case("output_mask long", "self_attention_bwd", layer_bwd(lambda a: {"mask": [True] * 5}), ValueError,
         r"output_mask must have 4 entries \(grad_x, grad_w, grad_b, grad_sinks\), got 5"),
]

# --- varlen_attention_fwd / varlen_attention_bwd -------------------------------------------------

def cu(*values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def varlen_fwd(change: Callable = lambda a: {}):
    """q (5, 2, 8), k (9, 2, 8), v (9, 2, 4), two sequences of 2 + 3 queries and 3 + 6 keys,
    then ``change`` makes one argument bad."""
    def make(device):
        args = dict(q=randn(5, 2, 8, device=device), k=randn(9, 2, 8, device=device), v=randn(9, 2, 4, device=device),
                    cu_q=cu(0, 2, 5, device=device), cu_k=cu(0, 3, 9, device=device), max_q=3, max_k=6,
                    causal=False, scale=0.3, window_left=-1, window_right=-1, bottom_right=False)
        args.update(change(args))
        return tuple(args.values())
    return make


def varlen_public(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left, window_right, bottom_right):
    return selfattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal="bottom_right" if bottom_right else causal,
                                     scale=scale, window=(window_left, window_right), enable_gqa=True)


def varlen_bwd(change: Callable):
    """varlen_attention_bwd's arguments from a real forward on varlen_fwd's inputs, then ``change``
    swaps one of them for a bad one."""
    def make(device):
        q, k, v, cu_q, cu_k, *rest = varlen_fwd()(device)
        out, lse = ops.varlen_attention_fwd(q, k, v, cu_q, cu_k, *rest)
        args = dict(grad_out=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse, cu_q=cu_q, cu_k=cu_k,
                    max_q=rest[0], max_k=rest[1])
        args.update(change(args))
        return (*args.values(), *rest[2:])
    return make


VARLEN = [
    Case("varlen q 4-D", "varlen_attention_fwd", varlen_fwd(lambda a: {"q": a["q"][None]}), ValueError,
         r"q must be 3-D \(Tq, Hq, D\), got shape \[1, 5, 2, 8\]", varlen_public),
    Case("varlen k head dim", "varlen_attention_fwd", varlen_fwd(lambda a: {"k": a["k"][..., :-1]}), ValueError,
         r"k must have shape \(Tk, Hk, D\) with D of q = \[9, 2, 8\], got \[9, 2, 7\]", varlen_public),
    Case("varlen v rows", "varlen_attention_fwd", varlen_fwd(lambda a: {"v": a["v"][:-1]}), ValueError,
         r"v must have shape \(Tk, Hk, Dv\) with Tk, Hk of k = \[9, 2, 4\], got \[8, 2, 4\]", varlen_public),
    Case("varlen heads do not divide", "varlen_attention_fwd",
         varlen_fwd(lambda a: {"k": torch.cat([a["k"], a["k"][:, :1]], 1), "v": torch.cat([a["v"], a["v"][:, :1]], 1)}),
         ValueError, r"k must have a number of heads that divides q's .* got 3 for k and 2 for q", varlen_public),
    Case("varlen mixed dtypes", "varlen_attention_fwd", varlen_fwd(lambda a: {"v": a["v"].double()}), TypeError,
         r"v must have the dtype of q \(torch.float32\), got torch.float64", varlen_public),
    Case("cu_seqlens int64", "varlen_attention_fwd", varlen_fwd(lambda a: {"cu_q": a["cu_q"].long()}), TypeError,
         r"cu_seqlens_q must be torch.int32, got torch.int64", varlen_public),
    Case("cu_seqlens float", "varlen_attention_fwd", varlen_fwd(lambda a: {"cu_k": a["cu_k"].float()}), TypeError,
         r"cu_seqlens_k must be torch.int32, got torch.float32", varlen_public),
    Case("cu_seqlens 2-D", "varlen_attention_fwd", varlen_fwd(lambda a: {"cu_q": a["cu_q"][None]}), ValueError,
         r"cu_seqlens_q must be 1-D \(S \+ 1,\) with S >= 0 sequences, got shape \[1, 3\]", varlen_public),
    Case("cu_seqlens empty", "varlen_attention_fwd", varlen_fwd(lambda a: {"cu_k": a["cu_k"][:0]}), ValueError,
         r"cu_seqlens_k must be 1-D \(S \+ 1,\) with S >= 0 sequences, got shape \[0\]", varlen_public),
    Case("cu_seqlens lengths differ", "varlen_attention_fwd",
         varlen_fwd(lambda a: {"cu_k": cu(0, 9, device=a["k"].device)}), ValueError,
         r"cu_seqlens_k must have shape \(S \+ 1,\) with S of cu_seqlens_q = \[3\], got \[2\]", varlen_public),
    Case("cu_seqlens on meta", "varlen_attention_fwd", varlen_fwd(lambda a: {"cu_q": a["cu_q"].to("meta")}),
         ValueError, r"cu_seqlens_q must be on the device of q \((cpu|cuda:0)\), got meta", varlen_public,
         mixes_devices=True),
    Case("cu_seqlens not from 0", "varlen_attention_fwd",
         varlen_fwd(lambda a: {"cu_q": cu(1, 2, 5, device=a["q"].device)}), ValueError,
         r"cu_seqlens_q must start at 0, got 1", varlen_public, needs_data=True),
    Case("cu_seqlens decreasing", "varlen_attention_fwd",
         varlen_fwd(lambda a: {"cu_k": cu(0, 10, 9, device=a["k"].device), "max_k": 10}), ValueError,
         r"cu_seqlens_k must be non-decreasing, got cu_seqlens_k\[2\] = 9 < cu_seqlens_k\[1\] = 10", varlen_public,
         needs_data=True),
    Case("cu_seqlens last != T", "varlen_attention_fwd",
         varlen_fwd(lambda a: {"cu_q": cu(0, 2, 4, device=a["q"].device)}), ValueError,
         r"cu_seqlens_q must end at Tq = q.size\(0\) = 5, got 4", varlen_public, needs_data=True),
    Case("max_seqlen too small", "varlen_attention_fwd", varlen_fwd(lambda a: {"max_k": 5}), ValueError,
         r"max_seqlen_k = 5 is less than the length of sequence 1 \(cu_seqlens_k\[2\] - cu_seqlens_k\[1\] = 6\)",
         varlen_public, needs_data=True),
    Case("max_seqlen negative", "varlen_attention_fwd", varlen_fwd(lambda a: {"max_q": -1}), ValueError,
         r"max_seqlen_q must be >= 0, got -1", varlen_public),
    # The public function refuses a window side < -1 itself (selfattn/masks.py, in its own words, as
    # selfattn.attention does): no public door.
    Case("varlen window -2", "varlen_attention_fwd", varlen_fwd(lambda a: {"window_left": -2}), ValueError,
         r"window_left must be >= -1 \(-1: unbounded\), got -2"),
    Case("varlen window right -3", "varlen_attention_fwd", varlen_fwd(lambda a: {"window_right": -3}), ValueError,
         r"window_right must be >= -1 \(-1: unbounded\), got -3"),
    Case("varlen scale inf", "varlen_attention_fwd", varlen_fwd(lambda a: {"scale": float("inf")}), ValueError,
         r"scale must be finite, got inf", varlen_public),
    Case("varlen lse shape", "varlen_attention_bwd", varlen_bwd(lambda a: {"lse": a["lse"][:, :-1]}), ValueError,
         r"lse must have shape \(Hq, Tq\) = \[2, 5\], got \[2, 4\]"),
    Case("varlen lse transposed", "varlen_attention_bwd", varlen_bwd(lambda a: {"lse": a["lse"].t()}), ValueError,
         r"lse must have shape \(Hq, Tq\) = \[2, 5\], got \[5, 2\]"),
    Case("varlen lse dtype", "varlen_attention_bwd", varlen_bwd(lambda a: {"lse": a["lse"].double()}), TypeError,
         r"lse must be torch.float32 for torch.float32 inputs, got torch.float64"),
    Case("varlen out shape", "varlen_attention_bwd", varlen_bwd(lambda a: {"out": a["out"][:, :, :3]}), ValueError,
         r"out must have shape \(Tq, Hq, Dv\) = \[5, 2, 4\], got \[5, 2, 3\]"),
    Case("varlen grad_out on meta", "varlen_attention_bwd",
         varlen_bwd(lambda a: {"grad_out": a["grad_out"].to("meta")}), ValueError,
         r"grad_out must be on the device of q \((cpu|cuda:0)\), got meta", mixes_devices=True),
    Case("varlen bwd cu_seqlens int64", "varlen_attention_bwd", varlen_bwd(lambda a: {"cu_k": a["cu_k"].long()}),
         TypeError, r"cu_seqlens_k must be torch.int32, got torch.int64"),
    Case("varlen bwd cu_seqlens last != T", "varlen_attention_bwd",
         varlen_bwd(lambda a: {"cu_k": cu(0, 3, 8, device=a["k"].device)}), ValueError,
         r"cu_seqlens_k must end at Tk = k.size\(0\) = 9, got 8", needs_data=True),
    Case("varlen bwd window -2", "varlen_attention_bwd",
         lambda device: varlen_bwd(lambda a: {})(device)[:-3] + (-2, -1, False), ValueError,
         r"window_left must be >= -1 \(-1: unbounded\), got -2"),
]

# --- score modifications (softcap, alibi_slopes, sinks) on every op -----------------------------

def scored(softcap=0.0, alibi=None, sinks=None):
    """attention_fwd's arguments on (2, 2, 5, 8) x (2, 2, 6, 8) x (2, 2, 6, 4), every one by
    position, with the score modifications (alibi, sinks: device -> tensor)."""
    def make(device):
        q, k, v = (randn(*shape, device=device) for shape in ((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 4)))
        return (q, k, v, False, 0.3, None, -1, -1, 0, 0.0, None, softcap, alibi and alibi(device),
                sinks and sinks(device))
    return make


def scored_public(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset, dropout_p, rng_state,
                  softcap, alibi_slopes, sinks):
    return selfattn.attention(q, k, v, attn_mask, causal=causal, scale=scale, softcap=softcap,
                              alibi_slopes=alibi_slopes, sinks=sinks)


def scored_bwd(sinks):
    """attention_bwd's arguments from a real forward on scored()'s inputs, given ``sinks`` (device -> tensor)."""
    def make(device):
        q, k, v, *_ = scored()(device)
        out, lse = ops.attention_fwd(q, k, v, False, 0.3)
        return (torch.randn_like(out), q, k, v, out, lse, False, 0.3, None, -1, -1, 0, 0.0, None, 0.0, None,
                sinks(device))
    return make


def sinks_jvp(sinks, tangent_sinks):
    """attention_jvp's arguments on scored()'s inputs with a tangent for q, and sinks / tangent_sinks."""
    def make(device):
        q, k, v, *_ = scored()(device)
        return (q, k, v, torch.randn_like(q), None, None, False, 0.3, None, -1, -1, 0, 0.0, None,
                sinks and sinks(device), tangent_sinks(device))
    return make


def scored_layer(**mods):
    """self_attention_fwd's arguments (layer_fwd's) with the score modifications (device -> tensor)."""
    def make(device):
        args = layer_fwd()(device)
        return (*args, 0.0, None, mods.get("softcap", 0.0), *(mods[n](device) if n in mods else None
                                                              for n in ("alibi", "sinks")))
    return make


def scored_layer_public(x, w, b, heads, causal, scale, kv_heads, mask, window_left, window_right, dropout_p,
                        rng_state, softcap, alibi_slopes, sinks):
    return selfattn.self_attention(x, w, b, num_heads=heads, causal=causal, scale=scale, softcap=softcap,
                                   alibi_slopes=alibi_slopes, sinks=sinks)


def scored_varlen(alibi=None, sinks=None):
    """varlen_attention_fwd's arguments (varlen_fwd's, S = 2) with slopes or sinks (device -> tensor).
    No public door: selfattn.attention_varlen takes no score modification."""
    def make(device):
        return (*varlen_fwd()(device), 0.0, None, 0.0, alibi and alibi(device), sinks and sinks(device))
    return make


def t(*shape, dtype=torch.float32, device=None):
    return lambda d: torch.rand(*shape, dtype=dtype, device=device or d)


SOFTCAP = r"softcap must be a finite number >= 0 \(0 = no softcapping\), got "
SLOPES_SHAPE = r"alibi_slopes must have shape \(Hq,\) = \[2\] or \(B, Hq\) = \[2, 2\], got "
SCORE_MODS = [
    Case("softcap -1", "attention_fwd", scored(softcap=-1.0), ValueError, SOFTCAP + "-1", scored_public),
    Case("softcap nan", "attention_fwd", scored(softcap=float("nan")), ValueError, SOFTCAP + "nan", scored_public),
    Case("softcap inf", "attention_fwd", scored(softcap=float("inf")), ValueError, SOFTCAP + "inf", scored_public),
    Case("alibi float64", "attention_fwd", scored(alibi=t(2, dtype=f64)), TypeError,
         r"alibi_slopes must be float32, got torch.float64", scored_public),
    Case("alibi bfloat16", "attention_fwd", scored(alibi=t(2, 2, dtype=bf16)), TypeError,
         r"alibi_slopes must be float32, got torch.bfloat16", scored_public),
    Case("alibi (Hq + 1,)", "attention_fwd", scored(alibi=t(3)), ValueError, SLOPES_SHAPE + r"\[3\]", scored_public),
    Case("alibi (B + 1, Hq)", "attention_fwd", scored(alibi=t(3, 2)), ValueError, SLOPES_SHAPE + r"\[3, 2\]",
         scored_public),
    Case("alibi 3-D", "attention_fwd", scored(alibi=t(1, 2, 2)), ValueError, SLOPES_SHAPE + r"\[1, 2, 2\]",
         scored_public),
    Case("alibi on meta", "attention_fwd", scored(alibi=t(2, device="meta")), ValueError,
         r"alibi_slopes must be on the device of q \((cpu|cuda:0)\), got meta", scored_public, mixes_devices=True),
    Case("sinks (Hq + 1,)", "attention_fwd", scored(sinks=t(3)), ValueError,
         r"sinks must have shape \(Hq,\) = \[2\], got \[3\]", scored_public),
    Case("sinks 2-D", "attention_fwd", scored(sinks=t(2, 1)), ValueError,
         r"sinks must have shape \(Hq,\) = \[2\], got \[2, 1\]", scored_public),
    Case("sinks float64 for float32", "attention_fwd", scored(sinks=t(2, dtype=f64)), TypeError,
         r"sinks must be float32 or the dtype of q \(torch.float32\), got torch.float64", scored_public),
    Case("sinks integer", "attention_fwd", scored(sinks=lambda d: torch.ones(2, dtype=i64, device=d)), TypeError,
         r"sinks must be float32 or the dtype of q \(torch.float32\), got torch.int64", scored_public),
    Case("sinks on meta", "attention_fwd", scored(sinks=t(2, device="meta")), ValueError,
         r"sinks must be on the device of q \((cpu|cuda:0)\), got meta", scored_public, mixes_devices=True),
    Case("sinks of bwd shape", "attention_bwd", scored_bwd(t(3)), ValueError,
         r"sinks must have shape \(Hq,\) = \[2\], got \[3\]"),
    Case("tangent_sinks shape", "attention_jvp", sinks_jvp(t(2), t(3)), ValueError,
         r"tangent_sinks must have shape \(Hq,\), that of sinks = \[2\], got \[3\]"),
    Case("tangent_sinks without sinks", "attention_jvp", sinks_jvp(None, t(2)), ValueError,
         r"tangent_sinks was given without sinks"),
    Case("tangent_sinks dtype", "attention_jvp", sinks_jvp(t(2), t(2, dtype=f64)), TypeError,
         r"tangent_sinks must have the dtype of sinks \(torch.float32\), got torch.float64"),
    Case("tangent_sinks on meta", "attention_jvp", sinks_jvp(t(2), t(2, device="meta")), ValueError,
         r"tangent_sinks must be on the device of sinks \((cpu|cuda:0)\), got meta", mixes_devices=True),
    Case("layer softcap -1", "self_attention_fwd", scored_layer(softcap=-1.0), ValueError, SOFTCAP + "-1",
         scored_layer_public),
    Case("layer alibi (B + 1, H)", "self_attention_fwd", scored_layer(alibi=t(3, 2)), ValueError,
         SLOPES_SHAPE + r"\[3, 2\]", scored_layer_public),
    Case("layer sinks shape", "self_attention_fwd", scored_layer(sinks=t(3)), ValueError,
         r"sinks must have shape \(Hq,\) = \[2\], got \[3\]", scored_layer_public),
    Case("varlen alibi (S + 1, Hq)", "varlen_attention_fwd", scored_varlen(alibi=t(3, 2)), ValueError,
         r"alibi_slopes must have shape \(Hq,\) = \[2\] or \(S, Hq\) = \[2, 2\], got \[3, 2\]"),
    Case("varlen sinks float64", "varlen_attention_fwd", scored_varlen(sinks=t(2, dtype=f64)), TypeError,
         r"sinks must be float32 or the dtype of q \(torch.float32\), got torch.float64"),
]

CASES = ATTENTION + LAYER + VARLEN + SCORE_MODS


def to_meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


def doors(case: Case, device: str):
    """(door name, a call) for every door that can carry the case's bad argument."""
    op = getattr(ops, case.op)
    keys = torch._C.DispatchKeySet(DISPATCH_KEY[device])
    found = [("op", lambda: op(*case.make(device))),
             ("kernel", lambda: op.default.redispatch(keys, *case.make(device)))]
    if not (case.mixes_devices or case.needs_data):
        found.append(("meta", lambda: op(*to_meta(case.make(device)))))
    if case.public is not None:
        found.append(("public", lambda: case.public(*case.make(device))))
    return found


def assert_same_clear_error(case: Case, device: str):
    """Every door raises case.error with case.message, the same first line, prefixed "selfattn: "."""
    messages = {}
    for door, call in doors(case, device):
        with pytest.raises(case.error, match=case.message) as caught:
            call()
        messages[door] = str(caught.value).splitlines()[0]
    assert all(m.startswith("selfattn: ") for m in messages.values()), messages
    assert len(set(messages.values())) == 1, f"the doors disagree: {messages}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_same_clear_error_from_every_door(case, device):
    assert_same_clear_error(case, device)


@pytest.mark.parametrize("case", [c for c in CASES if c.public is not None][:3], ids=lambda c: c.name)
def test_compile_reports_bad_inputs_at_trace_time(case):
    """torch.compile traces with the Meta kernels: the same error, before any kernel runs."""
    torch._dynamo.reset()
    compiled = torch.compile(case.public, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=case.message):
        compiled(*case.make("cpu"))


# (public function, its arguments, the message) with dynamic shapes: a size prints as its symbol.
DYNAMIC = [
    ("attention k's batch", attention_public, attn_fwd(k_shape=(3, 2, 6, 8), v_shape=(3, 2, 6, 4)),
     r"selfattn: k must have shape \(B, Hk, Nk, D\) with B, D of q = \[\w+, \w+, \w+, \w+\], got \[\w+, "),
    ("attention mask keys", attention_public, masked(lambda d: torch.ones(2, 2, 5, 7, dtype=torch.bool, device=d)),
     r"selfattn: attn_mask must be 4-D and broadcast to \(B, Hq, Nq, Nk\) = \[\w+, \w+, \w+, \w+\], got shape"),
    ("layer w width", layer_public, layer_fwd(lambda a: {"w": a["w"][:, :-1]}), ROWS),
    ("varlen v rows", varlen_public, varlen_fwd(lambda a: {"v": a["v"][:-1]}),
     r"selfattn: v must have shape \(Tk, Hk, Dv\) with Tk, Hk of k"),
]


@pytest.mark.parametrize("name,public,make,message", DYNAMIC, ids=[c[0] for c in DYNAMIC])
def test_compile_with_dynamic_shapes_reports_bad_inputs_at_trace_time(name, public, make, message):
    """Symbolic sizes reach the same checks (a comparison is a guard): refused while tracing."""
    torch._dynamo.reset()
    compiled = torch.compile(public, fullgraph=True, backend="eager", dynamic=True)
    with pytest.raises(Exception, match=message):
        compiled(*make("cpu"))


# --- arguments only the public function takes ---------------------------------------------------
# key_padding_mask and window=(left, right) never reach an op as they are: the public function
# checks them, on real tensors, on meta tensors and under torch.compile alike.

def layer_kwargs(single=False, **change):
    """selfattn.self_attention's arguments on x (2, 5, 8) (or (5, 8)), 2 heads, then ``change``
    (values, or device -> value)."""
    def make(device):
        x = randn(5, 8, device=device) if single else randn(2, 5, 8, device=device)
        kwargs = dict(x=x, w_qkv=randn(18, 8, device=device), num_heads=2)
        kwargs.update({k: v(device) if callable(v) else v for k, v in change.items()})
        return kwargs
    return make


def kpm(*shape, dtype=torch.bool):
    return lambda device: torch.ones(*shape, dtype=dtype, device=device)


PUBLIC_ONLY = [
    ("key_padding_mask short", layer_kwargs(key_padding_mask=kpm(2, 4)), ValueError,
     r"key_padding_mask must have shape \(B, N\) = \[2, 5\], got \[2, 4\]"),
    ("key_padding_mask transposed", layer_kwargs(key_padding_mask=kpm(5, 2)), ValueError,
     r"key_padding_mask must have shape \(B, N\) = \[2, 5\], got \[5, 2\]"),
    ("key_padding_mask 4-D", layer_kwargs(key_padding_mask=kpm(2, 1, 1, 5)), ValueError,
     r"key_padding_mask must have shape \(B, N\) = \[2, 5\], got \[2, 1, 1, 5\]"),
    ("key_padding_mask of a single sequence", layer_kwargs(single=True, key_padding_mask=kpm(1, 5)), ValueError,
     r"key_padding_mask must have shape \(N,\) for a single sequence = \[5\], got \[1, 5\]"),
    ("key_padding_mask float", layer_kwargs(key_padding_mask=kpm(2, 5, dtype=torch.float32)), TypeError,
     r"key_padding_mask must be bool \(True = a real token\), got torch.float32"),
    ("key_padding_mask int", layer_kwargs(key_padding_mask=kpm(2, 5, dtype=torch.int64)), TypeError,
     r"key_padding_mask must be bool \(True = a real token\), got torch.int64"),
    ("key_padding_mask on meta", layer_kwargs(key_padding_mask=lambda d: kpm(2, 5)("meta")), ValueError,
     r"key_padding_mask must be on the device of x \((cpu|cuda:0)\), got meta"),
    ("key_padding_mask not a tensor", layer_kwargs(key_padding_mask=[[True] * 5] * 2), TypeError,
     r"key_padding_mask must be a torch.Tensor, got list"),
    ("window not a pair", layer_kwargs(window=4), TypeError,
     r"window must be a pair \(left, right\) of ints, -1 for unbounded, got 4"),
    ("window of floats", layer_kwargs(window=(2.0, 0)), TypeError, r"window's left side must be an int, got float"),
    ("num_kv_heads float", layer_kwargs(num_kv_heads=1.0), TypeError, r"num_kv_heads must be an int, got float"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,make,error,message", PUBLIC_ONLY, ids=[c[0] for c in PUBLIC_ONLY])
def test_public_only_arguments(name, make, error, message, device):
    messages = set()
    on_meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in make(device).items()}
    mixes_devices = len({v.device for v in make(device).values() if isinstance(v, torch.Tensor)}) > 1
    for kwargs in [make(device)] + ([] if mixes_devices else [on_meta]):
        with pytest.raises(error, match=message) as caught:
            selfattn.self_attention(**kwargs)
        messages.add(str(caught.value).splitlines()[0])
    assert len(messages) == 1 and messages.pop().startswith("selfattn: ")


def test_compile_reports_bad_key_padding_mask_at_trace_time():
    torch._dynamo.reset()
    compiled = torch.compile(lambda **kw: selfattn.self_attention(**kw), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"key_padding_mask must have shape \(B, N\) = \[2, 5\], got \[2, 4\]"):
        compiled(**layer_kwargs(key_padding_mask=kpm(2, 4))("cpu"))


@pytest.mark.parametrize("door", ["attention", "op", "self_attention", "varlen op"])
def test_alibi_slopes_requiring_grad_are_refused(door):
    """The slopes are not differentiable: refused by name, from the public functions and the ops."""
    slopes = torch.rand(2, requires_grad=True)
    if door in ("attention", "op"):
        q, k, v, *_ = scored()("cpu")
        call = (lambda: selfattn.attention(q, k, v, alibi_slopes=slopes)) if door == "attention" else \
            (lambda: ops.attention_fwd(q, k, v, False, 0.3, alibi_slopes=slopes))
    elif door == "self_attention":
        x, w = randn(2, 5, 8), randn(24, 8)
        call = lambda: selfattn.self_attention(x, w, num_heads=2, alibi_slopes=slopes)
    else:
        args = scored_varlen()("cpu")
        call = lambda: ops.varlen_attention_fwd(*args[:-2], slopes, None)
    with pytest.raises(NotImplementedError, match=r"alibi_slopes requires grad"):
        call()


def test_good_arguments_pass_every_door():
    """The negative control: the same builders, unchanged, raise nowhere."""
    for case in (Case("ok", "attention_fwd", attn_fwd(), ValueError, "", attention_public),
                 Case("ok", "attention_bwd", attn_bwd(lambda a: {}), ValueError, ""),
                 Case("ok", "attention_jvp", attn_jvp(lambda a: {}), ValueError, ""),
                 Case("ok", "attention_jvp", attn_jvp(lambda a: {"tangent_q": None, "tangent_v": None}), ValueError, ""),
                 Case("ok", "self_attention_fwd", layer_fwd(), ValueError, "", layer_public),
                 Case("ok", "self_attention_bwd", layer_bwd(lambda a: {}), ValueError, ""),
                 Case("ok", "varlen_attention_fwd", varlen_fwd(), ValueError, "", varlen_public),
                 Case("ok", "varlen_attention_bwd", varlen_bwd(lambda a: {}), ValueError, ""),
                 Case("ok", "attention_fwd", scored(1.5, t(2, 2), t(2)), ValueError, "", scored_public),
                 Case("ok", "attention_bwd", scored_bwd(t(2)), ValueError, ""),
                 Case("ok", "attention_jvp", sinks_jvp(t(2), t(2)), ValueError, ""),
                 Case("ok", "self_attention_fwd", scored_layer(softcap=1.0, alibi=t(2), sinks=t(2)), ValueError, "",
                      scored_layer_public),
                 Case("ok", "varlen_attention_fwd", scored_varlen(t(2, 2), t(2)), ValueError, "")):
        for _, call in doors(case, "cpu"):
            call()
