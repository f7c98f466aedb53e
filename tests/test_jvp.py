"""Forward-mode AD (jvp) through the attention_jvp kernel, against torch.func.jvp of an explicit
float64 softmax with the dense mask built here (never the kernel's own mask logic), over the
variant grid: causal top-left and bottom-right, sliding windows, bool and float masks, GQA,
Nq != Nk, rows that see no key, several 64-wide blocks each way; then the entry points
(forward_ad dual tensors, jacfwd against jacrev, the fused layer), opcheck, and the refusals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import selfattn
from tests.common import assert_close

f64 = torch.float64
ops = torch.ops.selfattn


@dataclass
class Variant:
    name: str
    nq: int
    nk: int
    heads_kv: int = 2          # of 4 query heads
    causal: bool = False
    window: tuple = (-1, -1)
    offset: int = 0            # the band's diagonal offset (Nk - Nq: bottom-right)
    mask: Optional[str] = None  # "bool", "float", "bool-empty-rows"


VARIANTS = [
    Variant("plain", 70, 130),
    Variant("causal-top-left", 130, 70, causal=True),
    Variant("causal-bottom-right", 67, 150, causal=True, offset=150 - 67),
    Variant("bottom-right-Nk<Nq-empty-rows", 90, 20, causal=True, offset=20 - 90),
    Variant("window", 140, 140, window=(20, 5)),
    Variant("window-causal", 100, 100, causal=True, window=(30, -1)),
    Variant("bool-mask-gqa", 70, 75, heads_kv=1, mask="bool"),
    Variant("float-mask", 65, 70, heads_kv=4, mask="float"),
    Variant("bool-mask-empty-rows-causal", 70, 70, causal=True, mask="bool-empty-rows"),
]


def make_mask(variant: Variant, batch: int, heads: int):
    """The op's attn_mask (broadcast over heads, stride 0) and the dense visibility it means, plus
    the dense additive bias: (mask or None, visible (B, H, Nq, Nk) bool, bias float64)."""
    nq, nk = variant.nq, variant.nk
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    left, right = variant.window
    visible = torch.ones(nq, nk, dtype=torch.bool)
    if variant.causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        visible &= j >= i + variant.offset - left
    if right >= 0:
        visible &= j <= i + variant.offset + right
    visible = visible.expand(batch, heads, nq, nk)
    bias = torch.zeros(batch, heads, nq, nk, dtype=f64)
    mask = None
    if variant.mask is not None:
        allowed = torch.rand(batch, 1, nq, nk) < 0.7
        if variant.mask == "bool-empty-rows":
            allowed[:, :, 3::7] = False  # whole rows that see nothing
        if variant.mask == "float":
            mask = torch.randn(batch, 1, nq, nk).masked_fill(~allowed, float("-inf"))  # float32 mask
            bias = bias + mask.double().masked_fill(~allowed, 0.0)
        else:
            mask = allowed
        visible = visible & allowed
    return mask, visible, bias


def oracle(q, k, v, visible, bias, scale):
    """Attention in float64 by matmul, softmax and matmul; query head h reads kv head h // G; a
    row that sees no key gives 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-2, -1) * scale + bias).masked_fill(~visible, float("-inf"))
    seen = visible.any(-1, keepdim=True)
    return torch.where(seen, torch.softmax(scores, -1), 0.0) @ v


def inputs(variant: Variant, dtype, batch=2, heads=4, dim=24, dim_v=40):
    q = torch.randn(batch, heads, variant.nq, dim, dtype=f64)
    k = torch.randn(batch, variant.heads_kv, variant.nk, dim, dtype=f64)
    v = torch.randn(batch, variant.heads_kv, variant.nk, dim_v, dtype=f64)
    return q, k, v, [torch.randn_like(t) for t in (q, k, v)]


