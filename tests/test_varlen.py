"""selfattn.attention_varlen: packed variable-length sequences (FlashAttention's layout).

The oracle, per sequence, is an explicit float64 softmax with a dense visibility mask built here
from the documented meaning of causal / "bottom_right" / window, never the kernels' band logic.
Masks the dense CPU kernels do not compute yet (windows, bottom-right offsets, GQA) are skipped
with the kernels' "not implemented yet" message until they do.
"""

from __future__ import annotations

import math

import pytest
import torch

import selfattn
from tests.common import ALL_DTYPES, assert_close

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

ops = torch.ops.selfattn


# ---------------------------------------------------------------------------------------------
# Inputs


def cu_seqlens(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def random_lengths(seed=1234, count=9, high=150):
    """(lengths_q, lengths_k) from a fixed seed, nq != nk mostly, with the edge cases forced in:
    no queries, no keys, neither, one of each, and one sequence crossing 64-row tiles both ways."""
    g = torch.Generator().manual_seed(seed)
    nq = torch.randint(0, high, (count,), generator=g).tolist()
    nk = torch.randint(0, high, (count,), generator=g).tolist()
    for s, (a, b) in enumerate([(0, 5), (3, 0), (1, 1), (0, 0), (130, 70)]):
        nq[s], nk[s] = a, b
    perm = torch.randperm(count, generator=g).tolist()  # the edge cases anywhere in the pack
    return [nq[p] for p in perm], [nk[p] for p in perm]


def packed_inputs(lengths_q, lengths_k, hq=2, hk=2, dim=16, dim_v=8, dtype=torch.float32):
    tq, tk = sum(lengths_q), sum(lengths_k)
    return (torch.randn(tq, hq, dim, dtype=dtype), torch.randn(tk, hk, dim, dtype=dtype),
            torch.randn(tk, hk, dim_v, dtype=dtype), cu_seqlens(lengths_q), cu_seqlens(lengths_k),
            max(lengths_q, default=0), max(lengths_k, default=0))


# ---------------------------------------------------------------------------------------------
# The oracle


def visible_keys(nq, nk, causal, window):
    """(nq, nk) bool: which keys each query of one sequence sees, from the documented meaning."""
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    offset = nk - nq if causal == "bottom_right" else 0
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    seen = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        seen &= j >= i + offset - left
    if right >= 0:
        seen &= j <= i + offset + right
    return seen


def explicit_attention(q, k, v, seen, scale):
    """q (H, nq, D), k (H, nk, D), v (H, nk, Dv) at their own precision: (out (H, nq, Dv), lse (H, nq)).
    A row that sees no key gives 0 and lse -inf."""
    if k.shape[0] != q.shape[0]:  # grouped-query attention, as repeat_interleave would give
        group = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    if k.shape[1] == 0 or q.shape[1] == 0:
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
        return out, torch.full(q.shape[:2], float("-inf"), dtype=q.dtype)
    scores = torch.einsum("hid,hjd->hij", q, k) * scale
    scores = scores.masked_fill(~seen, float("-inf"))
    any_seen = seen.any(-1)[None, :, None]
    row_max = torch.where(any_seen, scores.amax(-1, keepdim=True), 0).detach()
    p = torch.exp(scores - row_max)
    total = p.sum(-1, keepdim=True)
    out = torch.einsum("hij,hjd->hid", p, v) / torch.where(total > 0, total, 1)
    return out, (row_max + torch.log(total)).squeeze(-1)


def varlen_oracle(q, k, v, lengths_q, lengths_k, causal=False, window=None, scale=None):
    """Packed (out (Tq, Hq, Dv), lse (Hq, Tq)), one sequence at a time, at the inputs' precision."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    q0 = k0 = 0
    for nq, nk in zip(lengths_q, lengths_k):
        seq = [t.narrow(0, s, n).transpose(0, 1) for t, s, n in ((q, q0, nq), (k, k0, nk), (v, k0, nk))]
        out, lse = explicit_attention(*seq, visible_keys(nq, nk, causal, window), scale)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
        q0, k0 = q0 + nq, k0 + nk
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[2])
    lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0)
    return out, lse


def with_grads(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True, materialize_grads=True)
    return out.detach(), [g.detach() for g in grads]


def run_or_skip(fn, *args, **kwargs):
    """fn(...), or a skip while the dense CPU kernels refuse this mask ("not implemented yet")."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as error:
        if "not implemented yet" in str(error):
            pytest.skip(f"dense kernel: {str(error).splitlines()[0]}")
        raise


# (name, causal, window, Hq, Hk)
CONFIGS = [
    ("full", False, None, 2, 2),
    ("causal", True, None, 2, 2),
    ("bottom_right", "bottom_right", None, 2, 2),
    ("window", False, (9, 4), 2, 2),
    ("causal_window", True, (17, 5), 2, 2),
    ("bottom_right_window", "bottom_right", (6, -1), 2, 2),
    ("left_unbounded_window", False, (-1, 3), 2, 2),
    ("gqa_causal", True, None, 4, 2),
    ("gqa_bottom_right_window", "bottom_right", (20, 2), 6, 2),
]


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_forward_and_gradients_against_float64(config, dtype):
    check_against_float64(config, dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[5], CONFIGS[8]], ids=lambda c: c[0])
