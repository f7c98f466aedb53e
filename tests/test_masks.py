"""Masks, windows, causal alignments and grouped-query attention against an explicit softmax.

The oracle builds the dense (B, Hq, Nq, Nk) mask itself from the arguments' meaning
(../shared/CONTRACT.md) — never from the kernels' own mask logic — repeats k and v over the query
heads, and computes in float64 (the expected values) and at the inputs' precision (eager's error,
for the tolerance rule of tests/common.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import selfattn
from tests.common import ALL_DTYPES, assert_close, gradient_terms

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

ops = torch.ops.selfattn


def band_visible(nq, nk, causal, window):
    """(Nq, Nk) bool: which keys each query sees under causal ∈ {False, True, "bottom_right"} and
    window (left, right) or None, as CONTRACT.md defines them."""
    offset = nk - nq if causal == "bottom_right" else 0
    left, right = window if window is not None else (-1, -1)
    left = math.inf if left < 0 else left
    right = math.inf if right < 0 else right
    if causal:
        right = min(right, 0)
    i = torch.arange(nq).view(-1, 1) + offset
    j = torch.arange(nk).view(1, -1)
    return (j >= i - left) & (j <= i + right)


def explicit_attention(q, k, v, scale, visible, bias=None):
    """softmax(scale · q kᵀ + bias) v over the visible pairs, at q's precision; k, v repeated over
    the groups of query heads. A row with no visible key gives 0 (as CONTRACT.md asks).
    Returns (out, lse)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~visible, -math.inf)
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    # weights are 0 on a row that sees nothing; dividing by 1 there keeps its gradient finite too
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    lse = torch.where(total > 0, row_max + torch.log(total), torch.full_like(total, -math.inf)).squeeze(-1)
    return torch.matmul(probs, v), lse


def dense_mask(attn_mask, shape):
    """(visible, bias) of a tensor mask, broadcast to shape by plain PyTorch."""
    if attn_mask is None:
        return torch.ones(shape, dtype=torch.bool), None
    full = attn_mask.expand(shape) if attn_mask.dim() == 4 else attn_mask.broadcast_to(shape)
    if full.dtype == torch.bool:
        return full, None
    return torch.ones(shape, dtype=torch.bool), full.double()


def check_against_oracle(q, k, v, *, attn_mask=None, causal=False, window=None, scale=0.37, enable_gqa=None):
    """selfattn.attention's output and gradients against the float64 oracle, with eager at the
    inputs' precision as the yardstick."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    enable_gqa = k.shape[1] != hq if enable_gqa is None else enable_gqa
    visible, bias = dense_mask(attn_mask, (b, hq, nq, nk))
    visible = visible & band_visible(nq, nk, causal, window)
    grad_out = torch.randn(b, hq, nq, v.shape[3], dtype=q.dtype)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype)) if out.numel() else [torch.zeros_like(t) for t in leaves]
        return out.detach(), grads

    actual = run(lambda q_, k_, v_: selfattn.attention(q_, k_, v_, attn_mask, scale=scale, causal=causal,
                                                      window=window, enable_gqa=enable_gqa), q.dtype)
    oracle = lambda q_, k_, v_: explicit_attention(q_, k_, v_, scale, visible, bias)[0]
    expected = run(oracle, torch.float64)
    eager = run(oracle, q.dtype)
    assert_close(actual[0], expected[0], eager[0], "out")
    terms = gradient_terms(q, k, v, grad_out, scale)
    for name, a, e, g in zip(("grad_q", "grad_k", "grad_v"), actual[1], expected[1], eager[1]):
        assert_close(a, e, g, name, terms[name])
    return actual


def inputs(b, hq, hk, nq, nk, d, dtype=torch.float32, dv=None):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hk, nk, d, dtype=dtype),
            torch.randn(b, hk, nk, dv or d, dtype=dtype))


# --- the band: causal alignments, windows, Nq != Nk ------------------------------------------------

@pytest.mark.parametrize("nq,nk", [(70, 130), (130, 70), (64, 64), (1, 200), (150, 3)])
@pytest.mark.parametrize("window", [None, (3, -1), (-1, 5), (40, 0), (200, 200), (1, 0)], ids=str)
@pytest.mark.parametrize("causal", [False, True, "bottom_right"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_band(causal, window, nq, nk, dtype):
    check_against_oracle(*inputs(1, 2, 2, nq, nk, 16, dtype), causal=causal, window=window)


# --- tensor masks ------------------------------------------------------------------------------------

def make_mask(kind, b, h, nq, nk, dtype):
    """A mask of one of the shapes and layouts users pass."""
    float_dtype = torch.float32 if dtype == torch.float64 else dtype
    if kind == "bool full":
        return torch.rand(b, h, nq, nk) > 0.3
    if kind == "float full":
        return torch.randn(b, h, nq, nk, dtype=float_dtype)
    if kind == "key padding":  # (B, 1, 1, Nk): lengths drawn at random, padding on the right
        lengths = torch.randint(1, nk + 1, (b,))
        return (torch.arange(nk).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1))
    if kind == "left padding":
        lengths = torch.randint(1, nk + 1, (b,))
        return (torch.arange(nk).view(1, 1, 1, -1) >= (nk - lengths).view(-1, 1, 1, 1))
    if kind == "float (1, 1, Nq, Nk)":
        return torch.randn(1, 1, nq, nk, dtype=float_dtype)
    if kind == "2-D bool":
        return torch.rand(nq, nk) > 0.5
    if kind == "expanded":  # HF builds masks with .expand(): stride 0 on the broadcast dims
        return (torch.rand(b, 1, 1, nk) > 0.2).expand(b, h, nq, nk)
    if kind == "non-contiguous":
        return (torch.rand(b, h, nk, nq) > 0.4).transpose(2, 3)
    if kind == "float -inf blocks":
        mask = torch.zeros(b, h, nq, nk, dtype=float_dtype)
        mask[..., : nk // 2] = -math.inf
        return mask
    raise ValueError(kind)


MASK_KINDS = ["bool full", "float full", "key padding", "left padding", "float (1, 1, Nq, Nk)", "2-D bool",
              "expanded", "non-contiguous", "float -inf blocks"]


@pytest.mark.parametrize("causal", [False, True], ids=str)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_tensor_masks(kind, causal):
    q, k, v = inputs(2, 2, 2, 75, 140, 16)
    check_against_oracle(q, k, v, attn_mask=make_mask(kind, 2, 2, 75, 140, q.dtype), causal=causal)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool full", "float full", "key padding"])
def test_tensor_masks_every_dtype(kind, dtype):
    q, k, v = inputs(2, 2, 2, 70, 90, 32, dtype)
    check_against_oracle(q, k, v, attn_mask=make_mask(kind, 2, 2, 70, 90, dtype), causal="bottom_right",
                         window=(50, -1))


def test_matches_sdpa_with_the_same_mask():
    """A second oracle for one case: SDPA's math backend in float64, given the same bool mask."""
    q, k, v = inputs(2, 4, 4, 50, 80, 16, torch.float64)
    mask = make_mask("bool full", 2, 4, 50, 80, torch.float64)
    mask[..., 0] = True  # SDPA's math gives NaN for a fully hidden row
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(selfattn.attention(q, k, v, mask), expected)