def expected_jvp(dense, q, k, v, tangents, scale, dtype=f64):
    """(out, tangent) of the oracle by torch.func.jvp with dense = (visible, bias) of make_mask, at
    `dtype` (float64: the expected values; lower: eager's own error, the tolerance's yardstick)."""
    visible, bias = dense
    args = [t.to(dtype) for t in (q, k, v)]
    return torch.func.jvp(lambda q, k, v: oracle(q, k, v, visible, bias.to(dtype), scale), tuple(args),
                          tuple(t.to(dtype) for t in tangents))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_matches_eager_jvp(variant, dtype):
    q, k, v, tangents = inputs(variant, dtype)
    scale = 0.2
    mask, *dense = make_mask(variant, 2, 4)
    mask_args = (mask, *variant.window, variant.offset)
    out, lse, tangent = ops.attention_jvp(*(t.to(dtype) for t in (q, k, v, *tangents)), variant.causal, scale,
                                          *mask_args)
    expected_out, expected_tangent = expected_jvp(dense, q, k, v, tangents, scale)
    eager_out, eager_tangent = expected_jvp(dense, q, k, v, tangents, scale, dtype) if dtype != f64 else \
        (expected_out, expected_tangent)
    assert_close(out, expected_out, eager_out, "out")
    assert_close(tangent, expected_tangent, eager_tangent, "tangent_out")
    assert tangent.stride() == out.stride()  # laid out as out: (B, Nq, H, Dv) memory
    # The same out and lse as the forward op.
    fwd_out, fwd_lse = ops.attention_fwd(*(t.to(dtype) for t in (q, k, v)), variant.causal, scale, *mask_args)
    if dtype == torch.bfloat16:
        # The forward op may run the native bf16 GEMMs (P rounded to bf16 before P·V); attention_jvp
        # keeps P in float32: both within bf16 rounding of each other (each checked above).
        torch.testing.assert_close(out.float(), fwd_out.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse, fwd_lse, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(out, fwd_out)
        torch.testing.assert_close(lse, fwd_lse)
    if variant.name.endswith("empty-rows"):
        empty = torch.isinf(lse)
        assert empty.any() and (tangent.float()[empty] == 0).all()


@pytest.mark.parametrize("missing", [(0,), (1,), (2,), (0, 1), (1, 2)],
                         ids=lambda m: "no-" + "".join("qkv"[i] for i in m))
def test_absent_tangents_are_zero(missing):
    variant = Variant("window-causal-gqa", 80, 90, causal=True, window=(40, -1), offset=10)
    q, k, v, tangents = inputs(variant, f64)
    given = [None if i in missing else t for i, t in enumerate(tangents)]
    zeroed = [torch.zeros_like(t) if i in missing else t for i, t in enumerate(tangents)]
    _, _, tangent = ops.attention_jvp(q, k, v, *given, True, 0.3, None, 40, -1, 10)
    _, expected = expected_jvp(make_mask(variant, 2, 4)[1:], q, k, v, zeroed, 0.3)
    assert_close(tangent, expected, expected, "tangent_out")


def test_strided_tangents_and_no_key():
    """Tangents in other layouts than their primals (transposed, sliced, last dim strided); Nk = 0."""
    q, k, v = (torch.randn(2, 3, n, d, dtype=f64) for n, d in ((9, 8), (11, 8), (11, 5)))
    tq = torch.randn(2, 9, 3, 8, dtype=f64).transpose(1, 2)
    tk = torch.randn(4, 3, 11, 8, dtype=f64)[::2]
    tv = torch.randn(2, 3, 5, 11, dtype=f64).transpose(2, 3)
    _, _, tangent = ops.attention_jvp(q, k, v, tq, tk, tv, False, 0.4)
    _, expected = torch.func.jvp(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.4, -1) @ v, (q, k, v),
                                 (tq, tk, tv))
    assert_close(tangent, expected, expected, "strided tangents")
    empty = torch.empty(2, 3, 0, 8, dtype=f64)
    out, lse, tangent = ops.attention_jvp(q, empty, empty[..., :5], tq, empty, empty[..., :5], False, 0.4)
    assert (out == 0).all() and (tangent == 0).all() and torch.isinf(lse).all()


# ---------------------------------------------------------------------------------------------
# The entry points: the public functions under torch.func.jvp, forward_ad, jacfwd


def test_public_function_jvp_with_masks_and_gqa():
    variant = Variant("bool-mask-gqa-causal", 70, 75, heads_kv=2, causal=True, offset=5, mask="bool")
    q, k, v, tangents = inputs(variant, f64)
    mask, *dense = make_mask(variant, 2, 4)
    fn = lambda q, k, v: selfattn.attention(q, k, v, mask, causal="bottom_right", enable_gqa=True,  # noqa: E731
                                            scale=0.25)
    _, tangent = torch.func.jvp(fn, (q, k, v), tuple(tangents))
    _, expected = expected_jvp(dense, q, k, v, tangents, 0.25)
    assert_close(tangent, expected, expected, "func.jvp")
    with fwAD.dual_level():
        dual = fn(*(fwAD.make_dual(t, dt) for t, dt in zip((q, k, v), tangents)))
        assert_close(fwAD.unpack_dual(dual).tangent, expected, expected, "forward_ad")


