"""selfattn.attention's plain-eager entry: selfattn._C.attention_eager (csrc/python_module.cpp), attention_fwd's out
for its arguments by position, whose reverse-mode autograd is a C++ Function (csrc/eager.cpp), against the
dispatcher's Python Autograd kernel of attention_fwd (selfattn/_autograd.py) — same outputs and gradients, bitwise —
and the routing: plain eager takes the C++ node, everything that needs the Python kernel does not. Only the compiled
build has the entry (the JIT build is loaded as a plain library, and takes the Python autograd)."""

import pytest
import torch

import selfattn
from selfattn._op_table import OPS
from tests.common import sample_inputs

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

ops = torch.ops.selfattn
entry = selfattn._autograd._attention_eager
needs_entry = pytest.mark.skipif(entry is None, reason="the JIT build has no selfattn._C module: the Python "
                                 "autograd serves")


def cases():
    """(name, q, k, v, op arguments after q, k, v): masks, GQA, windows, dropout, Nq != Nk."""
    torch.manual_seed(0)
    q, k, v = sample_inputs(2, 4, 37, 70, 16, 8, layout="transposed")
    yield "plain", q, k, v, (False, 0.3)
    yield "causal", q, k, v, (True, 0.3)
    k2, v2 = k[:, :2], v[:, :2]
    yield "gqa-bottom-right-window", q, k2, v2, (True, 0.3, None, 20, 0, 70 - 37)
    mask = torch.rand(2, 1, 37, 70) > 0.3
    yield "bool-mask", q, k, v, (False, 0.3, mask)
    float_mask = torch.randn(1, 4, 37, 70)
    yield "float-mask", q, k, v, (False, 0.3, float_mask, -1, -1, 0)
    rng_state = torch.tensor([1234, 8], dtype=torch.int64)
    yield "dropout", q, k, v, (True, 0.3, None, -1, -1, 0, 0.25, rng_state)


CASES = list(cases())


def forward_and_grads(fwd, q, k, v, args):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fwd(q, k, v, *args)
    # (randn, not randn_like: torch 2.6's randn_like takes no generator)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


@needs_entry
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_results_as_the_python_autograd(case):
    _, q, k, v, args = case
    eager = forward_and_grads(entry, q, k, v, args)
    assert type(eager[0].grad_fn).__name__ == "CppFunction"
    python = forward_and_grads(lambda *a: ops.attention_fwd(*a)[0], q, k, v, args)  # its Autograd kernel: Python
    for got, expected in zip((eager[0], *eager[1]), (python[0], *python[1])):
        assert torch.isfinite(got).all()
        assert torch.equal(got, expected)


@needs_entry
def test_public_function_takes_the_cpp_node_in_plain_eager():
    q, k, v = sample_inputs(1, 2, 5, 5, 8, 8, requires_grad=True)
    out = selfattn.attention(q, k, v)
    assert type(out.grad_fn).__name__ == "CppFunction", type(out.grad_fn)
    with torch.no_grad():
        assert selfattn.attention(q, k, v).grad_fn is None
    # Forward mode and torch.func need the Python kernel (it alone has the jvp and the levels).
    with torch.autograd.forward_ad.dual_level():
        out = selfattn.attention(q, k, v)
    assert type(out.grad_fn).__name__ != "CppFunction"
    # A mask, a window or dropout: the same entry, more arguments.
    out = selfattn.attention(q, k, v, attn_mask=torch.rand(1, 1, 5, 5) > 0.3, window=(2, 0), dropout_p=0.2)
    assert type(out.grad_fn).__name__ == "CppFunction", type(out.grad_fn)


def test_gradients_against_float64_eager():
    q, k, v = sample_inputs(2, 3, 11, 13, 8, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 11, 13) > 0.2
    out = selfattn.attention(q, k, v, attn_mask=mask, is_causal=False, scale=0.4)
    scores = (q @ k.transpose(-1, -2) * 0.4).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    wanted = torch.autograd.grad(expected, (q, k, v), grad_out)
    for g, w in zip(got, wanted):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@needs_entry
def test_gradcheck_through_the_cpp_node():
    q, k, v = sample_inputs(1, 2, 4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 2, 4, 6) > 0.3
    assert torch.autograd.gradcheck(lambda a, b, c: entry(a, b, c, True, 0.7, mask, -1, -1, 2),
                                    (q, k, v))


def test_batched_gradients_through_the_cpp_node():
    """A vmap over the backward (is_grads_batched) reaches attention_bwd's batching rule."""
    q, k, v = sample_inputs(1, 2, 6, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    out = selfattn.attention(q, k, v, is_causal=True)
    grad_outs = torch.randn(3, *out.shape, dtype=torch.float64)
    batched = torch.autograd.grad(out, (q, k, v), grad_outs, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        single = torch.autograd.grad(out, (q, k, v), grad_outs[i], retain_graph=True)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i], s, rtol=1e-12, atol=1e-12)


