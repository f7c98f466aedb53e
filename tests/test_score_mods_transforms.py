"""Score modifications under torch.func: forward mode (jvp, tangents for q, k, v and sinks) against
the jvp of the float64 oracle of tests/test_score_mods.py, and per-sample gradients of sinks
(vmap(grad)) against a loop."""

from __future__ import annotations

import pytest
import torch

import selfattn
from tests.test_masks import band_visible
from tests.test_score_mods import AXES, inputs, make_mods, oracle

f32, f64 = torch.float32, torch.float64


@pytest.mark.parametrize("causal", [False, "bottom_right"], ids=str)
@pytest.mark.parametrize("mods", AXES["mods"])
def test_jvp_matches_the_oracle(mods, causal):
    b, h, nq, nk, d, scale = 2, 4, 37, 70, 32, 0.3
    q, k, v = inputs(b, h, 2, nq, nk, d, f64)
    softcap, slopes, sinks = make_mods(mods, b, h, f64)
    primals = (q, k, v) + ((sinks,) if sinks is not None else ())
    tangents = tuple(torch.randn_like(t) for t in primals)
    offset = nk - nq if causal == "bottom_right" else 0

    def actual(q_, k_, v_, s=None):
        return selfattn.attention(q_, k_, v_, scale=scale, causal=causal, enable_gqa=True, softcap=softcap,
                                  alibi_slopes=slopes, sinks=s)

    def expected(q_, k_, v_, s=None):
        return oracle(q_, k_, v_, s, scale=scale, softcap=softcap, slopes=slopes, offset=offset,
                      visible=band_visible(nq, nk, causal, None))[0]

    out, tangent_out = torch.func.jvp(actual, primals, tangents)
    expected_out, expected_tangent = torch.func.jvp(expected, primals, tangents)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(tangent_out, expected_tangent)


def test_jvp_of_the_sinks_alone():
    """A tangent for sinks only: the op's tangent_sinks path (q, k, v tangents absent)."""
    q, k, v = inputs(1, 2, 2, 9, 12, 8, f64)
    sinks = torch.randn(2, dtype=f64)
    fn = lambda s: selfattn.attention(q, k, v, causal=True, sinks=s)
    ref = lambda s: oracle(q, k, v, s, scale=8 ** -0.5, visible=band_visible(9, 12, True, None))[0]
    tangent = torch.randn(2, dtype=f64)
    torch.testing.assert_close(torch.func.jvp(fn, (sinks,), (tangent,)), torch.func.jvp(ref, (sinks,), (tangent,)))


@pytest.mark.parametrize("mods", ["sinks", "all"])
@pytest.mark.parametrize("dtype", [f32, f64], ids=str)
def test_per_sample_sink_gradients(mods, dtype):
    """vmap(grad) over samples with a shared sinks: each sample's sinks.grad (and q's) as a loop of
    plain autograd gets it."""
    n, h, nq, nk, d = 5, 4, 20, 33, 16
    q, k, v = inputs(n, h, 2, nq, nk, d, dtype)
    softcap, slopes, sinks = make_mods(mods, 1, h, dtype)
    weights = torch.randn(n, h, nq, d, dtype=dtype)

    def loss(q_, k_, v_, s, w):
        out = selfattn.attention(q_[None], k_[None], v_[None], causal="bottom_right", enable_gqa=True,
                                 softcap=softcap, alibi_slopes=slopes, sinks=s)
        return (out[0] * w).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 3)), in_dims=(0, 0, 0, None, 0))(
        q, k, v, sinks, weights)
    for i in range(n):
        leaves = [q[i].clone().requires_grad_(True), sinks.clone().requires_grad_(True)]
        expected = torch.autograd.grad(loss(leaves[0], k[i], v[i], leaves[1], weights[i]), leaves)
        torch.testing.assert_close(per_sample[0][i], expected[0], msg=lambda m: f"sample {i}, grad_q: {m}")
        torch.testing.assert_close(per_sample[1][i], expected[1], msg=lambda m: f"sample {i}, grad_sinks: {m}")
    # and the sum over samples is the batched call's sinks.grad
    s = sinks.clone().requires_grad_(True)
    out = selfattn.attention(q, k, v, causal="bottom_right", enable_gqa=True, softcap=softcap, alibi_slopes=slopes,
                             sinks=s)
    (grad,) = torch.autograd.grad((out * weights).sum(), s)
    torch.testing.assert_close(per_sample[1].sum(0), grad)
