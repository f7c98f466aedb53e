"""Score modifications (softcap, ALiBi slopes, attention sinks) against an explicit float64 oracle.

The oracle is written here from the arguments' meaning (selfattn.attention's docstring), never from
the kernels' logic: explicit scores, softcap·tanh(s/softcap), the dense ALiBi bias built from
positions, the band / window / attn_mask as a dense mask, the sink appended as one more column,
softmax, then the sink column dropped; lse = logsumexp of the row with the sink. The same oracle at
the inputs' precision is the error yardstick (tests/common.py's rule, as tests/test_masks.py does
with eager).

The default run covers every pair of values of the axes (modifications x mask x GQA x dtype x head
dim x shape); SELFATTN_TEST_FULL_PRODUCT=1 runs their full product.
"""

from __future__ import annotations

import itertools
import math
import os
import random

import pytest
import torch

import selfattn
from tests.common import assert_close, gradient_terms
from tests.test_masks import band_visible

ops = torch.ops.selfattn
f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


# --- the oracle ------------------------------------------------------------------------------------

def oracle(q, k, v, sinks=None, *, scale, softcap=0.0, slopes=None, offset=0, visible=None, bias=None):
    """(out, lse, probs with the sink column) of the modified softmax, at q's precision. q (B, Hq,
    Nq, D), k, v (B, Hk, Nk, ·) repeated over the query heads; visible (bool) and bias (float)
    broadcast to (B, Hq, Nq, Nk); slopes (Hq,) or (B, Hq); sinks (Hq,)."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    group = h // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        distance = (torch.arange(nq).view(-1, 1) + offset - torch.arange(nk).view(1, -1)).abs().to(s.dtype)
        s = s - slopes.to(s.dtype).view(-1 if slopes.dim() == 2 else 1, h, 1, 1) * distance
    if bias is not None:
        s = s + bias.to(s.dtype)
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(1, h, 1, 1).expand(b, h, nq, 1)], -1)
    lse = torch.logsumexp(s, -1)
    probs = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return torch.matmul(probs[..., :nk], v), lse, probs


def dense(mask_kind, b, h, nq, nk, dtype):
    """(attn_mask to pass, causal, window, visible, bias, alibi offset) of a mask variant."""
    causal, window, attn_mask, bias = False, None, None, None
    if mask_kind == "causal":
        causal = True
    elif mask_kind == "bottom_right":
        causal = "bottom_right"
    elif mask_kind == "window":
        window = (17, 5)
    elif mask_kind == "bool mask":
        attn_mask = torch.rand(b, 1, nq, nk) > 0.3
    elif mask_kind == "float mask":
        attn_mask = torch.randn(b, h, nq, nk, dtype=f32 if dtype == f64 else dtype)
        bias = attn_mask.double()
    visible = band_visible(nq, nk, causal, window).expand(b, h, nq, nk)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    return attn_mask, causal, window, visible, bias, nk - nq if causal == "bottom_right" else 0


def make_mods(mods, b, h, dtype):
    """(softcap, alibi_slopes, sinks) of a modification set; the values reach the scores' range."""
    softcap = 2.0 if mods in ("softcap", "all") else 0.0
    slopes = None
    if mods in ("alibi (Hq,)", "all"):
        slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1) / h) * torch.rand(h) * 4  # geometric, jittered
    elif mods == "alibi (B, Hq)":
        slopes = torch.rand(b, h)
    # N(3, 2): e^sink from ~e^-1 to ~e^7, against a row sum of ~Nk·e^0.5 (unit-variance scores)
    sinks = 3 + torch.randn(h, dtype=dtype if dtype in (f64, f16) else f32) * 2 if mods in ("sinks", "all") else None
    return softcap, None if slopes is None else slopes.float(), sinks


