"""The ops as PyTorch sees them: opcheck, gradcheck, torch.compile, autocast, refused SDPA arguments."""

import pytest
import torch

import selfattn
from tests.common import sample_inputs

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

ops = torch.ops.selfattn


def attention_samples():
    """Arguments for attention_fwd / attention_bwd: dtypes, layouts, causal, Nq != Nk."""
    for dtype, layout, causal, (nq, nk) in [
        (torch.float32, "contiguous", False, (70, 70)),
        (torch.float32, "transposed", True, (33, 70)),
        (torch.float64, "sliced", True, (70, 20)),
        (torch.bfloat16, "contiguous", False, (5, 9)),
        (torch.float16, "strided_last", True, (17, 17)),
    ]:
        q, k, v = sample_inputs(2, 3, nq, nk, 16, 8, dtype=dtype, layout=layout, requires_grad=True)
        yield q, k, v, causal, 0.25


def layer_samples():
    for dtype, bias, causal in [(torch.float32, True, False), (torch.float64, False, True),
                                (torch.bfloat16, True, True)]:
        x = torch.randn(2, 19, 12, dtype=dtype, requires_grad=True)
        w = torch.randn(24, 12, dtype=dtype, requires_grad=True)
        b = torch.randn(24, dtype=dtype, requires_grad=True) if bias else None
        yield x, w, b, 2, causal, 0.5


@pytest.mark.parametrize("args", list(attention_samples()), ids=lambda a: f"{a[0].dtype}-causal{a[3]}")
def test_opcheck_attention(args):
    torch.library.opcheck(ops.attention_fwd, args)
    q, k, v, causal, scale = args
    out, lse = ops.attention_fwd(*args)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(ops.attention_bwd, (grad_out, q.detach(), k.detach(), v.detach(),
                                              out.detach(), lse, causal, scale))


@pytest.mark.parametrize("args", list(layer_samples()), ids=lambda a: f"{a[0].dtype}-bias{a[2] is not None}")
def test_opcheck_self_attention(args):
    torch.library.opcheck(ops.self_attention_fwd, args)
    x, w, b, heads, causal, scale = args
    out, qkv, lse = ops.self_attention_fwd(*args)
    for mask in ([True, True, True, False], [False, True, False, False]):
        torch.library.opcheck(ops.self_attention_bwd, (torch.randn_like(out), x.detach(), w.detach(), qkv,
                                                       out.detach(), lse, heads, causal, scale, mask))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_attention(causal):
    # 70 queries and 66 keys: more than one 64-wide block each way, Nq != Nk.
    q, k, v = sample_inputs(1, 2, 70, 66, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: selfattn.attention(q, k, v, causal=causal), (q, k, v),
                                    fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_self_attention(causal):
    x = torch.randn(2, 67, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: selfattn.self_attention(x, w, b, num_heads=2, causal=causal),
                                    (x, w, b), fast_mode=True)


class Block(torch.nn.Module):
    """A small model that uses the module, for torch.compile."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.attn = selfattn.SelfAttention(32, 32, num_heads=4, bias=True, causal=True)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x):
        return x + self.out(self.attn(self.norm(x)))


def test_torch_compile_fullgraph():
    """The default backend (inductor), forward and backward, no graph breaks."""
    torch._dynamo.reset()
    model = Block()
    x = torch.randn(2, 40, 32, requires_grad=True)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x] + list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x] + list(model.parameters()))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_attention_dynamic_shapes():
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: selfattn.attention(q, k, v, causal=True), fullgraph=True,
                       backend="aot_eager", dynamic=True)
    for n in (10, 23):
        q, k, v = sample_inputs(2, 2, n, n, 8)
        torch.testing.assert_close(fn(q, k, v), selfattn.attention(q, k, v, causal=True))


def test_autocast_bfloat16_with_float32_parameters():
    layer = selfattn.SelfAttention(16, 16, num_heads=2, bias=True)
    x = torch.randn(2, 30, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        q, k, v = sample_inputs(1, 2, 5, 5, 8)
        attn = selfattn.attention(q, k, v)
    assert out.dtype == torch.bfloat16 and attn.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.in_proj_weight.grad.dtype == torch.float32
    expected = layer(x.detach())
    assert (out.float() - expected).abs().max() < 0.05


def test_lse_is_not_differentiable():
    q, k, v = sample_inputs(1, 1, 4, 4, 8, requires_grad=True)
    out, lse = ops.attention_fwd(q, k, v, False, 0.3)
    assert out.requires_grad and not lse.requires_grad


def test_dropout_out_of_range_is_refused():
    # Dropout itself is tested in tests/test_dropout.py; its bad arguments in test_dropout_bad_inputs.py.
    q, k, v = sample_inputs(1, 1, 3, 3, 4)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1"):
        selfattn.attention(q, k, v, dropout_p=1.0)