def test_cuda_against_float64(config, dtype):
    check_against_float64(config, dtype, "cuda")


def check_against_float64(config, dtype, device):
    """The kernel on ``device`` against the float64 oracle (on the CPU), with eager PyTorch at
    ``dtype`` (on the CPU) setting the tolerance."""
    _, causal, window, hq, hk = config
    lengths_q, lengths_k = random_lengths()
    low = packed_inputs(lengths_q, lengths_k, hq, hk, dtype=dtype)
    cu_q, cu_k, max_q, max_k = low[3:]
    low = low[:3]
    low_grad_out = torch.randn(low[0].shape[0], hq, low[2].shape[2], dtype=dtype)
    q, k, v, grad_out = (t.double() for t in (*low, low_grad_out))  # the float64 oracle's inputs
    kwargs = dict(causal=causal, window=window, enable_gqa=hq != hk)

    def kernel(q, k, v):
        return selfattn.attention_varlen(q, k, v, cu_q.to(device), cu_k.to(device), max_q, max_k, **kwargs)

    def oracle(q, k, v):
        return varlen_oracle(q, k, v, lengths_q, lengths_k, causal, window)[0]

    out, grads = run_or_skip(with_grads, kernel, *(t.to(device) for t in (*low, low_grad_out)))
    expected, expected_grads = with_grads(oracle, q, k, v, grad_out)
    eager, eager_grads = with_grads(oracle, *low, low_grad_out)
    assert out.dtype == dtype and out.shape == (q.shape[0], hq, v.shape[2])
    assert_close(out, expected, eager, "out")
    for name, g, e, ge in zip("qkv", grads, expected_grads, eager_grads):
        assert_close(g, e, ge, f"grad_{name}")

    # lse from the raw op: the accumulation dtype, -inf exactly where a row sees no key.
    bottom_right = causal == "bottom_right"
    _, lse = ops.varlen_attention_fwd(*(t.to(device) for t in (*low, cu_q, cu_k)), max_q, max_k, bool(causal),
                                      1 / math.sqrt(q.shape[-1]), *(window or (-1, -1)), bottom_right)
    expected_lse = varlen_oracle(q, k, v, lengths_q, lengths_k, causal, window)[1]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (hq, q.shape[0])
    lse = lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    finite = torch.isfinite(expected_lse)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)
    assert (lse[finite].double() - expected_lse[finite]).abs().max() <= tol


