"""The CUDA jvp kernel (csrc/cuda/attention_jvp.cu) in the CPU emulation: against torch.func.jvp of
the float64 oracle of tests/test_jvp.py (dense masks built there) over its variant grid at
emulation-sized shapes, every dtype, absent tangents, strided views; and against the CPU kernel.

Opt-in like tests/test_cuda_emulation.py (its module fixture builds the harness):
    SELFATTN_TEST_EMULATION=1 python -m pytest -q tests/test_cuda_emulation_jvp.py
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.common import assert_close
from tests.test_cuda_emulation import emu  # noqa: F401  (the harness fixture)
from tests.test_jvp import Variant, expected_jvp, inputs, make_mask

pytestmark = pytest.mark.skipif(os.environ.get("SELFATTN_TEST_EMULATION") != "1",
                                reason="set SELFATTN_TEST_EMULATION=1 to run the CUDA kernels in CPU emulation")

f64 = torch.float64

# tests/test_jvp.py's grid, at sizes the emulation runs in seconds (a fiber per CUDA thread).
VARIANTS = [
    Variant("plain", 9, 21),
    Variant("causal-top-left", 21, 9, causal=True),
    Variant("causal-bottom-right", 9, 21, causal=True, offset=21 - 9),
    Variant("bottom-right-Nk<Nq-empty-rows", 21, 9, causal=True, offset=9 - 21),
    Variant("window", 20, 20, window=(4, 2)),
    Variant("bool-mask-gqa", 13, 17, heads_kv=1, mask="bool"),
    Variant("float-mask", 12, 15, heads_kv=4, mask="float"),
    Variant("bool-mask-empty-rows-causal", 15, 15, causal=True, mask="bool-empty-rows"),
]
DTYPES = [f64, torch.float32, torch.bfloat16, torch.float16]


def emu_jvp(emu, q, k, v, tangents, causal, scale, mask_args):  # noqa: F811
    """out, lse and tangent_out laid out as the op allocates them, NaN until written."""
    b, h, nq, _ = q.shape
    dim_v = v.shape[3]
    out = torch.full((b, nq, h, dim_v), float("nan"), dtype=q.dtype).transpose(1, 2)
    tangent_out = torch.full((b, nq, h, dim_v), float("nan"), dtype=q.dtype).transpose(1, 2)
    lse = torch.full((b, h, nq), float("nan"), dtype=f64 if q.dtype == f64 else torch.float32)
    emu.jvp(q, k, v, *tangents, causal, scale, *mask_args, out, lse, tangent_out)
    return out, lse, tangent_out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_jvp_matches_eager(emu, variant, dtype):  # noqa: F811
    q, k, v, tangents = inputs(variant, dtype, batch=2, heads=4, dim=16, dim_v=12)
    mask, *dense = make_mask(variant, 2, 4)
    mask_args = (mask, *variant.window, variant.offset)
    args = [t.to(dtype) for t in (q, k, v)]
    out, lse, tangent = emu_jvp(emu, *args, [t.to(dtype) for t in tangents], variant.causal, 0.3, mask_args)
    expected_out, expected_tangent = expected_jvp(dense, q, k, v, tangents, 0.3)
    eager_out, eager_tangent = (expected_out, expected_tangent) if dtype == f64 else \
        expected_jvp(dense, q, k, v, tangents, 0.3, dtype)
    assert_close(out, expected_out, eager_out, "out")
    assert_close(tangent, expected_tangent, eager_tangent, "tangent_out")
    assert not torch.isnan(lse).any()
    # The same results as the CPU kernel, to the accumulation's rounding.
    cpu = torch.ops.selfattn.attention_jvp(*args, *(t.to(dtype) for t in tangents), variant.causal, 0.3, *mask_args)
    tol = {f64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 4e-3}[dtype]
    for name, emulated, on_cpu in zip(("out", "lse", "tangent_out"), (out, lse, tangent), cpu):
        torch.testing.assert_close(emulated, on_cpu, rtol=tol, atol=tol, equal_nan=False, msg=name)
    if variant.name.endswith("empty-rows"):
        empty = torch.isinf(lse)
        assert empty.any() and (tangent[empty] == 0).all() and (out[empty] == 0).all()


@pytest.mark.parametrize("missing", [(0,), (1,), (2,), (0, 1)], ids=lambda m: "no-" + "".join("qkv"[i] for i in m))
def test_absent_tangents_and_strided_views(emu, missing):  # noqa: F811
    """Absent tangents are zero; tangents and primals in strided layouts (sliced, last dim strided),
    head dims past one lane's share (D = 40 > 32)."""
    variant = Variant("window-causal-gqa", 14, 19, causal=True, window=(6, -1), offset=5)
    q = torch.randn(2, 14, 4, 40, dtype=f64).transpose(1, 2)
    k = torch.randn(4, 2, 19, 40, dtype=f64)[::2]
    v = torch.randn(2, 2, 36, 19, dtype=f64).transpose(2, 3)
    tangents = [torch.randn(2, 4, 14, 40, dtype=f64).transpose(2, 3).contiguous().transpose(2, 3),
                torch.randn_like(k), torch.randn(2, 2, 36, 19, dtype=f64).transpose(2, 3)]
    given = [None if i in missing else t for i, t in enumerate(tangents)]
    zeroed = [torch.zeros_like(t) if i in missing else t for i, t in enumerate(tangents)]
    _, _, tangent = emu_jvp(emu, q, k, v, given, True, 0.3, (None, 6, -1, 5))
    _, expected = expected_jvp(make_mask(variant, 2, 4)[1:], q, k, v, zeroed, 0.3)
    assert_close(tangent, expected, expected, "tangent_out")


def test_bad_tangent_stops_before_the_cuda_host_code(emu):  # noqa: F811
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 4)
    out, lse, tangent = (torch.empty(1, 2, 5, 4), torch.empty(1, 2, 5), torch.empty(1, 2, 5, 4))
    with pytest.raises(ValueError, match=r"tangent_v must have shape \(B, Hk, Nk, Dv\), v's = \[1, 2, 6, 4\]"):
        emu.jvp(q, k, v, None, None, torch.randn(1, 2, 6, 5), False, 0.3, None, -1, -1, 0, out, lse, tangent)