def test_jacfwd_equals_jacrev():
    q, k, v = torch.randn(2, 4, 6, 8, dtype=f64), torch.randn(2, 2, 7, 8, dtype=f64), torch.randn(2, 2, 7, 5, dtype=f64)
    mask = torch.randn(1, 1, 6, 7)  # float32 bias, shared
    fn = lambda q, k, v: selfattn.attention(q, k, v, mask, is_causal=False, enable_gqa=True,  # noqa: E731
                                            window=(3, 1))
    forward = torch.func.jacfwd(fn, argnums=(0, 1, 2))(q, k, v)
    reverse = torch.func.jacrev(fn, argnums=(0, 1, 2))(q, k, v)
    for f, r in zip(forward, reverse):
        assert_close(f, r, r, "jacfwd vs jacrev")


def eager_layer(x, w_qkv, b_qkv, num_heads, num_kv_heads, visible):
    head_dim = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v = F.linear(x, w_qkv, b_qkv).split([num_heads * head_dim, num_kv_heads * head_dim,
                                               num_kv_heads * head_dim], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, head_dim)).transpose(-3, -2) for t in (q, k, v))
    bias = torch.zeros(visible.shape, dtype=x.dtype)
    return oracle(q, k, v, visible, bias, head_dim**-0.5).transpose(-3, -2).flatten(-2)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layer_jvp_matches_eager(bias):
    """GQA (4 heads over 2), causal and a key-padding mask; tangents on x, w and b."""
    batch, seq, embed = 2, 70, 12
    x = torch.randn(batch, seq, embed, dtype=f64)
    w = torch.randn((4 + 2 * 2) * 6, embed, dtype=f64) / embed**0.5
    b = torch.randn(w.shape[0], dtype=f64) if bias else None
    real = torch.ones(batch, seq, dtype=torch.bool)
    real[1, 50:] = False
    visible = real[:, None, None, :] & torch.ones(seq, seq, dtype=torch.bool).tril()
    primals = (x, w) + ((b,) if bias else ())
    tangents = tuple(torch.randn_like(t) for t in primals)

    def fn(x, w, b=None):
        return selfattn.self_attention(x, w, b, num_heads=4, num_kv_heads=2, causal=True, key_padding_mask=real)

    _, tangent = torch.func.jvp(fn, primals, tangents)
    _, expected = torch.func.jvp(lambda x, w, b=None: eager_layer(x, w, b, 4, 2, visible), primals, tangents)
    assert_close(tangent, expected, expected, "layer jvp")
    _, expected_w = torch.func.jvp(lambda w: eager_layer(x, w, b, 4, 2, visible), (w,), (tangents[1],))
    with fwAD.dual_level():  # only w carries a tangent
        dual = fn(x, fwAD.make_dual(w, tangents[1]), *primals[2:])
        assert_close(fwAD.unpack_dual(dual).tangent, expected_w, expected_w, "layer forward_ad")


def test_layer_jacfwd_equals_jacrev():
    x, w, b = torch.randn(2, 5, 6, dtype=f64), torch.randn(18, 6, dtype=f64), torch.randn(18, dtype=f64)
    fn = lambda x, w, b: selfattn.self_attention(x, w, b, num_heads=2, window=(2, 1))  # noqa: E731
    forward = torch.func.jacfwd(fn, argnums=(0, 1, 2))(x, w, b)
    for f, r in zip(forward, torch.func.jacrev(fn, argnums=(0, 1, 2))(x, w, b)):
        assert_close(f, r, r, "layer jacfwd vs jacrev")


def test_varlen_jvp_matches_eager_per_sequence():
    """Packed sequences (one empty, one with Nk < Nq), bottom-right causal with a window, GQA:
    against the oracle run on each sequence with its dense band."""
    lengths_q, lengths_k = [70, 0, 9, 40], [90, 5, 3, 40]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), 4, 16, dtype=f64)
    k, v = torch.randn(sum(lengths_k), 2, 16, dtype=f64), torch.randn(sum(lengths_k), 2, 8, dtype=f64)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))

    def fn(q, k, v):
        return selfattn.attention_varlen(q, k, v, cu_q, cu_k, 70, 90, causal="bottom_right", enable_gqa=True,
                                         window=(12, -1), scale=0.3)

    def eager(q, k, v):
        outs = []
        for s, (nq, nk) in enumerate(zip(lengths_q, lengths_k)):
            variant = Variant("seq", nq, nk, causal=True, window=(12, -1), offset=nk - nq)
            seq = [t[cu[s]:cu[s] + n].transpose(0, 1)[None]
                   for t, cu, n in ((q, cu_q, nq), (k, cu_k, nk), (v, cu_k, nk))]
            _, visible, bias = make_mask(variant, 1, 4)
            outs.append(oracle(*seq, visible, bias, 0.3)[0].transpose(0, 1))
        return torch.cat(outs)

    _, tangent = torch.func.jvp(fn, (q, k, v), tangents)
    _, expected = torch.func.jvp(eager, (q, k, v), tangents)
    assert_close(tangent, expected, expected, "varlen jvp")
    forward = torch.func.jacfwd(fn, argnums=1)(q, k, v)  # through the batching rule of attention_jvp
    reverse = torch.func.jacrev(eager, argnums=1)(q, k, v)
    assert_close(forward, reverse, reverse, "varlen jacfwd")