def test_double_backward_refused():
    q, k, v = sample_inputs(1, 2, 5, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    out = selfattn.attention(q, k, v)
    (grad_q,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad_q.sum().backward()


@needs_entry
def test_mask_requiring_grad_refused():
    q, k, v = sample_inputs(1, 2, 5, 5, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 2, 5, 5, requires_grad=True)
    with pytest.raises(NotImplementedError, match="selfattn.attention: attn_mask requires grad"):
        entry(q, k, v, False, 0.5, mask)


@needs_entry
def test_meta_tensors():
    """Below autograd the entry is attention_fwd itself: its Meta kernel checks and gives out's shape."""
    q, k, v = sample_inputs(2, 3, 9, 12, 8, 4)
    out = entry(q.to("meta"), k.to("meta"), v.to("meta"), True, 0.25)
    assert out.device.type == "meta" and out.shape == (2, 3, 9, 4)
    assert out.stride() == ops.attention_fwd(q, k, v, True, 0.25)[0].stride()


@needs_entry
def test_bad_input_named():
    q, k, v = sample_inputs(1, 2, 5, 5, 4, 4)
    with pytest.raises(ValueError, match="k must have shape"):
        entry(q, k[..., :3], v, False, 0.5)
    with pytest.raises(ValueError, match="k must have shape"):
        entry(q.to("meta"), k[..., :3].to("meta"), v.to("meta"), False, 0.5)


@pytest.fixture
def torch_ops_calls(monkeypatch):
    """Counts the forward calls that went through torch.ops and the Python autograd (the fallback,
    call() of attention_fwd) instead of the direct entry."""
    calls = []
    call = selfattn._autograd.call

    def counted(op, *args):
        if op is OPS["attention_fwd"].handle:
            calls.append(args)
        return call(op, *args)

    monkeypatch.setattr(selfattn._autograd, "call", counted)
    return calls


@needs_entry
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_direct_entry_same_results_as_torch_ops(grad, torch_ops_calls):
    q, k, v = sample_inputs(2, 3, 9, 12, 8, 8, layout="transposed", requires_grad=grad)
    for causal in (False, True):
        if grad:
            direct = forward_and_grads(lambda *a: selfattn.attention(*a[:3], is_causal=a[3], scale=a[4]),
                                       q, k, v, (causal, 0.3))
        else:
            with torch.no_grad():
                direct = (selfattn.attention(q, k, v, is_causal=causal, scale=0.3),)
        assert not torch_ops_calls, "a plain call in eager mode went through torch.ops"
        via_ops = forward_and_grads(lambda *a: ops.attention_fwd(*a)[0], q, k, v, (causal, 0.3)) if grad else (
            ops.attention_fwd(q, k, v, causal, 0.3)[0],)
        assert torch.equal(direct[0], via_ops[0])
        if grad:
            assert type(direct[0].grad_fn).__name__ == "CppFunction"
            assert all(torch.equal(a, b) for a, b in zip(direct[1], via_ops[1]))


@needs_entry
def test_direct_entry_declines_what_only_torch_ops_handles(torch_ops_calls):
    q, k, v = sample_inputs(1, 2, 5, 5, 8, 8)
    assert entry(q, k, v, False, 1) is NotImplemented  # an int scale
    assert entry(q, k, v, 0, 0.5) is NotImplemented  # an int for causal
    assert entry(q, k, v, False) is NotImplemented  # too few arguments
    assert entry(q, k, v, False, 0.5, None, -1, -1, 0, 0.0, None, 0) is NotImplemented  # too many
    assert entry(q, k, v, False, 0.5, None, 1.5) is NotImplemented  # a float for window_left
    assert entry(q, k, v, False, 0.5, None, 2**70) is NotImplemented  # past int64
    assert entry(q, k, v, False, 0.5, None, -1, -1, 0, 0.0, None) is not NotImplemented  # all of them

    class Subclass(torch.Tensor):  # with __torch_function__, which only torch.ops honours
        pass

    assert entry(q.as_subclass(Subclass), k, v, False, 0.5) is NotImplemented
    assert entry(torch.nn.Parameter(q), k, v, False, 0.5) is not NotImplemented  # plain, as torch's bindings treat it

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert entry(q, k, v, False, 0.5) is NotImplemented
        out = selfattn.attention(q, k, v)
    assert len(torch_ops_calls) == 1  # the public function fell back
    assert torch.equal(out, selfattn.attention(q, k, v))


@needs_entry
def test_direct_entry_raises_the_ops_error():
    """An error raised while the op runs (the GIL let go) comes back as the op's own exception."""
    q, k, v = sample_inputs(1, 2, 5, 5, 4, 4)
    with pytest.raises(ValueError) as direct:
        entry(q, k[..., :3], v, False, 0.5)
    with pytest.raises(ValueError) as via_ops:
        ops.attention_fwd(q, k[..., :3], v, False, 0.5)
    assert str(direct.value) == str(via_ops.value) and "k must have shape" in str(direct.value)
