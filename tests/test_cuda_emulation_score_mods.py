"""The score modifications (softcap, ALiBi, sinks: csrc/mask.h's ScoreMods, csrc/cuda/score_mods.cuh)
in the CUDA kernels, run in the CPU emulation against a float64 oracle written here: an explicit
tanh cap, a dense ALiBi bias from the positions, the sink as one more column of the softmax. Every
kernel family: the generic float64 kernels, the tiled ones (float32, and fp16/bf16 at head dims the
tensor cores do not take), the tensor-core ones (fp16/bf16 at D = 64 and 128), the split-K decode
forward (S = 1, 2, 7: the sink enters once) and the jvp; output, lse and dq, dk, dv (grad_sinks is
computed outside the kernels, from out and lse: attention.cpp's sinks_gradient, so a right lse is
what the kernels owe it), with causal / window / tensor masks and rows that see nothing.

Opt-in like tests/test_cuda_emulation.py (its module fixture builds the harness):
    SELFATTN_TEST_EMULATION=1 python -m pytest -q tests/test_cuda_emulation_score_mods.py
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.common import assert_close, attention_with_grads, make_tensor
from tests.test_cuda_emulation import (  # noqa: F401
    NEG_INF,
    acc_dtype,
    check_lse,
    dense_mask,
    emu,
    emu_forward,
    key_padding,
)
from tests.test_cuda_emulation_decode import decode_forward

pytestmark = pytest.mark.skipif(os.environ.get("SELFATTN_TEST_EMULATION") != "1",
                                reason="set SELFATTN_TEST_EMULATION=1 to run the CUDA kernels in CPU emulation")

f64 = torch.float64


def slopes_for(batch, hq, per_batch):
    """ALiBi slopes: BLOOM's geometric ones per head, (Hq,) or (B, Hq) float32."""
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / hq) for h in range(hq)], dtype=torch.float32)
    return torch.stack([base * (1 + 0.5 * b) for b in range(batch)]) if per_batch else base


def sinks_for(hq):
    return torch.linspace(-1.0, 2.0, hq, dtype=torch.float32)