def test_sdpa_style_3d_inputs_take_a_3d_mask():
    q, k, v = (torch.randn(3, 20, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(3, 20, 20) > 0.3
    mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(selfattn.attention(q, k, v, mask), expected)


# --- grouped-query attention -------------------------------------------------------------------------

@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (8, 2), (8, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gqa(hq, hk, dtype):
    q, k, v = inputs(2, hq, hk, 70, 100, 16, dtype)
    check_against_oracle(q, k, v, causal=True, attn_mask=make_mask("key padding", 2, hq, 70, 100, dtype))


def test_gqa_equals_repeated_kv():
    """Sharing a kv head costs nothing in accuracy: the same numbers as k, v repeated in memory."""
    q, k, v = inputs(1, 8, 2, 130, 130, 16, torch.float64)
    shared = check_against_oracle(q, k, v, causal=True)
    repeated = [t.repeat_interleave(4, 1).requires_grad_(True) for t in (k, v)]
    out = selfattn.attention(q, *repeated, causal=True, scale=0.37)
    torch.testing.assert_close(shared[0], out.detach())


@pytest.mark.parametrize("threads", [1, 4])
def test_window_gqa_backward_over_split_keys(threads):
    """The CPU backward packs each query block (q, dO, lse, delta) when a tile first needs it, per
    query head: a narrow window over several key blocks, three query heads per kv head, and (at 4
    threads) one kv head split over work items, each meeting other query blocks."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = inputs(1, 3, 1, 300, 333, 16, torch.float64)
        check_against_oracle(q, k, v, causal="bottom_right", window=(40, 0))
        check_against_oracle(q, k, v, window=(5, 70))
    finally:
        torch.set_num_threads(previous)


def test_gqa_needs_the_flag():
    q, k, v = inputs(1, 4, 2, 5, 5, 8)
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        selfattn.attention(q, k, v)


# --- rows that see nothing ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["all False", "all -inf", "bottom_right Nk < Nq", "window past the keys"])
def test_rows_that_see_no_key(case):
    q, k, v = inputs(2, 2, 2, 40, 30, 16)
    kwargs = {}
    hidden_rows = torch.zeros(2, 2, 40, dtype=torch.bool)
    if case == "all False":
        mask = torch.rand(2, 2, 40, 30) > 0.3
        mask[:, :, ::3] = False
        hidden_rows[:, :, ::3] = True
        kwargs = dict(attn_mask=mask)
    elif case == "all -inf":
        mask = torch.randn(2, 2, 40, 30)
        mask[0, 1, 5:9] = -math.inf
        hidden_rows[0, 1, 5:9] = True
        kwargs = dict(attn_mask=mask)
    elif case == "bottom_right Nk < Nq":  # the first Nq - Nk = 10 rows see nothing
        kwargs = dict(causal="bottom_right")
        hidden_rows[:, :, :10] = True
    else:  # a band offset so that the last rows' windows lie past the last key
        q, k, v = inputs(2, 2, 2, 40, 30, 16)
        kwargs = dict(window=(0, -1))
        hidden_rows[:, :, 30:] = True
    out, grads = check_against_oracle(q, k, v, **kwargs)
    assert (out[hidden_rows] == 0).all()
    assert (grads[0][hidden_rows] == 0).all()
    args = dict(kwargs)
    mask_args = selfattn.masks.mask_args(args.pop("attn_mask", None), args.pop("causal", False),
                                         args.pop("window", None), 40, 30)
    _, lse = ops.attention_fwd(q, k, v, mask_args.causal, 0.37, mask_args.attn_mask, mask_args.window_left,
                               mask_args.window_right, mask_args.diagonal_offset)
    assert (lse[hidden_rows] == -math.inf).all() and torch.isfinite(lse[~hidden_rows]).all()


@pytest.mark.parametrize("variant", ["causal", "bottom_right", "window", "bool mask", "float mask", "gqa"])
def test_gradcheck(variant):
    hk = 1 if variant == "gqa" else 2
    q, k, v = (t.requires_grad_(True) for t in inputs(1, 2, hk, 9, 7, 4, torch.float64))
    kwargs = {"causal": dict(causal=True), "bottom_right": dict(causal="bottom_right"),
              "window": dict(window=(2, 1)), "bool mask": dict(attn_mask=torch.rand(1, 2, 9, 7) > 0.3),
              "float mask": dict(attn_mask=torch.randn(1, 1, 9, 7, dtype=torch.float64)),
              "gqa": dict(enable_gqa=True, causal=True)}[variant]
    assert torch.autograd.gradcheck(lambda a, b, c: selfattn.attention(a, b, c, **kwargs), (q, k, v))


@pytest.mark.parametrize("b,nq,nk", [(0, 5, 5), (2, 0, 5), (2, 5, 0)])
@pytest.mark.parametrize("variant", ["bottom_right", "window", "mask", "gqa"])
def test_empty(b, nq, nk, variant):
    hk = 1 if variant == "gqa" else 2
    q, k, v = (t.requires_grad_(True) for t in inputs(b, 2, hk, nq, nk, 8))
    kwargs = {"bottom_right": dict(causal="bottom_right"), "window": dict(window=(1, 1)),
              "mask": dict(attn_mask=torch.ones(b, 1, nq, nk, dtype=torch.bool)), "gqa": dict(enable_gqa=True)}[variant]
    out = selfattn.attention(q, k, v, **kwargs)
    assert out.shape == (b, 2, nq, 8) and (out == 0).all()
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


# --- autograd, autocast, compile ------------------------------------------------------------------

def test_mask_requiring_grad_is_refused():
    q, k, v = (t.requires_grad_(True) for t in inputs(1, 1, 1, 4, 4, 8))
    mask = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask requires grad"):
        selfattn.attention(q, k, v, mask)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.bool], ids=str)
def test_autocast_keeps_float32_masks_and_casts_others(mask_dtype):
    q, k, v = inputs(1, 2, 2, 30, 30, 16)
    mask = torch.randn(1, 1, 30, 30).to(mask_dtype) if mask_dtype != torch.bool else torch.rand(30, 30) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selfattn.attention(q, k, v, mask.expand(1, 1, 30, 30) if mask.dim() == 4 else mask)
    assert out.dtype == torch.bfloat16
    visible, bias = dense_mask(mask if mask.dim() == 4 else mask.view(1, 1, 30, 30), (1, 2, 30, 30))
    expected = explicit_attention(*(t.double() for t in (q, k, v)), 16 ** -0.5, visible, bias)[0]
    eager = explicit_attention(*(t.bfloat16() for t in (q, k, v)), 16 ** -0.5, visible,
                               None if bias is None else bias.bfloat16())[0]
    assert_close(out, expected, eager, "out")


@pytest.mark.parametrize("bias, causal", [(causal_upper_left, True), (causal_lower_right, "bottom_right")])
def test_causal_bias_objects(bias, causal):
    q, k, v = inputs(1, 2, 2, 20, 50, 16, torch.float64)
    expected = selfattn.attention(q, k, v, causal=causal)
    torch.testing.assert_close(selfattn.attention(q, k, v, bias(20, 50)), expected)
    # Passed in (dynamo cannot construct the bias object inside a graph, for SDPA either).
    compiled = torch.compile(lambda a, b, c, m: selfattn.attention(a, b, c, m), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, bias(20, 50)), expected)


def test_compile_with_a_tensor_mask_and_window():
    q, k, v = inputs(2, 4, 2, 40, 40, 16)
    mask = make_mask("expanded", 2, 4, 40, 40, q.dtype)
    fn = lambda a, b, c, m: selfattn.attention(a, b, c, m, enable_gqa=True, causal=True, window=(10, 0))
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v, mask), fn(q, k, v, mask))
