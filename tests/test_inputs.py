"""The public functions' own argument errors (what they normalise: SDPA's spellings, 3-D inputs,
scale, flags) and valid edge inputs. Bad tensors, which the ops themselves check, are in
test_bad_inputs.py."""

import math

import pytest
import torch
import torch.nn.functional as F

import selfattn
from tests.common import assert_close, eager_attention, sample_inputs

ops = torch.ops.selfattn


def test_non_tensor_and_bad_flags():
    q, k, v = sample_inputs(1, 1, 3, 3, 4)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        selfattn.attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="causal must be False, True, 'top_left' or 'bottom_right', got 'yes'"):
        selfattn.attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match="is_causal must be a bool, got str"):
        selfattn.attention(q, k, v, is_causal="yes")
    with pytest.raises(TypeError, match="scale must be a float or None, got str"):
        selfattn.attention(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match=r"is_causal=True \(top-left\) and causal='bottom_right' disagree"):
        selfattn.attention(q, k, v, is_causal=True, causal="bottom_right")
    with pytest.raises(ValueError, match=r"must all be 3-D \(B, N, D\) or all 4-D"):
        selfattn.attention(q[0], k, v)
    with pytest.raises(TypeError, match=r"window must be a pair \(left, right\) of ints, -1 for unbounded, got 4"):
        selfattn.attention(q, k, v, window=4)
    with pytest.raises(TypeError, match="window's right side must be an int, got float"):
        selfattn.attention(q, k, v, window=(4, 1.0))
    with pytest.raises(TypeError, match="attn_mask must be a tensor, a causal bias or None, got list"):
        selfattn.attention(q, k, v, [[True]])


def test_bad_layer_flags():
    x, w = torch.randn(2, 5, 8), torch.randn(18, 8)
    with pytest.raises(TypeError, match="num_heads must be an int, got float"):
        selfattn.self_attention(x, w, num_heads=2.0)
    with pytest.raises(TypeError, match="w_qkv must be a torch.Tensor, got list"):
        selfattn.self_attention(x, w.tolist(), num_heads=2)
    with pytest.raises(TypeError, match="causal must be a bool, got int"):
        selfattn.self_attention(x, w, num_heads=2, causal=1)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        selfattn.SelfAttention(8, 6, num_heads=4)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        selfattn.SelfAttention(8, 6, num_heads=0)
    with pytest.raises(ValueError, match="embed_dim must be"):
        selfattn.SelfAttention(0, 6)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        selfattn.reference.SelfAttention(8, 6, num_heads=4)
    layer = selfattn.SelfAttention(8, 6, num_heads=2)
    with pytest.raises(ValueError, match="E = embed_dim = 8"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"input must be \(N, E\) or \(B, N, E\) .* got shape \(5,\)"):
        layer(torch.randn(5))


# ---------------------------------------------------------------------------------------------
# Valid edge inputs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,h,nq,nk", [(0, 2, 5, 5), (2, 0, 5, 5), (2, 2, 0, 0), (2, 2, 0, 5), (2, 2, 1, 1),
                                       (1, 1, 1, 7), (1, 3, 7, 1)])
def test_edge_sizes(b, h, nq, nk, causal):
    q, k, v = sample_inputs(b, h, nq, nk, 8, requires_grad=True)
    out = selfattn.attention(q, k, v, causal=causal)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.isfinite(t.grad).all()


def test_no_keys_gives_zero_output_and_minus_inf_lse():
    q = torch.randn(2, 2, 4, 8, requires_grad=True)
    k = torch.randn(2, 2, 0, 8, requires_grad=True)
    v = torch.randn(2, 2, 0, 5, requires_grad=True)
    for causal in (False, True):
        out, lse = ops.attention_fwd(q, k, v, causal, 0.3)
        assert out.shape == (2, 2, 4, 5) and (out == 0).all()
        assert (lse == -math.inf).all()
        (grad_q,) = torch.autograd.grad(out.sum(), [q])
        assert (grad_q == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_token_sequences(dtype):
    layer = selfattn.SelfAttention(8, 8, num_heads=2, causal=True).to(dtype)
    x = torch.randn(1, 8, dtype=dtype)  # N = 1, a single (N, E) sequence
    out = layer(x)
    # One token attends to itself only: the output is its value projection.
    torch.testing.assert_close(out, (x @ layer.in_proj_weight[16:].t()).detach())
    empty = layer(torch.randn(3, 0, 8, dtype=dtype))
    assert empty.shape == (3, 0, 8)
    none = layer(torch.randn(0, 4, 8, dtype=dtype))
    assert none.shape == (0, 4, 8)


@pytest.mark.parametrize("causal", [False, True])
def test_huge_logits_stay_finite(causal):
    q, k, v = sample_inputs(2, 2, 100, 100, 16, dtype=torch.float64)
    q = q * 1e4  # scores ~1e4: exp would overflow without subtracting the max
    out = selfattn.attention(q.float(), k.float(), v.float(), causal=causal)
    assert torch.isfinite(out).all()
    # Float32 scores of size 1e4 carry rounding of ~1e-3, which the near-one-hot softmax passes on:
    # judge against eager float32 as everywhere else.
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(out, expected, eager_attention(q.float(), k.float(), v.float(), causal=causal), "out")


def test_infinities_in_v_propagate_as_in_sdpa():
    q, k, v = sample_inputs(1, 2, 20, 20, 8)
    v[0, 0, 3, 2] = math.inf
    v[0, 1, 5, 4] = -math.inf
    out = selfattn.attention(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isinf(), expected.isinf()) and torch.equal(out.isnan(), expected.isnan())
    assert out.isinf().any()
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite])