def mods_scores(q, k, scale, softcap, slopes, offset):
    """scale q kᵀ (k repeated over its group), capped, minus the ALiBi bias, at q's precision."""
    group = q.shape[1] // k.shape[1]
    s = torch.matmul(q, k.repeat_interleave(group, 1).transpose(-2, -1)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        nq, nk = s.shape[-2:]
        distance = (torch.arange(nq).view(-1, 1) + offset - torch.arange(nk).view(1, -1)).abs().to(s.dtype)
        slope = slopes.to(s.dtype).view(-1, s.shape[1], 1, 1)  # (1 or B, Hq, 1, 1)
        s = s - slope * distance
    return s


def mods_attention(q, k, v, mask, scale, softcap=0.0, slopes=None, sinks=None, offset=0):
    """The oracle: softmax over [modified scores + mask, sink] of v; without a sink a row whose mask
    is all -inf gives 0."""
    group = q.shape[1] // k.shape[1]
    s = mods_scores(q, k, scale, softcap, slopes, offset) + mask.to(q.dtype)
    v = v.repeat_interleave(group, 1)
    if sinks is not None:
        column = sinks.to(q.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, column], -1), dim=-1)[..., :-1]
    else:
        empty = (mask == NEG_INF).all(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(p, v)


def mods_lse(q, k, mask, scale, softcap, slopes, sinks, offset):
    s = mods_scores(q.double(), k.double(), scale, softcap, slopes, offset) + mask
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    return torch.logsumexp(s, dim=-1)


class ScoreMods:
    """The harness's score modifications for the calls inside the block (none after it)."""

    def __init__(self, emu, dtype, softcap, slopes, sinks):  # noqa: F811
        self.emu, self.args = emu, (softcap, slopes, None if sinks is None else sinks.to(acc_dtype(dtype)))

    def __enter__(self):
        self.emu.set_score_mods(*self.args)

    def __exit__(self, *exc):
        self.emu.set_score_mods(0.0, None, None)


MODS = {  # name: (softcap, ALiBi: None / "head" / "batch", sinks)
    "softcap": (1.5, None, False),
    "alibi": (0.0, "head", False),
    "sinks": (0.0, None, True),
    "all": (2.0, "batch", True),
}


def mod_args(name, batch, hq):
    softcap, alibi, sinks = MODS[name]
    slopes = None if alibi is None else slopes_for(batch, hq, alibi == "batch")
    return softcap, slopes, sinks_for(hq) if sinks else None


def run_mods_case(emu, shape, dtype, mods, causal, mask_args, *, backward=True):  # noqa: F811
    """Forward and backward under the score modifications against the float64 oracle; returns
    out, lse, grads, the dense mask and the sinks."""
    batch, hq, hk, nq, nk, dim = shape
    q, k, v = (make_tensor(s, dtype) for s in ((batch, hq, nq, dim), (batch, hk, nk, dim), (batch, hk, nk, dim)))
    grad_out = make_tensor((batch, hq, nq, dim), dtype)
    attn_mask, window_left, window_right, offset = mask_args
    mask = dense_mask(batch, hq, nq, nk, causal, attn_mask, window_left, window_right, offset)
    scale = dim ** -0.5
    softcap, slopes, sinks = mods
    kw = dict(mask=mask, scale=scale, softcap=softcap, slopes=slopes, sinks=sinks, offset=offset)
    with ScoreMods(emu, dtype, softcap, slopes, sinks):
        out, lse = emu_forward(emu, q, k, v, causal, scale, mask_args)
        grads = [torch.full(t.shape, float("nan"), dtype=dtype) for t in (q, k, v)]
        if backward:
            emu.backward(grad_out, q, k, v, out, lse, causal, scale, *mask_args, *grads)
    expected = mods_attention(q.double(), k.double(), v.double(), **kw)
    assert_close(out, expected, mods_attention(q, k, v, **kw), "out")
    check_lse(lse, mods_lse(q, k, mask, scale, softcap, slopes, sinks, offset))
    if backward:
        _, grads64 = attention_with_grads(mods_attention, q.double(), k.double(), v.double(), grad_out.double(), **kw)
        _, grads_eager = attention_with_grads(mods_attention, q, k, v, grad_out, **kw)
        for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
            assert_close(g, g64, ge, name)
    return out, lse, grads, mask, sinks


def assert_empty_rows(out, lse, grads, mask, sinks):
    """Rows that see no key: output exactly 0, lse sink(h) (or -inf without sinks), dq 0, no NaN."""
    empty = (mask == NEG_INF).all(-1)
    assert empty.any(), "the case was meant to have rows that see nothing"
    assert (out[empty] == 0).all() and not torch.isnan(lse).any()
    expected = torch.full_like(lse, NEG_INF) if sinks is None else sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    assert torch.equal(lse[empty], expected[empty])
    if grads is not None:
        assert (grads[0][empty] == 0).all() and not any(torch.isnan(g).any() for g in grads)


# (Hq, Hk, Nq, Nk, causal, window_left, window_right, offset, tensor mask): lengths crossing the
# tiled kernels' 16-64 row tiles.
BANDS = {
    "plain_gqa": (4, 2, 37, 29, False, -1, -1, 0, None),
    "causal_bottom_right": (2, 2, 21, 45, True, -1, -1, 24, None),
    "window": (2, 1, 40, 40, False, 7, 3, 0, None),
    "padding_empty_rows": (2, 2, 19, 33, True, -1, -1, 0, "padding"),  # batch 1 sees no key
}
DTYPES = {"fp64": (f64, 24), "fp32": (torch.float32, 40), "bf16": (torch.bfloat16, 48), "fp16": (torch.float16, 20)}


def band_mask_args(case, batch):
    hq, hk, nq, nk, causal, left, right, offset, kind = BANDS[case]
    attn_mask = None
    if kind == "padding":  # batch 0: every key, batch 1: none (every row empty)
        attn_mask = key_padding(batch, nk, [nk, 0])
    return (hq, hk, nq, nk), causal, (attn_mask, left, right, offset)


@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(BANDS))
def test_generic_and_tiled(emu, case, dtype_name, mods, monkeypatch):  # noqa: F811
    """float64 (generic kernels), float32 / fp16 / bf16 at head dims the tensor cores do not take
    (tiled kernels); the decode path off (SELFATTN_DECODE_SPLITS=0)."""
    monkeypatch.setenv("SELFATTN_DECODE_SPLITS", "0")
    dtype, dim = DTYPES[dtype_name]
    batch = 2
    (hq, hk, nq, nk), causal, mask_args = band_mask_args(case, batch)
    out, lse, grads, mask, sinks = run_mods_case(emu, (batch, hq, hk, nq, nk, dim), dtype,
                                                 mod_args(mods, batch, hq), causal, mask_args)
    if case == "padding_empty_rows":
        assert_empty_rows(out, lse, grads, mask, sinks)


