"""Shared pieces of the tests: input sampling, the float64 references and the tolerance rule.

Tolerance (FlashAttention's rule; DESIGN.md, "Testing conventions"): a result's largest error
against a float64 computation may be at most ``FACTOR`` times the error of the same computation
done in eager PyTorch at the same precision, plus a small floor (eager's error can be exactly 0,
e.g. N = 1).
"""

from __future__ import annotations

import math

import torch

import selfattn

FACTOR = 2.0
# Absolute floor, in units of max(1, largest |expected|): a few roundings of the dtype.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.bfloat16: 3 * 2.0**-8,
    torch.float16: 3 * 2.0**-11,
}
# Unit roundoffs, and how many of them of the largest summed term the bound allows on top.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TERM_ROUNDINGS = 8
ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def make_tensor(shape, dtype, device="cpu", layout="contiguous", requires_grad=False):
    """Fresh standard-normal values in (B, H, N, D) shape, stored in one of several layouts.

    layout: "contiguous"; "transposed" — memory (B, N, H, D) as in a projection's output;
    "sliced" — every other element of a twice-as-long batch; "strided_last" — the last dim
    not contiguous (a transposed view).
    """
    b, h, n, d = shape
    if layout == "contiguous":
        t = torch.randn(b, h, n, d, dtype=dtype, device=device)
    elif layout == "transposed":
        t = torch.randn(b, n, h, d, dtype=dtype, device=device).transpose(1, 2)
    elif layout == "sliced":
        t = torch.randn(2 * b, h, n, d, dtype=dtype, device=device)[::2]
    elif layout == "strided_last":
        t = torch.randn(b, h, d, n, dtype=dtype, device=device).transpose(2, 3)
    else:
        raise ValueError(layout)
    return t.requires_grad_(requires_grad)


def sample_inputs(batch, heads, nq, nk, dim, dim_v=None, *, dtype=torch.float32, device="cpu",
                  layout="contiguous", requires_grad=False):
    """q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) with fresh random values."""
    dim_v = dim if dim_v is None else dim_v
    return (make_tensor((batch, heads, nq, dim), dtype, device, layout, requires_grad),
            make_tensor((batch, heads, nk, dim), dtype, device, layout, requires_grad),
            make_tensor((batch, heads, nk, dim_v), dtype, device, layout, requires_grad))


def eager_attention(q, k, v, causal=False, scale=None):
    """Attention by matmul + softmax + matmul, at the inputs' precision (the 'eager' baseline)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def attention_with_grads(fn, q, k, v, grad_out, **kwargs):
    """fn(q, k, v, **kwargs) and its gradients for grad_out, on fresh leaves of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def max_error(actual, expected64):
    return (actual.detach().to(torch.float64).cpu() - expected64.detach().cpu()).abs().max().item() \
        if expected64.numel() else 0.0


def assert_close(actual, expected64, eager, name="", terms=0.0):
    """actual within FACTOR x eager's error against the float64 expected value, plus a floor.

    terms: the largest magnitude among the terms the result sums (see gradient_terms); the bound
    then also allows TERM_ROUNDINGS unit roundings of it."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    if expected64.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in the result"
    err = max_error(actual, expected64)
    eager_err = max_error(eager, expected64)
    # Inputs are O(1): a gradient that is exactly 0 in float64 (dq at Nk = 1) still carries
    # roundings of O(1) terms, so the floor is relative to at least 1.
    scale = max(expected64.abs().max().item(), 1.0)
    bound = FACTOR * eager_err + FLOOR[actual.dtype] * scale + TERM_ROUNDINGS * UNIT_ROUNDOFF[actual.dtype] * terms
    assert err <= bound, (f"{name}: max error {err:.3e} > {FACTOR} x eager's {eager_err:.3e} + floor "
                          f"({bound:.3e}), dtype {actual.dtype}")


def gradient_terms(q, k, v, grad_out, scale):
    """The largest terms each attention gradient sums, from (B, H, N, D) inputs (k, v repeated to
    q's heads): a flash backward forms dS = P ∘ (dP - rowsum(dO ∘ out)), and the roundings of that
    row sum — a dot of |dO|·|v|-sized products — are not damped by P, so where a row sees one key
    dq is exactly 0 in float64 and in eager but a few roundings of scale·|dO|·|v|·|k| here.
    Returns {"grad_q", "grad_k", "grad_v"} -> float."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    products = (grad_out.double().abs() @ v.abs().transpose(-2, -1)).max().item() if v.numel() and grad_out.numel() else 0.0
    return {"grad_q": scale * products * (k.abs().max().item() if k.numel() else 0.0),
            "grad_k": scale * products * (q.abs().max().item() if q.numel() else 0.0),
            "grad_v": grad_out.abs().max().item() if grad_out.numel() else 0.0}


def reference_layer_float64(module: selfattn.reference.SelfAttention) -> selfattn.reference.SelfAttention:
    """A float64 copy of a reference module (the expected values come from it)."""
    ref = selfattn.reference.SelfAttention(module.embed_dim, module.model_dim, module.num_heads,
                                           bias=module.to_query.bias is not None, causal=module.causal,
                                           scale=module.scale).to(torch.float64)
    ref.load_state_dict({k: v.detach().to(torch.float64) for k, v in module.state_dict().items()})
    return ref
