"""The fused layer (selfattn.self_attention / selfattn.SelfAttention) against the reference module
and a float64 computation: forward and the gradients of x, w_qkv and b_qkv."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfattn
from tests.common import ALL_DTYPES, assert_close, eager_attention

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

PARTS = ("query", "key", "value")

# (batch or None for a single (N, E) sequence, N, E, M, H)
LAYER_SHAPES = [
    (None, 1, 4, 3, 1),
    (None, 17, 8, 12, 2),
    (3, 3, 16, 16, 8),
    (2, 17, 24, 16, 2),
    (2, 128, 32, 64, 8),
    (1, 257, 16, 32, 2),
    (1, 1000, 32, 64, 1),
]


def layer_id(shape):
    batch, n, e, m, h = shape
    return f"{'single' if batch is None else f'B{batch}'}N{n}E{e}M{m}H{h}"


def reference_fn(module):
    """The reference module as a function of the packed (w_qkv, b_qkv), so gradients land on them."""
    def fn(x, w_qkv, b_qkv, **_):
        params = {f"to_{part}.weight": w for part, w in zip(PARTS, w_qkv.chunk(3))}
        if b_qkv is not None:
            params.update({f"to_{part}.bias": b for part, b in zip(PARTS, b_qkv.chunk(3))})
        return torch.func.functional_call(module, params, (x,))
    return fn


def matmul_layer(x, w_qkv, b_qkv, num_heads, causal):
    """F.linear + matmul attention: the reference's computation without its N²·M broadcast."""
    q, k, v = F.linear(x, w_qkv, b_qkv).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(-3, -2) for t in (q, k, v))
    return eager_attention(q, k, v, causal=causal).transpose(-3, -2).flatten(-2)


def fused_layer(x, w_qkv, b_qkv, num_heads, causal):
    return selfattn.self_attention(x, w_qkv, b_qkv, num_heads=num_heads, causal=causal)


