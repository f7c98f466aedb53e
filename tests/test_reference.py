"""The tutorial's worked example, and the reference module against a float64 matmul formula."""

import math

import pytest
import torch

import selfattn
from selfattn import tutorial
from tests.common import eager_attention

INPUTS, W_QUERY, W_KEY, W_VALUE = tutorial.INPUTS, tutorial.W_QUERY, tutorial.W_KEY, tutorial.W_VALUE

# Worked out by hand (scale 1.0, as in the tutorial):
#   Q = [[2,0,1],[0,3,1],[1,2,2]]   K = [[0,1,1],[3,1,2],[2,2,1]]   V = [[3,2,1],[1,2,5],[2,3,4]]
#   scores Q Kᵀ = [[1,8,5],[4,5,7],[4,9,8]]; softmax per row; output row i = sum_j p_ij V_j.
EXPECTED = [
    [1.049120, 2.047385, 4.949144],
    [1.927815, 2.843795, 3.988165],
    [1.277427, 2.267623, 4.712770],
]


def by_hand():
    """The five steps in plain Python, no torch: what EXPECTED was computed with."""
    def matmul(a, b):
        return [[sum(a[i][p] * b[p][j] for p in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]

    q, k, v = matmul(INPUTS, W_QUERY), matmul(INPUTS, W_KEY), matmul(INPUTS, W_VALUE)
    out = []
    for qi in q:
        scores = [sum(a * b for a, b in zip(qi, kj)) for kj in k]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        probs = [w / total for w in weights]
        out.append([sum(p * vj[d] for p, vj in zip(probs, v)) for d in range(len(v[0]))])
    return out


def test_expected_values_are_the_hand_computation():
    for row, expected_row in zip(by_hand(), EXPECTED):
        for value, expected in zip(row, expected_row):
            assert abs(value - expected) < 5e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_worked_example_reference_module(dtype):
    out = tutorial.reference_module(dtype)(torch.tensor(INPUTS, dtype=dtype))
    torch.testing.assert_close(out, torch.tensor(EXPECTED, dtype=dtype), atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_worked_example_fused_op(dtype):
    ref = tutorial.reference_module(dtype)
    fused = selfattn.SelfAttention.from_reference(ref)
    x = torch.tensor(INPUTS, dtype=dtype)
    torch.testing.assert_close(fused(x), torch.tensor(EXPECTED, dtype=dtype), atol=2e-6, rtol=0)
    # The functional form with the stacked [W_q; W_k; W_v].
    w_qkv = torch.cat([torch.tensor(w, dtype=dtype).t() for w in (W_QUERY, W_KEY, W_VALUE)])
    out = selfattn.self_attention(x, w_qkv, scale=1.0)
    torch.testing.assert_close(out, torch.tensor(EXPECTED, dtype=dtype), atol=2e-6, rtol=0)
    # A batch of the same sequence gives the same rows.
    batched = fused(x.expand(2, 3, 4))
    torch.testing.assert_close(batched, torch.tensor(EXPECTED, dtype=dtype).expand(2, 3, 3), atol=2e-6, rtol=0)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("heads,causal,bias", [(1, False, False), (2, True, True), (4, False, True)])
def test_reference_module_is_attention(batched, heads, causal, bias):
    """The broadcast-and-sum of steps 4-5 equals softmax(q kᵀ) v by matmul, in float64."""
    ref = selfattn.reference.SelfAttention(6, 8, num_heads=heads, bias=bias, causal=causal).double()
    x = torch.randn(*((3,) if batched else ()), 11, 6, dtype=torch.float64)
    q, k, v = (lin(x).unflatten(-1, (heads, -1)).transpose(-3, -2)
               for lin in (ref.to_query, ref.to_key, ref.to_value))
    expected = eager_attention(q, k, v, causal=causal).transpose(-3, -2).flatten(-2)
    torch.testing.assert_close(ref(x), expected, atol=1e-12, rtol=1e-12)


def test_reference_scale_default_is_sdpa():
    ref = selfattn.reference.SelfAttention(4, 8, num_heads=2).double()
    q, k, v = (torch.randn(2, 5, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(selfattn.reference.attention(q, k, v),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert ref.scale is None
