"""Dropout: the keep mask (selfattn.dropout_mask, Philox) and the kernels that apply it.

The oracle is eager float64 attention given a keep mask — softmax(scale · q kᵀ + mask) ∘ keep /
(1 - p) @ v — with the mask from selfattn.dropout_mask, whose Philox is checked on its own against
Random123's known answers and whose statistics against the binomial. The kernels' own masking is
never the reference: the kernel is also checked statistically without the Python mask (the kept
counts a uniform softmax reveals).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import selfattn
from selfattn import rng
from tests.common import assert_close, make_tensor

ops = torch.ops.selfattn


def state(seed: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64)


def eager_dropout_attention(q, k, v, keep, dropout_p, scale, dense_mask=None, group=1):
    """softmax(scale · q kᵀ + dense_mask) ∘ keep / (1 - p) @ v at the inputs' precision; dense_mask
    bool (True = take part) of (…, Nq, Nk); k, v repeated over the group (GQA)."""
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if dense_mask is not None:
        scores = scores.masked_fill(~dense_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing: 0
    return torch.matmul(probs * keep.to(probs.dtype) / (1 - dropout_p), v)


# --- the mask itself ------------------------------------------------------------------------------

KAT = [  # Random123's kat_vectors for philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(rng.philox4x32_10(counter, key)) == expected
    # The same numbers through int64 tensors (products wrap in int64; their low 64 bits are exact).
    words = rng.philox4x32_10([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def binomial_bound(n: int, p_keep: float, sigmas: float = 6.0) -> float:
    """Half-width of a 6-sigma interval of a Binomial(n, p_keep) count (chance of a false failure
    below 2e-9 per check)."""
    return sigmas * math.sqrt(n * p_keep * (1 - p_keep)) + 1


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_mask_kept_fraction(dropout_p):
    mask = selfattn.dropout_mask(state(1234, 5), (2, 3, 64, 257), dropout_p)
    assert mask.dtype == torch.bool and mask.shape == (2, 3, 64, 257)
    n, p_keep = mask.numel(), 1 - dropout_p
    assert abs(mask.sum().item() - n * p_keep) <= binomial_bound(n, p_keep)
    # Each of the 4 words of a Philox call, and each batch entry, head and row, keeps its share.
    for part in [mask[..., r::4] for r in range(4)] + [mask[b, h] for b in range(2) for h in range(3)]:
        assert abs(part.sum().item() - part.numel() * p_keep) <= binomial_bound(part.numel(), p_keep)


def test_mask_is_a_function_of_the_indices():
    """Element (b, h, i, j) does not depend on the shape it is part of; (seed, offset) change it."""
    big = selfattn.dropout_mask(state(9, 2), (3, 4, 40, 70), 0.5)
    assert torch.equal(selfattn.dropout_mask(state(9, 2), (2, 3, 17, 33), 0.5), big[:2, :3, :17, :33])
    for other in (state(9, 3), state(10, 2), state(9 + 2**40, 2), state(9, 2 + 2**40)):
        agree = (selfattn.dropout_mask(other, (3, 4, 40, 70), 0.5) == big).float().mean().item()
        assert 0.45 < agree < 0.55  # unrelated masks agree on about half the elements


def test_mask_threshold_edges():
    assert not selfattn.dropout_mask(state(3), (1, 1, 8, 64), 0.0).logical_not().any()
    assert rng.dropout_threshold(0.999999999999) == 0xFFFFFFFF


# --- the kernels against the eager computation with the same mask ----------------------------------

CASES = {  # name: (B, Hq, Hk, Nq, Nk, D, Dv, causal, mask builder or None)
    "plain": (2, 2, 2, 70, 90, 16, 8, False, None),
    "causal": (1, 3, 3, 77, 77, 32, 32, True, None),
    "bottom_right": (1, 2, 2, 20, 133, 16, 16, "bottom_right", None),
    "gqa": (2, 4, 2, 40, 66, 8, 12, False, None),
    # Few query rows against a long cache: the shape the CPU's decode (split-K) path takes without dropout.
    "decode": (1, 8, 2, 2, 700, 16, 16, "bottom_right", None),
    "bool_mask": (2, 2, 2, 65, 70, 16, 16, False, lambda b, h, nq, nk: torch.rand(b, 1, nq, nk) > 0.3),
    "key_padding": (3, 2, 2, 33, 48, 16, 16, False,
                    lambda b, h, nq, nk: torch.arange(nk)[None, None, None, :] < torch.tensor([48, 20, 1])[:, None, None, None]),
}


def dense_band(case, nq, nk, b, h):
    causal = case[7]
    if not causal:
        return None
    offset = nk - nq if causal == "bottom_right" else 0
    return (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + offset).expand(b, h, nq, nk)


def run_case(name, dtype, dropout_p=0.3, seed=7):
    batch, heads, heads_kv, nq, nk, dim, dim_v, causal, build_mask = CASES[name]
    q = make_tensor((batch, heads, nq, dim), dtype)
    k = make_tensor((batch, heads_kv, nk, dim), dtype)
    v = make_tensor((batch, heads_kv, nk, dim_v), dtype)
    attn_mask = build_mask(batch, heads, nq, nk) if build_mask else None
    rng_state = state(seed, 11)
    keep = selfattn.dropout_mask(rng_state, (batch, heads, nq, nk), dropout_p)
    dense = dense_band(CASES[name], nq, nk, batch, heads)
    if attn_mask is not None:
        dense = attn_mask.expand(batch, heads, nq, nk) if dense is None else dense & attn_mask
    scale = dim ** -0.5
    grad_out = make_tensor((batch, heads, nq, dim_v), dtype)

    def ours(q, k, v):
        return selfattn.attention(q, k, v, attn_mask, dropout_p, scale=scale, causal=causal,
                                  enable_gqa=heads != heads_kv, rng_state=rng_state)

    def eager(q, k, v):
        return eager_dropout_attention(q, k, v, keep, dropout_p, scale, dense, heads // heads_kv)

    results = {}
    for fn, ins in ((ours, (q, k, v)), (eager, (q, k, v)), (eager, tuple(t.double() for t in (q, k, v)))):
        leaves = [t.detach().clone().requires_grad_(True) for t in ins]
        out = fn(*leaves)
        results.setdefault(fn.__name__, []).append((out.detach(), torch.autograd.grad(out, leaves, grad_out.to(out.dtype))))
    (out, grads), = results["ours"]
    (eager_out, eager_grads), (out64, grads64) = results["eager"]
    assert_close(out, out64, eager_out, f"{name} out")
    for g, g64, ge, n in zip(grads, grads64, eager_grads, ("dq", "dk", "dv")):
        assert_close(g, g64, ge, f"{name} {n}")


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_eager_with_the_same_mask(name):
    run_case(name, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_attention_dtypes(dtype):
    run_case("causal", dtype, dropout_p=0.2)


def test_high_drop_rate():
    run_case("plain", torch.float32, dropout_p=0.9, seed=3)


def test_gradcheck_with_dropout():
    q, k, v = (make_tensor((1, 2, n, 6), torch.float64, requires_grad=True) for n in (9, 11, 11))
    rng_state = state(5, 1)
    assert torch.autograd.gradcheck(
        lambda q, k, v: selfattn.attention(q, k, v, dropout_p=0.4, causal=True, rng_state=rng_state), (q, k, v))


def test_kernel_scaling_statistically():
    """Without the Python mask: scale 0 makes the softmax uniform, so with v = 1 each output row is
    (its kept count) / (Nk (1 - p)): the kept counts must be integers that sum to a binomial's
    range, and the mean output must be 1."""
    batch, heads, nq, nk, p = 2, 4, 64, 200, 0.25
    q, k = make_tensor((batch, heads, nq, 8), torch.float64), make_tensor((batch, heads, nk, 8), torch.float64)
    v = torch.ones(batch, heads, nk, 1, dtype=torch.float64)
    out = selfattn.attention(q, k, v, dropout_p=p, scale=0.0)
    counts = out[..., 0] * nk * (1 - p)
    assert torch.allclose(counts, counts.round(), atol=1e-9)
    n = batch * heads * nq * nk
    assert abs(counts.sum().item() - n * (1 - p)) <= binomial_bound(n, 1 - p)


# --- variants: varlen, the fused layer and the module ---------------------------------------------

def test_varlen_matches_eager_per_sequence():
    lengths_q, lengths_k = [5, 0, 70, 33], [9, 4, 70, 1]
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), 2, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(int(cu_k[-1]), 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(int(cu_k[-1]), 2, 8, dtype=torch.float64, requires_grad=True)
    rng_state, p = state(21, 4), 0.35
    out = selfattn.attention_varlen(q, k, v, cu_q, cu_k, 70, 70, causal=True, dropout_p=p, rng_state=rng_state)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    keep = selfattn.dropout_mask(rng_state, (4, 2, 70, 70), p)
    parts = []
    for s in range(4):
        rows, keys = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        nq, nk = lengths_q[s], lengths_k[s]
        band = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None]
        qs, ks, vs = (t[idx].transpose(0, 1)[None] for t, idx in ((q, rows), (k, keys), (v, keys)))
        parts.append(eager_dropout_attention(qs, ks, vs, keep[s:s + 1, :, :nq, :nk], p, 16 ** -0.5, band)[0]
                     .transpose(0, 1))
    expected = torch.cat(parts)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_fused_layer_matches_eager():
    batch, seq, embed, heads, kv_heads, dim, p = 2, 37, 24, 4, 2, 8, 0.3
    x = torch.randn(batch, seq, embed, dtype=torch.float64, requires_grad=True)
    w = torch.randn((heads + 2 * kv_heads) * dim, embed, dtype=torch.float64, requires_grad=True)
    rng_state = state(8, 8)
    out = selfattn.self_attention(x, w, num_heads=heads, num_kv_heads=kv_heads, causal=True, dropout_p=p,
                                  rng_state=rng_state)
    qkv = F.linear(x, w).view(batch, seq, heads + 2 * kv_heads, dim).transpose(1, 2)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    band = torch.ones(seq, seq, dtype=torch.bool).tril()
    keep = selfattn.dropout_mask(rng_state, (batch, heads, seq, seq), p)
    expected = eager_dropout_attention(q, k, v, keep, p, dim ** -0.5, band, heads // kv_heads)
    expected = expected.transpose(1, 2).reshape(batch, seq, heads * dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (x, w), grad_out), torch.autograd.grad(expected, (x, w), grad_out)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-11)


def test_module_dropout_in_training_only():
    layer = selfattn.SelfAttention(16, 16, num_heads=2, dropout=0.25).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.manual_seed(3)
    trained = layer(x)
    torch.manual_seed(3)
    drawn = rng.draw_rng_state("cpu")
    expected = selfattn.self_attention(x, layer.in_proj_weight, num_heads=2, dropout_p=0.25, rng_state=drawn)
    assert torch.equal(trained, expected)
    layer.eval()
    before = torch.get_rng_state()
    evaluated = layer(x)
    assert torch.equal(torch.get_rng_state(), before), "eval mode drew random numbers"
    assert torch.equal(evaluated, selfattn.self_attention(x, layer.in_proj_weight, num_heads=2))
    assert not torch.equal(evaluated, trained)


def test_p_zero_takes_the_dropout_free_path():
    q, k, v = (make_tensor((2, 2, 30, 16), torch.float32) for _ in range(3))
    before = torch.get_rng_state()
    out = selfattn.attention(q, k, v, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), before), "p = 0 drew random numbers"
    assert torch.equal(out, selfattn.attention(q, k, v))
    layer = selfattn.SelfAttention(8, 8, 2, dropout=0.0)  # training mode, p = 0
    x = torch.randn(1, 3, 8)
    before = torch.get_rng_state()
    out = layer(x)
    assert torch.equal(torch.get_rng_state(), before), "a module with dropout 0 drew random numbers"
    assert torch.equal(out, selfattn.self_attention(x, layer.in_proj_weight, num_heads=2))


# --- randomness: seeds, compile, checkpoint, threads -----------------------------------------------

def inputs(requires_grad=False):
    return [make_tensor((2, 3, 70, 32), torch.float32, requires_grad=requires_grad) for _ in range(3)]


def test_same_seed_same_output_and_two_calls_differ():
    q, k, v = inputs()
    torch.manual_seed(0)
    first, second = selfattn.attention(q, k, v, dropout_p=0.5), selfattn.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    again = selfattn.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_two_calls_in_one_compiled_function_differ(backend):
    torch._dynamo.reset()

    def two(q, k, v):
        return selfattn.attention(q, k, v, dropout_p=0.5), selfattn.attention(q, k, v, dropout_p=0.5)

    q, k, v = inputs()
    first, second = torch.compile(two, fullgraph=True, backend=backend)(q, k, v)
    assert not torch.equal(first, second)
    # Each is one draw of the same dropout: its mean over many rows is the dropout-free output's.
    plain = selfattn.attention(q, k, v)
    assert (first - plain).abs().mean() < 1.0 and (second - plain).abs().mean() < 1.0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputes_the_same_mask(use_reentrant):
    q, k, v = inputs(requires_grad=True)
    grad_out = torch.randn(2, 3, 70, 32)

    def block(q, k, v):
        return selfattn.attention(q, k, v, dropout_p=0.4, causal=True) * 2

    def grads_of(out):  # .backward(): the reentrant checkpoint refuses autograd.grad
        for t in (q, k, v):
            t.grad = None
        out.backward(grad_out)
        return [t.grad.clone() for t in (q, k, v)]

    torch.manual_seed(11)
    out = block(q, k, v)
    expected = grads_of(out)
    torch.manual_seed(11)
    out_ckpt = torch.utils.checkpoint.checkpoint(block, q, k, v, use_reentrant=use_reentrant)
    assert torch.equal(out, out_ckpt)
    torch.manual_seed(99)  # the recompute must not depend on the generator's state by then
    for g, e in zip(grads_of(out_ckpt), expected):
        assert torch.equal(g, e)


def test_thread_count_does_not_change_results():
    q, k, v = inputs(requires_grad=True)
    grad_out = torch.randn(2, 3, 70, 32)
    rng_state = state(17, 3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = selfattn.attention(q, k, v, dropout_p=0.3, rng_state=rng_state, causal=True)
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_vmap_gives_each_sample_its_own_call():
    q, k, v = (torch.randn(3, 2, 2, 20, 8) for _ in range(3))  # 3 samples of (2, 2, 20, 8)
    rng_state = state(4, 4)
    fn = lambda q, k, v: selfattn.attention(q, k, v, dropout_p=0.3, rng_state=rng_state)  # noqa: E731
    batched = torch.vmap(fn)(q, k, v)
    for i in range(3):
        assert torch.equal(batched[i], fn(q[i], k[i], v[i]))


# --- the ops as PyTorch sees them ------------------------------------------------------------------

def test_opcheck_with_dropout():
    q, k, v = (make_tensor((2, 2, 19, 16), torch.float32, requires_grad=True) for _ in range(3))
    rng_state = state(1, 2)
    args = (q, k, v, True, 0.25, None, -1, -1, 0, 0.2, rng_state)
    torch.library.opcheck(ops.attention_fwd, args)
    out, lse = ops.attention_fwd(*args)
    torch.library.opcheck(ops.attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                              out.detach(), lse, True, 0.25, None, -1, -1, 0, 0.2, rng_state))
    x = torch.randn(2, 11, 12, requires_grad=True)
    w = torch.randn(24, 12, requires_grad=True)
    layer_args = (x, w, None, 2, False, 0.5, 0, None, -1, -1, 0.2, rng_state)
    torch.library.opcheck(ops.self_attention_fwd, layer_args)
    out, qkv, lse = ops.self_attention_fwd(*layer_args)
    torch.library.opcheck(ops.self_attention_bwd, (torch.randn_like(out), x.detach(), w.detach(), qkv, out.detach(),
                                                   lse, 2, False, 0.5, [True, True, False, False], 0, None, -1, -1, 0.2,
                                                   rng_state))
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    qv, kv, vv = (torch.randn(19, 2, 8, requires_grad=True) for _ in range(3))
    varlen_args = (qv, kv, vv, cu, cu, 12, 12, True, 0.3, -1, -1, False, 0.2, rng_state)
    torch.library.opcheck(ops.varlen_attention_fwd, varlen_args)
    out, lse = ops.varlen_attention_fwd(*varlen_args)
    torch.library.opcheck(ops.varlen_attention_bwd, (torch.randn_like(out), qv.detach(), kv.detach(), vv.detach(),
                                                     out.detach(), lse, cu, cu, 12, 12, True, 0.3, -1, -1, False,
                                                     0.2, rng_state))
