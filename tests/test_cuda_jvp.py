"""The CUDA jvp kernel (attention_jvp.cu) on a GPU: the variant grid of tests/test_jvp.py against
torch.func.jvp of the float64 oracle, every output element written (NaN-filled allocations), and
forward mode of the fused layer end to end. Skipped without a GPU; scripts/gpu_check.sh runs it
with tests/test_cuda.py. Not yet run on a GPU (tested in the CPU emulation:
tests/test_cuda_emulation_jvp.py).
"""

from __future__ import annotations

import pytest
import torch

import selfattn
from tests.common import assert_close
from tests.test_cuda import nan_filled_allocations
from tests.test_jvp import VARIANTS, eager_layer, expected_jvp, inputs, make_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

f64 = torch.float64


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_jvp_matches_eager(variant, dtype):
    q, k, v, tangents = inputs(variant, dtype)
    mask, *dense = make_mask(variant, 2, 4)
    mask_args = (None if mask is None else mask.cuda(), *variant.window, variant.offset)
    with nan_filled_allocations():
        out, lse, tangent = torch.ops.selfattn.attention_jvp(
            *(t.to("cuda", dtype) for t in (q, k, v, *tangents)), variant.causal, 0.2, *mask_args)
    expected_out, expected_tangent = expected_jvp(dense, q, k, v, tangents, 0.2)
    eager_out, eager_tangent = (expected_out, expected_tangent) if dtype == f64 else \
        expected_jvp(dense, q, k, v, tangents, 0.2, dtype)
    assert_close(out.cpu(), expected_out, eager_out, "out")
    assert_close(tangent.cpu(), expected_tangent, eager_tangent, "tangent_out")
    assert not torch.isnan(lse).any()


def test_layer_forward_mode():
    x = torch.randn(2, 40, 12, dtype=f64)
    w = torch.randn(48, 12, dtype=f64) / 12**0.5  # (4 + 2·2) heads of 6: 4 query heads over 2 kv heads
    b = torch.randn(48, dtype=f64)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    visible = torch.ones(40, 40, dtype=torch.bool).tril().expand(2, 4, 40, 40)
    fn = lambda x, w, b: selfattn.self_attention(x, w, b, num_heads=4, num_kv_heads=2, causal=True)  # noqa: E731
    _, tangent = torch.func.jvp(fn, tuple(t.cuda() for t in (x, w, b)), tuple(t.cuda() for t in tangents))
    _, expected = torch.func.jvp(lambda x, w, b: eager_layer(x, w, b, 4, 2, visible), (x, w, b), tangents)
    assert_close(tangent.cpu(), expected, expected, "layer jvp on CUDA")
