"""Bad dropout arguments (dropout_p, rng_state) through every door, as tests/test_bad_inputs.py
does for the others: the public function, the raw op, the C++ kernel directly and meta tensors
give one identical message."""

from __future__ import annotations

import pytest
import torch

import selfattn
from tests.test_bad_inputs import (
    DEVICES,
    Case,
    assert_same_clear_error,
    attn_bwd,
    doors,
    layer_bwd,
    layer_fwd,
    layer_kwargs,
    randn,
    varlen_bwd,
    varlen_fwd,
)


def rng(*shape, dtype=torch.int64, device=None):
    """An rng_state builder: device -> a (seed, offset)-like tensor, of the given device or the case's."""
    return lambda d: torch.tensor([7, 3, 5][:shape[0]] if shape else 7, dtype=dtype, device=device or d)


def attn_dropout(dropout_p, state=rng(2)):
    def make(device):
        q, k, v = randn(2, 2, 5, 8, device=device), randn(2, 2, 6, 8, device=device), randn(2, 2, 6, 4, device=device)
        return (q, k, v, False, 0.3, None, -1, -1, 0, dropout_p, state(device) if state else None)
    return make


def attention_public_dropout(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset, dropout_p,
                             rng_state):
    return selfattn.attention(q, k, v, attn_mask, dropout_p, causal=causal, scale=scale, rng_state=rng_state)


def attn_bwd_dropout(dropout_p, state=rng(2)):
    def make(device):
        return (*attn_bwd(lambda a: {})(device), None, -1, -1, 0, dropout_p, state(device) if state else None)
    return make


def layer_dropout(dropout_p, state=rng(2)):
    def make(device):
        return (*layer_fwd()(device), dropout_p, state(device) if state else None)
    return make


def layer_public_dropout(x, w, b, heads, causal, scale, kv_heads, mask, window_left, window_right, dropout_p, rng_state):
    return selfattn.self_attention(x, w, b, num_heads=heads, causal=causal, scale=scale, dropout_p=dropout_p,
                                   rng_state=rng_state)


def layer_bwd_dropout(dropout_p, state=rng(2)):
    def make(device):
        return (*layer_bwd(lambda a: {})(device), 0, None, -1, -1, dropout_p, state(device) if state else None)
    return make


def varlen_dropout(dropout_p, state=rng(2)):
    def make(device):
        return (*varlen_fwd()(device), dropout_p, state(device) if state else None)
    return make


def varlen_public_dropout(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left, window_right, bottom_right,
                          dropout_p, rng_state):
    return selfattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, dropout_p=dropout_p,
                                     rng_state=rng_state)


def varlen_bwd_dropout(dropout_p, state=rng(2)):
    def make(device):
        return (*varlen_bwd(lambda a: {})(device), dropout_p, state(device) if state else None)
    return make


RANGE = r"dropout_p must be in \[0, 1\), got "
DROPOUT = [
    Case("dropout_p 1", "attention_fwd", attn_dropout(1.0), ValueError, RANGE + r"1(?![.0-9])", attention_public_dropout),
    Case("dropout_p negative", "attention_fwd", attn_dropout(-0.1), ValueError, RANGE + r"-0\.1(?![0-9])",
         attention_public_dropout),
    Case("dropout_p nan", "attention_fwd", attn_dropout(float("nan")), ValueError, RANGE + "nan",
         attention_public_dropout),
    Case("rng_state missing", "attention_fwd", attn_dropout(0.1, None), ValueError,
         r"rng_state must be a tensor when dropout_p > 0, got None"),
    Case("rng_state int32", "attention_fwd", attn_dropout(0.1, rng(2, dtype=torch.int32)), TypeError,
         r"rng_state must be torch.int64 \(seed, offset\), got torch.int32", attention_public_dropout),
    Case("rng_state shape", "attention_fwd", attn_dropout(0.1, rng(3)), ValueError,
         r"rng_state must have shape \(seed, offset\) = \[2\], got \[3\]", attention_public_dropout),
    Case("rng_state on meta", "attention_fwd", attn_dropout(0.1, rng(2, device="meta")), ValueError,
         r"rng_state must be on the device of q \((cpu|cuda:0)\), got meta", attention_public_dropout,
         mixes_devices=True),
    Case("dropout_p of bwd", "attention_bwd", attn_bwd_dropout(1.5), ValueError, RANGE + r"1\.5(?![0-9])"),
    Case("rng_state of bwd", "attention_bwd", attn_bwd_dropout(0.2, rng()), ValueError,
         r"rng_state must have shape \(seed, offset\) = \[2\], got \[\]"),
    Case("layer dropout_p", "self_attention_fwd", layer_dropout(1.0), ValueError, RANGE + r"1(?![.0-9])", layer_public_dropout),
    Case("layer rng_state on meta", "self_attention_fwd", layer_dropout(0.1, rng(2, device="meta")), ValueError,
         r"rng_state must be on the device of x \((cpu|cuda:0)\), got meta", layer_public_dropout, mixes_devices=True),
    Case("layer bwd rng_state missing", "self_attention_bwd", layer_bwd_dropout(0.1, None), ValueError,
         r"rng_state must be a tensor when dropout_p > 0, got None"),
    Case("varlen dropout_p", "varlen_attention_fwd", varlen_dropout(-1.0), ValueError, RANGE + r"-1(?![.0-9])",
         varlen_public_dropout),
    Case("varlen rng_state float", "varlen_attention_fwd", varlen_dropout(0.1, rng(2, dtype=torch.float32)), TypeError,
         r"rng_state must be torch.int64 \(seed, offset\), got torch.float32", varlen_public_dropout),
    Case("varlen bwd rng_state shape", "varlen_attention_bwd", varlen_bwd_dropout(0.1, rng(1)), ValueError,
         r"rng_state must have shape \(seed, offset\) = \[2\], got \[1\]"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DROPOUT, ids=lambda c: c.name)
def test_same_clear_error_from_every_door(case, device):
    assert_same_clear_error(case, device)


PUBLIC_ONLY = [
    ("dropout_p a string", layer_kwargs(dropout_p="0.1"), TypeError, r"dropout_p must be a float, got str"),
    ("dropout_p 1", layer_kwargs(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1(?![.0-9])"),
    ("rng_state a list", layer_kwargs(dropout_p=0.1, rng_state=[1, 2]), TypeError,
     r"rng_state must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("name,make,error,message", PUBLIC_ONLY, ids=[c[0] for c in PUBLIC_ONLY])
def test_public_only_arguments(name, make, error, message):
    with pytest.raises(error, match=message):
        selfattn.self_attention(**make("cpu"))
    on_meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in make("cpu").items()}
    with pytest.raises(error, match=message):
        selfattn.self_attention(**on_meta)


def test_good_dropout_arguments_pass_every_door():
    """The negative control: the same builders with a good p and rng_state raise nowhere."""
    for case in (Case("ok", "attention_fwd", attn_dropout(0.1), ValueError, "", attention_public_dropout),
                 Case("ok", "attention_bwd", attn_bwd_dropout(0.1), ValueError, ""),
                 Case("ok", "self_attention_fwd", layer_dropout(0.1), ValueError, "", layer_public_dropout),
                 Case("ok", "self_attention_bwd", layer_bwd_dropout(0.1), ValueError, ""),
                 Case("ok", "varlen_attention_fwd", varlen_dropout(0.1), ValueError, "", varlen_public_dropout),
                 Case("ok", "varlen_attention_bwd", varlen_bwd_dropout(0.1), ValueError, "")):
        for _, call in doors(case, "cpu"):
            call()
