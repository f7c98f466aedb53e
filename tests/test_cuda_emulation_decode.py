"""The CUDA split-K decoding forward (csrc/cuda/attention_decode.cu) in the CPU emulation: few
queries (Nq = 1, 2, 4) against keys crossing its 32-key tiles and its splits, S = 1, 2, 7 (forced
through SELFATTN_DECODE_SPLITS) and automatic, grouped-query ratios 1/4/8, bottom-right causal,
windows, key padding, an additive mask, rows and splits that see nothing; against a float64 oracle
with a dense mask built here (tests/test_cuda_emulation.py's), FlashAttention's 2x rule for every
dtype. The ordinary backward kernels then run from the decode kernel's lse.

Opt-in like tests/test_cuda_emulation.py (its module fixture builds the harness):
    SELFATTN_TEST_EMULATION=1 python -m pytest -q tests/test_cuda_emulation_decode.py
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.common import assert_close, attention_with_grads, make_tensor
from tests.test_cuda_emulation import (  # noqa: F401
    NEG_INF,
    check_lse,
    dense_mask,
    emu,
    emu_forward,
    key_padding,
    masked_attention,
    masked_lse,
)

pytestmark = pytest.mark.skipif(os.environ.get("SELFATTN_TEST_EMULATION") != "1",
                                reason="set SELFATTN_TEST_EMULATION=1 to run the CUDA kernels in CPU emulation")

TILE = 32  # kDecodeKeys


def decode_forward(emu, q, k, v, causal, scale, mask_args, splits, monkeypatch):  # noqa: F811
    """The emulated forward with SELFATTN_DECODE_SPLITS = splits (None: automatic); asserts the
    decode kernel ran, and with S = splits when forced. Returns out, lse and the S it used."""
    if splits is None:
        monkeypatch.delenv("SELFATTN_DECODE_SPLITS", raising=False)
    else:
        monkeypatch.setenv("SELFATTN_DECODE_SPLITS", str(splits))
    emu.reset_counters()
    out, lse = emu_forward(emu, q, k, v, causal, scale, mask_args)
    counters = emu.counters()
    assert counters["decode_launches"] == 1, "the decode kernel did not run"
    if splits is not None:
        assert counters["decode_splits"] == splits
    return out, lse, counters["decode_splits"]


def inputs(batch, hq, hk, nq, nk, dim, dtype):
    return [make_tensor(shape, dtype) for shape in
            ((batch, hq, nq, dim), (batch, hk, nk, dim), (batch, hk, nk, dim), (batch, hq, nq, dim))]


# name: (Nq, Hq, Hk, Nk, causal, window_left, window_right, offset, mask kind). Bottom-right
# causal is offset = Nk - Nq. Nk crosses tiles (32) and splits; none a multiple of 32.
CASES = {
    "nq1_mha": (1, 2, 2, 75, False, -1, -1, 0, None),
    "nq4_gqa4_bottom_right": (4, 4, 1, 100, True, -1, -1, 96, None),
    "nq1_gqa8_window": (1, 8, 1, 140, False, 40, 0, 139, None),  # keys 99..139: 2 tiles, S = 7 leaves 5 empty
    "nq4_gqa8_key_padding": (4, 8, 1, 130, True, -1, -1, 126, "padding"),  # 32 rows: two row chunks
    "nq4_masked_rows": (4, 4, 2, 70, False, -1, -1, 0, "rows"),
    "nq4_nk2_bottom_right": (4, 4, 4, 2, True, -1, -1, -2, None),  # rows 0 and 1 see nothing
    "nq2_gqa4_additive": (2, 4, 1, 100, False, 60, 0, 98, "additive"),  # window + (1, 1, Nq, Nk) float32
}
EMPTY_ROWS = {"nq4_gqa8_key_padding", "nq4_masked_rows", "nq4_nk2_bottom_right"}
DTYPES = {"fp32": (torch.float32, 40), "fp16": (torch.float16, 64), "bf16": (torch.bfloat16, 24),
          "fp64": (torch.float64, 16)}


def case_mask(kind, batch, hq, nq, nk):
    if kind == "padding":  # batch 0: 50 keys (splits past the second tile fully masked), batch 1: none
        return key_padding(batch, nk, [50, 0])
    if kind == "rows":  # (B, Hq, Nq, Nk) bool, one row of each batch all False
        g = torch.Generator().manual_seed(3)
        m = torch.rand(batch, hq, nq, nk, generator=g) < 0.8
        m[0, 1, 3] = False
        m[1, 3, 2] = False
        return m
    if kind == "additive":  # float32, broadcast over batch and heads, some -inf
        g = torch.Generator().manual_seed(5)
        m = torch.randn(1, 1, nq, nk, generator=g) * 2
        m[torch.rand(1, 1, nq, nk, generator=g) < 0.2] = NEG_INF
        return m
    return None


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_decode_against_oracle(emu, case, dtype_name, monkeypatch):  # noqa: F811
    """Every S against the float64 oracle; every S equal to S = 1 within float32 rounding; the
    backward from the merged lse; rows that see nothing: 0 and -inf, never NaN."""
    nq, hq, hk, nk, causal, window_left, window_right, offset, kind = CASES[case]
    dtype, dim = DTYPES[dtype_name]
    batch = 2
    q, k, v, grad_out = inputs(batch, hq, hk, nq, nk, dim, dtype)
    attn_mask = case_mask(kind, batch, hq, nq, nk)
    mask_args = (attn_mask, window_left, window_right, offset)
    mask = dense_mask(batch, hq, nq, nk, causal, attn_mask, window_left, window_right, offset)
    scale = dim ** -0.5
    expected = masked_attention(q.double(), k.double(), v.double(), mask, scale)
    eager = masked_attention(q, k, v, mask, scale)
    expected_lse = masked_lse(q, k, mask, scale)
    empty = (mask == NEG_INF).all(-1)
    results = {}
    for splits in (1, 2, 7, None):
        out, lse, used = decode_forward(emu, q, k, v, causal, scale, mask_args, splits, monkeypatch)
        assert_close(out, expected, eager, f"out, S = {used}")
        check_lse(lse, expected_lse)
        assert (out[empty] == 0).all() and (lse[empty] == NEG_INF).all()
        results[splits] = (out, lse)
    assert empty.any() == (case in EMPTY_ROWS)
    # Splitting changes only the order of float32 (float64) additions.
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    out1, lse1 = results[1]
    for splits, (out, lse) in results.items():
        torch.testing.assert_close(lse, lse1, rtol=tol, atol=tol, msg=f"lse, S = {splits}")
        ref = out1.to(lse1.dtype)
        bound = tol * 4 + (0 if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps)
        torch.testing.assert_close(out.to(lse1.dtype), ref, rtol=bound, atol=bound, msg=f"out, S = {splits}")
    # The ordinary backward kernels from the decode forward's (S = 7) out and lse.
    out, lse = results[7]
    grads = [torch.full(t.shape, float("nan"), dtype=dtype) for t in (q, k, v)]
    emu.backward(grad_out, q, k, v, out, lse, causal, scale, *mask_args, *grads)
    _, grads64 = attention_with_grads(masked_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                      mask=mask, scale=scale)
    _, grads_eager = attention_with_grads(masked_attention, q, k, v, grad_out, mask=mask, scale=scale)
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g, g64, ge, name)


def test_automatic_splits(emu, monkeypatch):  # noqa: F811
    """Unforced: about two blocks per SM (the emulation says 108 SMs), at least 8 tiles per split;
    SELFATTN_DECODE_SPLITS=0 takes the ordinary kernels."""
    q, k, v, _ = inputs(1, 1, 1, 1, 8 * TILE * 3 + 5, 16, torch.float32)  # 24 tiles and a partial one
    out, lse, used = decode_forward(emu, q, k, v, False, 0.25, (None, -1, -1, 0), None, monkeypatch)
    assert used == 3
    mask = dense_mask(1, 1, 1, k.shape[2], False, None, -1, -1, 0)
    assert_close(out, masked_attention(q.double(), k.double(), v.double(), mask, 0.25),
                 masked_attention(q, k, v, mask, 0.25), "out")
    monkeypatch.setenv("SELFATTN_DECODE_SPLITS", "0")
    emu.reset_counters()
    emu_forward(emu, q, k, v, False, 0.25)
    assert emu.counters()["decode_launches"] == 0


def test_bitwise_stable(emu, monkeypatch):  # noqa: F811
    """Two runs under other thread orders give identical bits (S = 7, GQA 4, Nq = 4)."""
    q, k, v, _ = inputs(1, 4, 1, 4, 150, 40, torch.bfloat16)
    mask_args = (None, -1, -1, 146)
    runs = []
    for seed in (1, 2):
        emu.seed(seed)
        runs.append(decode_forward(emu, q, k, v, True, 0.2, mask_args, 7, monkeypatch)[:2])
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_bad_setting(emu, monkeypatch):  # noqa: F811
    q, k, v, _ = inputs(1, 1, 1, 1, 10, 8, torch.float32)
    monkeypatch.setenv("SELFATTN_DECODE_SPLITS", "-2")
    with pytest.raises(RuntimeError, match="SELFATTN_DECODE_SPLITS must be a non-negative integer"):
        emu_forward(emu, q, k, v, False, 1.0)
