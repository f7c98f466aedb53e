"""Bad input gets a clear exception naming the argument; valid edge inputs work."""

import math

import pytest
import torch
import torch.nn.functional as F

import selfattn
from tests.common import assert_close, eager_attention, sample_inputs

ops = torch.ops.selfattn


def qkv(*shapes, dtypes=(torch.float32,) * 3, devices=("cpu",) * 3):
    return [torch.randn(s, dtype=torch.float32).to(dtype=d, device=dev) if d.is_floating_point
            else torch.ones(s, dtype=d, device=dev) for s, d, dev in zip(shapes, dtypes, devices)]


BAD_ATTENTION = [
    ("q 2-D", qkv((5, 8), (5, 8), (5, 8)), ValueError, "q, k and v must all be 3-D|q must be 4-D"),
    ("q 5-D", qkv((1, 1, 1, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8)), ValueError, "q must be 4-D"),
    ("ranks differ", qkv((2, 5, 8), (2, 1, 5, 8), (2, 1, 5, 8)), ValueError, "all be 3-D"),
    ("batch", qkv((2, 1, 5, 8), (3, 1, 5, 8), (3, 1, 5, 8)), ValueError, "same batch size"),
    ("heads", qkv((2, 2, 5, 8), (2, 1, 5, 8), (2, 1, 5, 8)), ValueError, "same number of heads"),
    ("head dim", qkv((2, 1, 5, 8), (2, 1, 5, 4), (2, 1, 5, 8)), ValueError, "head dim of q"),
    ("k/v lengths", qkv((2, 1, 5, 8), (2, 1, 6, 8), (2, 1, 5, 8)), ValueError, "same sequence length"),
    ("mixed dtypes", qkv((1, 1, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8), dtypes=(torch.float32, torch.float64, torch.float32)),
     TypeError, "same dtype"),
    ("mixed devices", qkv((1, 1, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8), devices=("cpu", "meta", "cpu")),
     ValueError, "same device"),
    ("integer", qkv((1, 1, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8), dtypes=(torch.int64,) * 3), TypeError,
     "q must be float32"),
    ("bool", qkv((1, 1, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8), dtypes=(torch.float32, torch.bool, torch.float32)),
     TypeError, "k must be float32"),
]


@pytest.mark.parametrize("case", BAD_ATTENTION, ids=lambda c: c[0])
def test_bad_attention_inputs(case):
    _, tensors, error, message = case
    with pytest.raises(error, match=message):
        selfattn.attention(*tensors)


# (A meta tensor would route the raw op to its fake kernel, whose checks are the Python ones above.)
@pytest.mark.parametrize("case", [c for c in BAD_ATTENTION if c[1][0].dim() == 4 and c[1][1].dim() == 4
                                  and all(t.device.type == "cpu" for t in c[1])], ids=lambda c: c[0])
def test_bad_inputs_to_the_raw_op_raise_too(case):
    """torch.ops.selfattn.* callers bypass the Python checks: the C++ checks say the same."""
    _, tensors, error, message = case
    with pytest.raises((error, RuntimeError), match=message):
        ops.attention_fwd(*tensors, False, 1.0)


def test_non_tensor_and_bad_flags():
    q, k, v = sample_inputs(1, 1, 3, 3, 4)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        selfattn.attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="causal must be a bool"):
        selfattn.attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match="scale must be a float"):
        selfattn.attention(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="disagree"):
        selfattn.attention(q, k, v, causal=True, is_causal=False)


def layer_args(n=5, e=8, m=6, heads=2, bias=True, dtype=torch.float32):
    x = torch.randn(2, n, e, dtype=dtype)
    w = torch.randn(3 * m, e, dtype=dtype)
    b = torch.randn(3 * m, dtype=dtype) if bias else None
    return x, w, b, heads


BAD_LAYER = [
    ("x 1-D", lambda x, w, b, h: (x[0, 0], w, b, h), ValueError, "x must be 3-D"),
    ("x 4-D", lambda x, w, b, h: (x[None], w, b, h), ValueError, "x must be 3-D"),
    ("w rows not 3M", lambda x, w, b, h: (x, w[:-1], b, h), ValueError, "w_qkv must have shape"),
    ("w width != E", lambda x, w, b, h: (x, w[:, :-1], b, h), ValueError, "w_qkv must have shape"),
    ("w 1-D", lambda x, w, b, h: (x, w[0], b, h), ValueError, "w_qkv must have shape"),
    ("b shape", lambda x, w, b, h: (x, w, b[:-1], h), ValueError, "b_qkv must have shape"),
    ("heads do not divide M", lambda x, w, b, h: (x, w, b, 4), ValueError, "divisible by num_heads"),
    ("num_heads 0", lambda x, w, b, h: (x, w, b, 0), ValueError, "num_heads must be"),
    ("num_heads float", lambda x, w, b, h: (x, w, b, 2.0), ValueError, "num_heads must be"),
    ("w dtype", lambda x, w, b, h: (x, w.double(), b, h), TypeError, "same dtype"),
    ("b dtype", lambda x, w, b, h: (x, w, b.bfloat16(), h), TypeError, "same dtype"),
    ("w device", lambda x, w, b, h: (x, w.to("meta"), b, h), ValueError, "same device"),
    ("x integer", lambda x, w, b, h: (x.long(), w, b, h), TypeError, "x must be float32"),
]


@pytest.mark.parametrize("case", BAD_LAYER, ids=lambda c: c[0])
def test_bad_layer_inputs(case):
    _, make, error, message = case
    x, w, b, heads = make(*layer_args())
    with pytest.raises(error, match=message):
        selfattn.self_attention(x, w, b, num_heads=heads)


@pytest.mark.parametrize("case", [c for c in BAD_LAYER if "device" not in c[0] and "float" not in c[0]],
                         ids=lambda c: c[0])
def test_bad_layer_inputs_to_the_raw_op(case):
    _, make, error, message = case
    x, w, b, heads = make(*layer_args())
    with pytest.raises((error, RuntimeError), match=message.split()[0]):
        ops.self_attention_fwd(x, w, b, heads, False, 1.0)


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
    with pytest.raises(ValueError, match="embed_dim"):
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
