"""selfattn.attention against float64: forward and every gradient, over shapes, dtypes, causal,
layouts; plus every output element written."""

import pytest
import torch
import torch.nn.functional as F

import selfattn
from tests.common import ALL_DTYPES, assert_close, attention_with_grads, eager_attention, sample_inputs

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

# (B, H, Nq, Nk, D, Dv): N not only multiples of the 64-wide blocks, Nq != Nk both ways, D != Dv.
SHAPES = [
    (1, 1, 1, 1, 16, 16),
    (2, 2, 3, 3, 8, 8),
    (1, 8, 17, 17, 64, 64),
    (2, 2, 128, 128, 64, 64),
    (1, 2, 257, 257, 32, 32),
    (1, 2, 1000, 1000, 64, 64),
    (2, 1, 17, 128, 16, 24),
    (1, 2, 257, 3, 40, 40),
    (1, 1, 65, 130, 80, 80),
    (2, 2, 70, 70, 33, 7),
]


def shape_id(shape):
    return "B{}H{}Nq{}Nk{}D{}Dv{}".format(*shape)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_and_gradients(shape, dtype, causal):
    q, k, v = sample_inputs(*shape, dtype=dtype)
    grad_out = torch.randn(*shape[:3], shape[5], dtype=dtype)
    expected, expected_grads = attention_with_grads(eager_attention, q.double(), k.double(), v.double(),
                                                    grad_out.double(), causal=causal)
    eager, eager_grads = attention_with_grads(eager_attention, q, k, v, grad_out, causal=causal)
    out, grads = attention_with_grads(selfattn.attention, q, k, v, grad_out, causal=causal)
    assert out.dtype == dtype
    assert_close(out, expected, eager, "out")
    for name, grad, exp, eag in zip(("dq", "dk", "dv"), grads, expected_grads, eager_grads):
        assert grad.dtype == dtype
        assert_close(grad, exp, eag, name)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_sdpa_and_lse(causal):
    q, k, v = sample_inputs(2, 3, 150, 150, 64, dtype=torch.float64)
    out, lse = torch.ops.selfattn.attention_fwd(q, k, v, causal, 0.125)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.125))
    scores = (q @ k.transpose(-2, -1)) * 0.125
    if causal:
        scores = scores.masked_fill(torch.ones(150, 150, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    assert lse.dtype == torch.float64
    assert torch.ops.selfattn.attention_fwd(q.float(), k.float(), v.float(), causal, 0.1)[1].dtype == torch.float32


def test_output_layout_heads_side_by_side():
    q, k, v = sample_inputs(2, 4, 10, 12, 8, 6)
    out = selfattn.attention(q, k, v)
    assert out.shape == (2, 4, 10, 6)
    assert out.transpose(1, 2).is_contiguous()  # (B, Nq, H, Dv) memory: flatten(2) is a view


@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_match_contiguous(layout, dtype):
    q, k, v = sample_inputs(2, 3, 70, 90, 32, 24, dtype=dtype, layout=layout)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    grad_out = torch.randn(2, 3, 70, 24, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)
    for causal in (False, True):
        out, grads = attention_with_grads(selfattn.attention, q, k, v, grad_out, causal=causal)
        out_c, grads_c = attention_with_grads(selfattn.attention, q.contiguous(), k.contiguous(),
                                              v.contiguous(), grad_out.contiguous(), causal=causal)
        torch.testing.assert_close(out, out_c, atol=0, rtol=0)
        for g, g_c in zip(grads, grads_c):
            torch.testing.assert_close(g, g_c, atol=0, rtol=0)


def test_three_dim_inputs_are_one_head():
    q, k, v = (torch.randn(2, 9, 16) for _ in range(3))
    out = selfattn.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_output_element_written(dtype):
    """With deterministic algorithms on, torch.empty fills new memory with NaN: any element a
    kernel forgot to write would show."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for causal in (False, True):
            q, k, v = sample_inputs(2, 3, 77, 131, 24, 40, dtype=dtype, requires_grad=True)
            out, lse = torch.ops.selfattn.attention_fwd(q, k, v, causal, 0.2)
            assert not out.isnan().any() and not lse.isnan().any()
            grads = torch.ops.selfattn.attention_bwd(torch.randn_like(out), q, k, v, out, lse, causal, 0.2)
            for g in grads:
                assert not g.isnan().any()
            x = torch.randn(2, 33, 12, dtype=dtype)
            w = torch.randn(18, 12, dtype=dtype)
            out, qkv, lse = torch.ops.selfattn.self_attention_fwd(x, w, None, 3, causal, 0.5)
            assert not out.isnan().any() and not qkv.isnan().any() and not lse.isnan().any()
            for g in torch.ops.selfattn.self_attention_bwd(torch.randn_like(out), x, w, qkv, out, lse, 3,
                                                          causal, 0.5, [True, True, True, False]):
                assert not g.isnan().any()
    finally:
        torch.use_deterministic_algorithms(previous)