def check(q, k, v, mods="all", mask_kind="none", scale=None, mask=None, grad_out_rows=None):
    """Output, lse and every gradient of selfattn.attention with the modifications ``mods`` against
    the float64 oracle, the oracle at q's dtype as the yardstick. Returns the actual values."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    attn_mask, causal, window, visible, bias, offset = mask or dense(mask_kind, b, h, nq, nk, q.dtype)
    softcap, slopes, sinks = make_mods(mods, b, h, q.dtype)
    grad_out = torch.randn(b, h, nq, v.shape[3], dtype=q.dtype)
    if grad_out_rows is not None:
        grad_out_rows(grad_out)
    kw = dict(scale=scale, softcap=softcap, slopes=slopes, offset=offset, visible=visible, bias=bias)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        if sinks is not None:
            leaves.append(sinks.detach().to(sinks.dtype if dtype == q.dtype else f64).requires_grad_(True))
        out, lse, probs = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
        return out.detach(), lse.detach(), [g.detach() for g in grads], probs

    def actual_fn(q_, k_, v_, sinks_=None):
        out = selfattn.attention(q_, k_, v_, attn_mask, scale=scale, causal=causal, window=window,
                                 enable_gqa=k.shape[1] != h, softcap=softcap, alibi_slopes=slopes, sinks=sinks_)
        ma = selfattn.masks.mask_args(attn_mask, causal, window, nq, nk)
        _, lse = ops.attention_fwd(*(t.detach() for t in (q_, k_, v_)), ma.causal, scale, ma.attn_mask,
                                   ma.window_left, ma.window_right, ma.diagonal_offset, softcap=softcap,
                                   alibi_slopes=slopes, sinks=None if sinks_ is None else sinks_.detach())
        return out, lse, None

    actual = run(actual_fn, q.dtype)
    expected = run(lambda *a: oracle(*a, **kw), f64)
    eager = run(lambda *a: oracle(*a, **kw), q.dtype)
    assert_close(actual[0], expected[0], eager[0], "out")
    seen = torch.isfinite(expected[1])  # a row that sees no key and no sink: lse -inf
    assert torch.equal(actual[1].isneginf(), ~seen), "lse: -inf where a row sees nothing, and only there"
    assert_close(actual[1][seen], expected[1][seen], eager[1][seen], "lse")
    terms = gradient_terms(q, k, v, grad_out, scale)
    if sinks is not None:  # sinks.grad sums -p_sink · rowsum(dO ∘ out) over the batch and rows
        row_terms = expected[3][..., -1] * (grad_out.double() * expected[0]).sum(-1)
        terms["grad_sinks"] = row_terms.abs().sum((0, 2)).max().item()
    for name, a, e, g in zip(("grad_q", "grad_k", "grad_v", "grad_sinks"), actual[2], expected[2], eager[2]):
        assert_close(a, e, g, name, terms[name])
    return actual


def inputs(b, hq, hk, nq, nk, d, dtype=f32, dv=None):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hk, nk, d, dtype=dtype),
            torch.randn(b, hk, nk, dv or d, dtype=dtype))


# --- the sweep: all pairs by default, the full product on request -----------------------------------

AXES = {
    "mods": ["softcap", "alibi (Hq,)", "alibi (B, Hq)", "sinks", "all"],
    "mask": ["none", "causal", "bottom_right", "window", "bool mask", "float mask"],
    "group": [1, 4],
    "dtype": [f32, bf16, f16, f64],
    "d": [1, 64, 96, 128, 200, 256],
    "shape": [(70, 130), (1, 200), (129, 129), (37, 100), (130, 70)],
}


def all_pairs(axes: dict, seed=0):
    """A small list of combinations covering every pair of values of every two axes (greedy: each
    row the candidate, of a sample, that covers the most pairs not yet covered)."""
    names, rng = list(axes), random.Random(seed)
    uncovered = {(a, x, b, y) for a, b in itertools.combinations(range(len(names)), 2)
                 for x in range(len(axes[names[a]])) for y in range(len(axes[names[b]]))}
    rows = []
    while uncovered:
        a, x, b, y = min(uncovered)
        best, best_gain = None, -1
        for _ in range(300):
            row = [rng.randrange(len(axes[n])) for n in names]
            row[a], row[b] = x, y
            gain = sum((i, row[i], j, row[j]) in uncovered for i, j in itertools.combinations(range(len(names)), 2))
            if gain > best_gain:
                best, best_gain = row, gain
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(names)), 2)}
        rows.append(tuple(axes[n][v] for n, v in zip(names, best)))
    return rows


COMBINATIONS = (list(itertools.product(*AXES.values())) if os.environ.get("SELFATTN_TEST_FULL_PRODUCT") == "1"
                else all_pairs(AXES))


@pytest.mark.parametrize("mods,mask_kind,group,dtype,d,shape", COMBINATIONS,
                         ids=["-".join(map(str, c)).replace(" ", "") for c in COMBINATIONS])
def test_against_oracle(mods, mask_kind, group, dtype, d, shape):
    nq, nk = shape
    check(*inputs(2, 4, 4 // group, nq, nk, d, dtype), mods, mask_kind)


@pytest.mark.parametrize("shape", [(37, 100), (130, 70), (1, 200)], ids=str)
@pytest.mark.parametrize("mods", ["alibi (Hq,)", "alibi (B, Hq)", "all"])
def test_alibi_follows_the_bottom_right_diagonal(mods, shape):
    """|i + Nk - Nq - j| under causal="bottom_right" with Nq != Nk (the all-pairs rows may pair
    ALiBi and bottom_right only where Nq = Nk, where the offset is 0)."""
    check(*inputs(2, 4, 2, *shape, 64), mods, "bottom_right")


def test_the_modifications_matter():
    """The inputs the sweep draws change the result: each modification moves out well past the
    tolerance (a kernel that ignored one would fail)."""
    q, k, v = inputs(2, 4, 4, 70, 130, 64, f64)
    scale = 64 ** -0.5
    plain = oracle(q, k, v, scale=scale)[0]
    for mods in AXES["mods"]:
        softcap, slopes, sinks = make_mods(mods, 2, 4, f64)
        changed = oracle(q, k, v, sinks, scale=scale, softcap=softcap, slopes=slopes)[0]
        assert (changed - plain).abs().max() > 0.01, mods  # float32 tolerates ~1e-6, bfloat16 ~1e-2 of 1


# --- gradcheck ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, "bottom_right"], ids=str)
@pytest.mark.parametrize("mods", AXES["mods"])
def test_gradcheck(mods, causal):
    q, k, v = (t.requires_grad_(True) for t in inputs(2, 2, 1, 4, 6, 3, f64))
    softcap, slopes, sinks = make_mods(mods, 2, 2, f64)
    softcap = softcap and 0.7  # small shapes: the scores must reach the cap
    sinks = (torch.randn(2, dtype=f64) if sinks is None else sinks - 3).requires_grad_(True)
    fn = lambda a, b, c, s: selfattn.attention(a, b, c, scale=1.5, causal=causal, enable_gqa=True, softcap=softcap,
                                               alibi_slopes=slopes, sinks=s if mods in ("sinks", "all") else None)
    assert torch.autograd.gradcheck(fn, (q, k, v, sinks))


# --- rows that see no key ------------------------------------------------------------------------

@pytest.mark.parametrize("mods", ["sinks", "all", "softcap", "alibi (B, Hq)"])
@pytest.mark.parametrize("case", ["bool rows all False", "bottom_right Nk < Nq"])
def test_rows_that_see_no_key(case, mods):
    b, h, nq, nk = 2, 4, 40, 30
    q, k, v = inputs(b, h, 2, nq, nk, 16)
    hidden = torch.zeros(b, h, nq, dtype=torch.bool)
    if case == "bool rows all False":
        attn_mask = torch.rand(b, h, nq, nk) > 0.3
        attn_mask[:, :, ::3] = False
        hidden[:, :, ::3] = True
        mask = (attn_mask, False, None, attn_mask, None, 0)
    else:  # the first Nq - Nk rows see nothing
        attn_mask = None
        hidden[:, :, : nq - nk] = True
        mask = (None, "bottom_right", None, band_visible(nq, nk, "bottom_right", None).expand(b, h, nq, nk),
                None, nk - nq)
    state = torch.get_rng_state()
    out, lse, grads, _ = check(q, k, v, mods, mask=mask)
    for t in (out, lse[~hidden], *grads):
        assert not torch.isnan(t).any()
    assert (out[hidden] == 0).all() and (grads[0][hidden] == 0).all()
    torch.set_rng_state(state)
    _, _, sinks = make_mods(mods, b, h, q.dtype)  # the sinks check drew
    torch.set_rng_state(state)  # the same sinks, slopes and grad_out again below
    if sinks is None:
        assert (lse[hidden] == -math.inf).all()
        return
    sink_rows = sinks.float().view(1, h, 1).expand(b, h, nq)
    assert (lse[hidden] == sink_rows[hidden]).all()
    # hidden rows contribute nothing to sinks.grad, whatever their grad_out
    loud = check(q, k, v, mods, mask=mask, grad_out_rows=lambda g: g.masked_fill_(hidden.unsqueeze(-1), 1e3))
    torch.testing.assert_close(loud[2][3], grads[3], rtol=1e-5, atol=1e-5)


# --- varlen and the fused layer ------------------------------------------------------------------

@pytest.mark.parametrize("mods", ["all", "alibi (B, Hq)", "sinks"])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"], ids=str)
def test_varlen_per_sequence(mods, causal):
    """torch.ops.selfattn.varlen_attention_fwd (selfattn.attention_varlen takes no score
    modification yet) with (S, Hq) slopes: each sequence as its own dense batch of 1."""
    lengths_q, lengths_k = [5, 0, 70, 33], [9, 4, 70, 65]
    hq, hk, d, scale = 4, 2, 32, 0.3
    cu_q, cu_k = (torch.tensor([0] + list(itertools.accumulate(n)), dtype=torch.int32) for n in (lengths_q, lengths_k))
    q, k, v = (torch.randn(n, h, d, dtype=f64, requires_grad=True)
               for n, h in ((sum(lengths_q), hq), (sum(lengths_k), hk), (sum(lengths_k), hk)))
    softcap, slopes, sinks = make_mods(mods, 4, hq, f64)  # "(B, Hq)" slopes: (S, Hq) here
    if sinks is not None:
        sinks.requires_grad_(True)
    out, lse = ops.varlen_attention_fwd(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal is not False,
                                        scale, bottom_right=causal == "bottom_right", softcap=softcap,
                                        alibi_slopes=slopes, sinks=sinks)
    grad_out = torch.randn_like(out)
    leaves = [t for t in (q, k, v, sinks) if t is not None]
    actual = torch.autograd.grad(out, leaves, grad_out)
    expected_out, expected_lse = [], []
    per_sequence = slopes is not None and slopes.dim() == 2
    for s, (nq, nk) in enumerate(zip(lengths_q, lengths_k)):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        o, l, _ = oracle(*(t[part].transpose(0, 1)[None] for t, part in ((q, rows), (k, keys), (v, keys))), sinks,
                         scale=scale, softcap=softcap, slopes=slopes[s] if per_sequence else slopes,
                         offset=nk - nq if causal == "bottom_right" else 0,
                         visible=band_visible(nq, nk, causal, None))
        expected_out.append(o[0].transpose(0, 1))
        expected_lse.append(l[0])
    expected_out = torch.cat(expected_out)
    expected = torch.autograd.grad(expected_out, leaves, grad_out)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, torch.cat(expected_lse, 1))
    for name, a, e in zip(("grad_q", "grad_k", "grad_v", "grad_sinks"), actual, expected):
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mods", ["all", "alibi (B, Hq)", "sinks"])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_fused_layer(mods, num_kv_heads):
    """selfattn.self_attention against F.linear + the oracle, float64, causal, B = 2."""
    b, n, e, h, d = 2, 45, 24, 4, 16
    x = torch.randn(b, n, e, dtype=f64, requires_grad=True)
    w = (torch.randn((h + 2 * num_kv_heads) * d, e, dtype=f64) / e ** 0.5).requires_grad_(True)
    bias = torch.randn((h + 2 * num_kv_heads) * d, dtype=f64, requires_grad=True)
    softcap, slopes, sinks = make_mods(mods, b, h, f64)
    leaves = [x, w, bias] + ([sinks.requires_grad_(True)] if sinks is not None else [])
    out = selfattn.self_attention(x, w, bias, num_heads=h, num_kv_heads=num_kv_heads, causal=True, softcap=softcap,
                                  alibi_slopes=slopes, sinks=sinks)
    qkv = torch.nn.functional.linear(x, w, bias).view(b, n, h + 2 * num_kv_heads, d).transpose(1, 2)
    q, k, v = qkv.split([h, num_kv_heads, num_kv_heads], 1)
    expected = oracle(q, k, v, sinks, scale=d ** -0.5, softcap=softcap, slopes=slopes,
                      visible=band_visible(n, n, True, None))[0].transpose(1, 2).reshape(b, n, h * d)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    for name, a, e in zip(("x", "w", "b", "sinks"), torch.autograd.grad(out, leaves, grad_out),
                          torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(a, e, msg=lambda m: f"grad of {name}: {m}")