def test_the_oracle_masks_mean_what_the_docs_say():
    """A spot check of visible_keys itself, on one small sequence (nq 3, nk 5)."""
    t, f = True, False
    assert visible_keys(3, 5, True, None).tolist() == [[t, f, f, f, f], [t, t, f, f, f], [t, t, t, f, f]]
    assert visible_keys(3, 5, "bottom_right", None).tolist() == [[t, t, t, f, f], [t, t, t, t, f], [t] * 5]
    assert visible_keys(3, 5, False, (1, 1)).tolist() == [[t, t, f, f, f], [t, t, t, f, f], [f, t, t, t, f]]
    assert visible_keys(3, 5, "bottom_right", (1, 4)).tolist() == [[f, t, t, f, f], [f, f, t, t, f],
                                                                  [f, f, f, t, t]]
    assert not visible_keys(4, 2, "bottom_right", None)[:2].any()  # rows that see nothing


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] in ("full", "causal", "bottom_right_window",
                                                                   "gqa_causal")], ids=lambda c: c[0])
def test_gradcheck(config):
    _, causal, window, hq, hk = config
    lengths_q, lengths_k = [0, 3, 1, 5, 2], [2, 0, 4, 5, 3]
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs(lengths_q, lengths_k, hq, hk, dim=4, dim_v=3,
                                                      dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    fn = lambda q, k, v: selfattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,  # noqa: E731
                                                   window=window, enable_gqa=hq != hk)
    run_or_skip(fn, q, k, v)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_equals_one_attention_call_per_sequence(causal):
    """Each sequence's rows are exactly what selfattn.attention gives on that sequence alone."""
    lengths_q, lengths_k = random_lengths(seed=7)
    if causal == "bottom_right":
        lengths_k = [max(nk, nq) for nq, nk in zip(lengths_q, lengths_k)]  # SDPA's lower-right needs nk >= nq
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs(lengths_q, lengths_k)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2])
    out, grads = run_or_skip(with_grads, lambda q, k, v: selfattn.attention_varlen(
        q, k, v, cu_q, cu_k, max_q, max_k, causal=causal), q, k, v, grad_out)
    q0 = k0 = 0
    for nq, nk in zip(lengths_q, lengths_k):
        seq = [t.narrow(0, s, n).transpose(0, 1)[None] for t, s, n in ((q, q0, nq), (k, k0, nk), (v, k0, nk))]
        g = grad_out.narrow(0, q0, nq).transpose(0, 1)[None]
        if causal == "bottom_right":
            if nq == 0 or nk == 0:
                q0, k0 = q0 + nq, k0 + nk
                continue
            from torch.nn.attention.bias import causal_lower_right
            fn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                q, k, v, attn_mask=causal_lower_right(nq, nk))
            e_out, e_grads = with_grads(fn, *seq, g)
            torch.testing.assert_close(out.narrow(0, q0, nq), e_out[0].transpose(0, 1))
        else:
            e_out, e_grads = with_grads(lambda q, k, v: selfattn.attention(q, k, v, causal=causal), *seq, g)
            assert torch.equal(out.narrow(0, q0, nq), e_out[0].transpose(0, 1))
            assert torch.equal(grads[0].narrow(0, q0, nq), e_grads[0][0].transpose(0, 1))
            assert torch.equal(grads[1].narrow(0, k0, nk), e_grads[1][0].transpose(0, 1))
            assert torch.equal(grads[2].narrow(0, k0, nk), e_grads[2][0].transpose(0, 1))
        q0, k0 = q0 + nq, k0 + nk


@pytest.mark.parametrize("lengths", [([], []), ([0, 0, 0], [0, 0, 0]), ([0, 4], [0, 0]), ([0, 0], [3, 2])],
                         ids=["S=0", "all empty", "no keys", "no queries"])
def test_empty(lengths):
    lengths_q, lengths_k = lengths
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs(lengths_q, lengths_k)
    out, lse = ops.varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, True, 0.5)
    assert out.shape == (q.shape[0], 2, 8) and lse.shape == (2, q.shape[0])
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    grad_out = torch.randn_like(out)
    grads = ops.varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, True, 0.5)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))
    for t in (q, k, v):
        t.requires_grad_(True)
    selfattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True).sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in (q, k, v))