TC_CASES = {  # (Nq, Nk, causal, offset, tensor mask)
    "partial_tiles": (70, 45, False, 0, None),
    "causal_two_blocks": (150, 130, True, 0, None),
    "bottom_right_padding": (45, 200, True, 155, "padding"),
}


@pytest.mark.parametrize("mods", ["all", "softcap", "sinks"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(TC_CASES))
def test_tensor_cores(emu, case, dtype, dim, mods, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SELFATTN_DECODE_SPLITS", "0")
    nq, nk, causal, offset, kind = TC_CASES[case]
    batch, hq, hk = 2, 2, 1
    attn_mask = key_padding(batch, nk, [nk, 0]) if kind == "padding" else None
    emu.reset_counters()
    out, lse, grads, mask, sinks = run_mods_case(emu, (batch, hq, hk, nq, nk, dim), dtype,
                                                 mod_args(mods, batch, hq), causal, (attn_mask, -1, -1, offset))
    assert emu.counters()["mma"] > 0, "the tensor-core kernels did not run"
    if kind == "padding":
        assert_empty_rows(out, lse, grads, mask, sinks)


# (Nq, Hq, Hk, Nk, causal, window_left, offset, tensor mask): the decode path (Nq <= 16).
DECODE_CASES = {
    "nq1_gqa4": (1, 4, 1, 140, False, -1, 139, None),
    "nq4_bottom_right_window": (4, 4, 2, 100, True, 40, 96, None),
    "nq4_padding_empty": (4, 4, 2, 70, True, -1, 66, "padding"),
}


@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_splits(emu, case, dtype, mods, monkeypatch):  # noqa: F811
    """S = 1, 2, 7 (7 leaves splits without keys): the sink enters once, whatever S; then the
    ordinary backward from the S = 7 out and lse."""
    nq, hq, hk, nk, causal, left, offset, kind = DECODE_CASES[case]
    batch, dim = 2, 32
    q, k, v = (make_tensor(s, dtype) for s in ((batch, hq, nq, dim), (batch, hk, nk, dim), (batch, hk, nk, dim)))
    grad_out = make_tensor((batch, hq, nq, dim), dtype)
    attn_mask = key_padding(batch, nk, [nk, 0]) if kind == "padding" else None
    mask_args = (attn_mask, left, -1, offset)
    mask = dense_mask(batch, hq, nq, nk, causal, *mask_args)
    scale = dim ** -0.5
    softcap, slopes, sinks = mod_args(mods, batch, hq)
    kw = dict(mask=mask, scale=scale, softcap=softcap, slopes=slopes, sinks=sinks, offset=offset)
    expected = mods_attention(q.double(), k.double(), v.double(), **kw)
    eager = mods_attention(q, k, v, **kw)
    expected_lse = mods_lse(q, k, mask, scale, softcap, slopes, sinks, offset)
    with ScoreMods(emu, dtype, softcap, slopes, sinks):
        for splits in (1, 2, 7):
            out, lse, used = decode_forward(emu, q, k, v, causal, scale, mask_args, splits, monkeypatch)
            assert_close(out, expected, eager, f"out, S = {used}")
            check_lse(lse, expected_lse)
            if kind == "padding":
                assert_empty_rows(out, lse, None, mask, sinks)
        grads = [torch.full(t.shape, float("nan"), dtype=dtype) for t in (q, k, v)]
        emu.backward(grad_out, q, k, v, out, lse, causal, scale, *mask_args, *grads)
    _, grads64 = attention_with_grads(mods_attention, q.double(), k.double(), v.double(), grad_out.double(), **kw)
    _, grads_eager = attention_with_grads(mods_attention, q, k, v, grad_out, **kw)
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g, g64, ge, name)


@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["causal_bottom_right", "padding_empty_rows"])
def test_jvp(emu, case, dtype, mods):  # noqa: F811
    """tangent_out against torch.func.jvp of the float64 oracle (the sinks' own tangent is added
    outside the kernel, so sinks are held fixed here)."""
    batch, dim = 2, 16
    (hq, hk, nq, nk), causal, mask_args = band_mask_args(case, batch)
    shapes = ((batch, hq, nq, dim), (batch, hk, nk, dim), (batch, hk, nk, dim))
    primals = [make_tensor(s, dtype) for s in shapes]
    tangents = [make_tensor(s, dtype) for s in shapes]
    mask = dense_mask(batch, hq, nq, nk, causal, *mask_args)
    softcap, slopes, sinks = mod_args(mods, batch, hq)
    kw = dict(mask=mask, scale=0.3, softcap=softcap, slopes=slopes, sinks=sinks, offset=mask_args[3])
    out = torch.full((batch, nq, hq, dim), float("nan"), dtype=dtype).transpose(1, 2)
    tangent_out = torch.full_like(out, float("nan"))
    lse = torch.full((batch, hq, nq), float("nan"), dtype=acc_dtype(dtype))
    with ScoreMods(emu, dtype, softcap, slopes, sinks):
        emu.jvp(*primals, *tangents, causal, 0.3, *mask_args, out, lse, tangent_out)

    def oracle(dt):
        return torch.func.jvp(lambda q, k, v: mods_attention(q, k, v, **kw), tuple(t.to(dt) for t in primals),
                              tuple(t.to(dt) for t in tangents))

    expected_out, expected_tangent = oracle(f64)
    eager_out, eager_tangent = oracle(dtype)
    assert_close(out, expected_out, eager_out, "out")
    assert_close(tangent_out, expected_tangent, eager_tangent, "tangent_out")
    check_lse(lse, mods_lse(*primals[:2], mask, 0.3, softcap, slopes, sinks, mask_args[3]))
    if case == "padding_empty_rows":
        assert_empty_rows(out, lse, None, mask, sinks)
        assert (tangent_out[(mask == NEG_INF).all(-1)] == 0).all()


@pytest.mark.parametrize("dim", [80, 256])
def test_tiled_head_dim_buckets(emu, dim, monkeypatch):  # noqa: F811
    """The tiled kernels' larger tile configurations (D <= 128, <= 256), every modification."""
    monkeypatch.setenv("SELFATTN_DECODE_SPLITS", "0")
    batch = 2
    (hq, hk, nq, nk), causal, mask_args = band_mask_args("causal_bottom_right", batch)
    run_mods_case(emu, (batch, hq, hk, nq, nk, dim), torch.float32, mod_args("all", batch, hq), causal, mask_args)