# ---------------------------------------------------------------------------------------------
# The op as PyTorch sees it, and what is refused


def test_opcheck_attention_jvp():
    for dtype, tangents_given, mask in [(torch.float32, (True, True, True), None),
                                        (f64, (False, True, False), torch.rand(2, 1, 9, 12) < 0.8),
                                        (torch.bfloat16, (True, False, True), None)]:
        q, k, v = torch.randn(2, 4, 9, 8, dtype=dtype), torch.randn(2, 2, 12, 8, dtype=dtype), \
            torch.randn(2, 2, 12, 5, dtype=dtype)
        tangents = [torch.randn_like(t) if given else None for t, given in zip((q, k, v), tangents_given)]
        torch.library.opcheck(ops.attention_jvp, (q, k, v, *tangents, True, 0.3, mask, -1, -1, 3))


def test_a_mask_with_a_tangent_is_refused():
    q, k, v = torch.randn(1, 2, 5, 8, dtype=f64), torch.randn(1, 2, 6, 8, dtype=f64), torch.randn(1, 2, 6, 4, dtype=f64)
    bias = torch.randn(1, 1, 5, 6, dtype=f64)
    message = "attn_mask carries a forward-mode tangent, but selfattn does not compute the derivative along a mask"
    with pytest.raises(NotImplementedError, match=message):
        torch.func.jvp(lambda q, m: selfattn.attention(q, k, v, m), (q, bias),
                       (torch.randn_like(q), torch.randn_like(bias)))
    x, w = torch.randn(2, 5, 6, dtype=f64), torch.randn(12, 6, dtype=f64)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=message):
        selfattn.self_attention(x, fwAD.make_dual(w, torch.randn_like(w)), num_heads=2,
                                attn_mask=fwAD.make_dual(bias[0, 0, :, :5], torch.randn(5, 5, dtype=f64)))


@pytest.mark.parametrize("transform", ["jacrev-of-jacfwd", "jacfwd-of-jacfwd"])
def test_a_derivative_of_the_jvp_is_refused(transform):
    q, k, v = torch.randn(1, 2, 5, 8, dtype=f64), torch.randn(1, 2, 6, 8, dtype=f64), torch.randn(1, 2, 6, 4, dtype=f64)
    loss = lambda q: selfattn.attention(q, k, v).square().sum()  # noqa: E731
    outer = torch.func.jacrev if transform == "jacrev-of-jacfwd" else torch.func.jacfwd
    with pytest.raises(NotImplementedError, match=r"torch.ops.selfattn.attention_jvp\): a derivative of its "
                                                  r"forward-mode derivative .* not supported yet"):
        outer(torch.func.jacfwd(loss))(q)


@pytest.mark.parametrize("which", ["attention", "self_attention", "varlen"])
def test_jvp_with_dropout_is_refused(which):
    # attention_jvp has no keep mask: a jvp through a dropout call must raise, never return the
    # dropout-free tangent.
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    if which == "attention":
        def f(a):
            return selfattn.attention(q=a, k=k, v=v, dropout_p=0.3)
        primal = q
    elif which == "self_attention":
        x = torch.randn(1, 5, 16, dtype=torch.float64)
        w = torch.randn(3 * 16, 16, dtype=torch.float64)

        def f(a):
            return selfattn.self_attention(a, w, num_heads=2, dropout_p=0.3)
        primal = x
    else:
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))

        def f(a):
            return selfattn.attention_varlen(a, kp, vp, cu, cu, 3, 3, dropout_p=0.3)
        primal = qp
    with pytest.raises(NotImplementedError, match="jvp.*dropout_p > 0"):
        torch.func.jvp(f, (primal,), (torch.randn_like(primal),))