def test_strided_inputs_and_max_seqlen_larger_than_needed():
    """q, k, v as views (heads of a wider packed qkv); max_seqlen may exceed every length."""
    lengths = [5, 70, 0, 2]
    t = sum(lengths)
    qkv = torch.randn(t, 3, 2, 16)
    q, k, v = qkv.unbind(1)
    cu = cu_seqlens(lengths)
    out = selfattn.attention_varlen(q, k, v, cu, cu, 500, 500, causal=True)
    expected = selfattn.attention_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 70, 70, causal=True)
    assert torch.equal(out, expected)
    assert_close(out, varlen_oracle(q.double(), k.double(), v.double(), lengths, lengths, True)[0],
                 varlen_oracle(q, k, v, lengths, lengths, True)[0])


# ---------------------------------------------------------------------------------------------
# PyTorch integration


def varlen_samples():
    for dtype, causal, (lengths_q, lengths_k) in [
        (torch.float32, False, ([3, 0, 70], [5, 2, 66])),
        (torch.float64, True, ([1, 4, 0], [1, 0, 6])),
        (torch.bfloat16, True, ([9], [9])),
        (torch.float32, True, ([], [])),
    ]:
        q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs(lengths_q, lengths_k, dtype=dtype)
        yield (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, max_q, max_k, causal, 0.25)


@pytest.mark.parametrize("args", list(varlen_samples()), ids=lambda a: f"{a[0].dtype}-T{a[0].shape[0]}")
def test_opcheck(args):
    torch.library.opcheck(ops.varlen_attention_fwd, args)
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = args
    out, lse = ops.varlen_attention_fwd(*args)
    torch.library.opcheck(ops.varlen_attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                     out.detach(), lse, cu_q, cu_k, max_q, max_k, causal, scale))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    lengths_q, lengths_k = [4, 0, 67, 1], [4, 3, 70, 1]
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs(lengths_q, lengths_k)

    def fn(q, k, v, cu_q, cu_k):
        return selfattn.attention_varlen(q * 2, k, v, cu_q, cu_k, max_q, max_k, causal=True).sin()

    def run(f):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = f(*leaves, cu_q, cu_k)
        return out, torch.autograd.grad(out.sum(), leaves)

    expected, expected_grads = run(fn)
    out, grads = run(torch.compile(fn, fullgraph=True))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_autocast_bfloat16():
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs([3, 5], [4, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selfattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    assert out.dtype == torch.bfloat16
    expected = selfattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    assert (out.float() - expected).abs().max() < 0.05


def test_lse_is_not_differentiable():
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs([3, 5], [4, 6])
    q.requires_grad_(True)
    out, lse = ops.varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, False, 0.3)
    assert out.requires_grad and not lse.requires_grad


# ---------------------------------------------------------------------------------------------
# The public function's own arguments (the ops' checks are in test_bad_inputs.py)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(causal="lower_right"), ValueError, r"causal must be False, True, 'top_left' or 'bottom_right'"),
    (dict(causal=1), ValueError, r"causal must be False, True"),
    (dict(window=3), TypeError, r"window must be a pair \(left, right\) of ints"),
    (dict(window=(1, 2, 3)), TypeError, r"window must be a pair \(left, right\) of ints"),
    (dict(window=(1.0, 2)), TypeError, r"window's left side must be an int, got float"),
    (dict(window=(0, -2)), ValueError, r"window_right must be >= -1 \(-1: unbounded\), got -2"),
    (dict(enable_gqa=None), TypeError, r"enable_gqa must be a bool"),
])
def test_public_argument_errors(kwargs, error, message):
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs([3], [4])
    with pytest.raises(error, match=message):
        selfattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def test_grouped_query_attention_needs_the_flag():
    q, k, v, cu_q, cu_k, max_q, max_k = packed_inputs([3], [4], hq=4, hk=2)
    with pytest.raises(ValueError, match=r"q has 4 heads and k 2: pass enable_gqa=True"):
        selfattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    with pytest.raises(TypeError, match=r"max_seqlen_q must be an int, got float"):
        selfattn.attention_varlen(q, k, v, cu_q, cu_k, 3.0, max_k)