def with_grads(fn, x, w_qkv, b_qkv, grad_out, **kwargs):
    """fn's output and its gradients for x, w_qkv (and b_qkv), on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_qkv) + ((b_qkv,) if b_qkv is not None else ())]
    out = fn(leaves[0], leaves[1], leaves[2] if b_qkv is not None else None, **kwargs)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=layer_id)
def test_fused_layer_against_reference(shape, dtype, causal, bias):
    batch, n, e, m, h = shape
    lead = () if batch is None else (batch,)
    ref = selfattn.reference.SelfAttention(e, m, num_heads=h, bias=bias, causal=causal).to(dtype)
    w_qkv = torch.cat([getattr(ref, f"to_{part}").weight for part in PARTS]).detach()
    b_qkv = torch.cat([getattr(ref, f"to_{part}").bias for part in PARTS]).detach() if bias else None
    x = torch.randn(*lead, n, e, dtype=dtype)
    grad_out = torch.randn(*lead, n, m, dtype=dtype)

    # The reference module where its broadcast fits (N <= 128); above that the same computation by
    # matmul (DESIGN.md, "Testing conventions": the matmul fallback). Expected in float64; "eager"
    # is the same at the test's precision.
    # (functional_call runs the module on the weights passed in, at their precision.)
    expected_fn = eager_fn = reference_fn(ref) if n <= 128 else matmul_layer
    kwargs = dict(num_heads=h, causal=causal)
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    expected, expected_grads = with_grads(expected_fn, x.double(), w_qkv.double(), to64(b_qkv), grad_out.double(), **kwargs)
    eager, eager_grads = with_grads(eager_fn, x, w_qkv, b_qkv, grad_out, **kwargs)
    out, grads = with_grads(fused_layer, x, w_qkv, b_qkv, grad_out, **kwargs)

    assert out.shape == (*lead, n, m) and out.dtype == dtype
    assert_close(out, expected, eager, "out")
    for name, grad, exp, eag in zip(("dx", "dW", "db"), grads, expected_grads, eager_grads):
        assert grad.dtype == dtype
        assert_close(grad, exp, eag, name)


@pytest.mark.parametrize("bias", [False, True])
def test_module_from_reference(bias):
    ref = selfattn.reference.SelfAttention(12, 8, num_heads=2, bias=bias, causal=True, scale=0.3)
    fused = selfattn.SelfAttention.from_reference(ref)
    assert (fused.embed_dim, fused.model_dim, fused.num_heads, fused.causal, fused.scale) == (12, 8, 2, True, 0.3)
    assert fused.in_proj_weight.shape == (24, 12)
    assert (fused.in_proj_bias is not None) == bias
    x = torch.randn(3, 20, 12)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_module_matches_multihead_attention(causal, bias):
    """SelfAttention on nn.MultiheadAttention's in-projection, followed by that module's
    out-projection, is nn.MultiheadAttention: forward and the gradients of x, in_proj_weight and
    in_proj_bias, in float64."""
    batch, n, embed, heads = 3, 37, 24, 4
    mha = nn.MultiheadAttention(embed, heads, bias=bias, batch_first=True, dtype=torch.float64)
    if bias:  # nn.MultiheadAttention starts its biases at zero, where a dropped bias would not show
        with torch.no_grad():
            mha.in_proj_bias.copy_(torch.randn_like(mha.in_proj_bias))
            mha.out_proj.bias.copy_(torch.randn_like(mha.out_proj.bias))
    layer = selfattn.SelfAttention(embed, embed, heads, bias=bias, causal=causal, dtype=torch.float64)
    with torch.no_grad():  # the same names and layout: a plain copy
        layer.in_proj_weight.copy_(mha.in_proj_weight)
        if bias:
            layer.in_proj_bias.copy_(mha.in_proj_bias)
    x = torch.randn(batch, n, embed, dtype=torch.float64)
    grad_out = torch.randn(batch, n, embed, dtype=torch.float64)
    causal_mask = {}
    if causal:
        causal_mask = dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64),
                           is_causal=True)

    x_mha = x.clone().requires_grad_(True)
    expected = mha(x_mha, x_mha, x_mha, need_weights=False, **causal_mask)[0]
    expected.backward(grad_out)
    x_fused = x.clone().requires_grad_(True)
    out = F.linear(layer(x_fused), mha.out_proj.weight, mha.out_proj.bias)
    out.backward(grad_out)

    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x_fused.grad, x_mha.grad)
    torch.testing.assert_close(layer.in_proj_weight.grad, mha.in_proj_weight.grad)
    if bias:
        torch.testing.assert_close(layer.in_proj_bias.grad, mha.in_proj_bias.grad)


def test_module_parameters_and_init():
    layer = selfattn.SelfAttention(16, 32, num_heads=4, bias=True)
    names = dict(layer.named_parameters())
    assert set(names) == {"in_proj_weight", "in_proj_bias"}
    bound = 1 / 16**0.5  # nn.Linear(16, 32)'s init bound
    assert layer.in_proj_weight.abs().max() <= bound and layer.in_proj_bias.abs().max() <= bound
    assert layer.in_proj_weight.std() > bound / 4  # initialized, not zeros
    assert "num_heads=4" in repr(layer)


def test_frozen_weights_skip_their_gradients():
    layer = selfattn.SelfAttention(8, 8, num_heads=2, bias=True)
    layer.requires_grad_(False)
    x = torch.randn(2, 10, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.in_proj_weight.grad is None
    layer.requires_grad_(True)
    x = torch.randn(2, 10, 8)  # no grad for the input: only the parameters get one
    layer(x).sum().backward()
    assert layer.in_proj_weight.grad is not None and layer.in_proj_bias.grad is not None


def test_module_score_modifications_against_float64():
    """SelfAttention(softcap=, alibi_slopes=, sinks=True): the sinks a zero-initialised parameter
    that trains; output and the gradients of x, the weights and the sinks against scores written
    out here (tanh cap, the ALiBi bias from positions, the sink as a dropped extra column)."""
    heads, kv_heads, dim, n = 4, 2, 8, 23
    slopes = torch.rand(heads)
    layer = selfattn.SelfAttention(16, heads * dim, num_heads=heads, num_kv_heads=kv_heads, bias=True, causal=True,
                                   softcap=1.5, alibi_slopes=slopes, sinks=True, dtype=torch.float64)
    assert isinstance(layer.sinks, nn.Parameter) and torch.equal(layer.sinks, torch.zeros(heads, dtype=torch.float64))
    assert "sinks" in dict(layer.named_parameters()) and "alibi_slopes" in dict(layer.named_buffers())
    with torch.no_grad():
        layer.in_proj_weight.mul_(3)  # scores large enough that the cap matters
        layer.sinks.normal_(0, 2)
    x = torch.randn(2, n, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)

    w, b = layer.in_proj_weight.detach().clone().requires_grad_(), layer.in_proj_bias.detach().clone()
    sinks = layer.sinks.detach().clone().requires_grad_()
    x64 = x.detach().clone().requires_grad_()
    qkv = F.linear(x64, w, b).unflatten(-1, (heads + 2 * kv_heads, dim)).transpose(1, 2)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = 1.5 * torch.tanh(q @ k.transpose(-1, -2) / dim**0.5 / 1.5)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    scores = (scores - slopes.double().view(1, -1, 1, 1) * (i - j).abs()).masked_fill(j > i, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(2, heads, n, 1)
    expected = (torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1] @ v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want, name in ((x.grad, x64.grad, "x"), (layer.in_proj_weight.grad, w.grad, "w_qkv"),
                            (layer.sinks.grad, sinks.grad, "sinks")):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=lambda m: f"grad {name}: {m}")
