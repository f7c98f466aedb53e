"""Tensor masks (attn_mask) on the tensor-core kernels (csrc/cuda/attention_{fwd,bwd}_tc.cuh,
tc_mask.cuh), run in the CPU emulation against the float64 oracle of test_cuda_emulation.py (a
dense float64 mask built from the op's arguments): fp16 and bf16 at D = 64 and 128, forward and
both backward kernels, bool and additive masks of every broadcast shape and layout, with the band
(causal top-left / bottom-right, windows) and GQA, lengths crossing the tiles (64 / 128 queries,
64 / 128 keys), and rows that see nothing. Every case asserts that the tensor cores ran.
Opt-in like test_cuda_emulation.py: SELFATTN_TEST_EMULATION=1.
"""

from __future__ import annotations

import os

import pytest
import torch

import selfattn
from tests.common import assert_close, make_tensor
from tests.test_cuda_emulation import (  # noqa: F401
    NEG_INF,
    assert_empty_rows,
    assert_same_under_two_seeds,
    emu,  # (emu: the fixture)
    key_padding,
    run_mask_case,
)
from tests.test_dropout import eager_dropout_attention

pytestmark = pytest.mark.skipif(os.environ.get("SELFATTN_TEST_EMULATION") != "1",
                                reason="set SELFATTN_TEST_EMULATION=1 to run the CUDA kernels in CPU emulation")


def left_padding(batch, nk, lengths):
    """(B, 1, 1, Nk) bool, True for the last lengths[b] keys (left-padded prompts)."""
    return (torch.arange(nk).view(1, -1) >= nk - torch.tensor(lengths).view(-1, 1)).view(batch, 1, 1, nk)


def make_mask(kind, batch, hq, nq, nk, dtype):
    """attn_mask of one kind: (shape, dtype, layout) as its name says."""
    g = torch.Generator().manual_seed(11)
    if kind == "bool_full":  # (B, Hq, Nq, Nk) contiguous, two rows all False
        m = torch.rand(batch, hq, nq, nk, generator=g) < 0.6
        m[0, 1, 3] = False
        m[-1, -1, nq - 1] = False
        return m
    if kind == "bool_right_padding":  # (B, 1, 1, Nk): the last batch sees no key at all
        return key_padding(batch, nk, [nk - 37, 0][:batch])
    if kind == "bool_left_padding":  # (B, 1, 1, Nk): with causal, the first rows see nothing
        return left_padding(batch, nk, [nk - 70, nk - 5][:batch])
    if kind == "float_shared":  # (1, 1, Nq, Nk) float32, some -inf, one row all -inf
        m = torch.randn(1, 1, nq, nk, generator=g) * 2
        m[torch.rand(1, 1, nq, nk, generator=g) < 0.2] = NEG_INF
        m[0, 0, 5] = NEG_INF
        return m
    if kind == "float_expanded":  # (B, Hq, Nq, Nk) through stride 0 on heads and queries
        m = torch.randn(batch, 1, 1, nk, generator=g).to(dtype)
        m[0, ..., : nk // 2] = NEG_INF
        return m.expand(batch, hq, nq, nk)
    if kind == "float_transposed":  # (B, Hq, Nq, Nk) in q's dtype, Nk-major memory, rows of -inf
        m = (torch.randn(batch, hq, nk, nq, generator=g) * 2).transpose(2, 3)
        m[:, :, 2] = NEG_INF
        return m.to(dtype)
    if kind == "bool_sliced":  # every other key of a longer mask: stride 2 along Nk, a view
        m = torch.rand(batch, hq, nq, 2 * nk, generator=g) < 0.7
        m[:, 0, 7] = False
        return m[..., ::2]
    raise ValueError(kind)


# kind -> (causal, window_left, window_right, offset as a function of (nq, nk), hq, hk, nq, nk):
# each mask with a band and GQA, Nq != Nk, no length a multiple of any tile.
def bottom_right(nq, nk):
    return nk - nq


MASK_CASES = {
    "bool_full": (False, -1, -1, lambda nq, nk: 0, 2, 1, 75, 90),
    "bool_right_padding+causal_bottom_right": (True, -1, -1, bottom_right, 2, 1, 70, 150),
    "bool_left_padding+causal": (True, -1, -1, lambda nq, nk: 0, 2, 2, 100, 100),
    "float_shared+window": (False, 30, 10, lambda nq, nk: 5, 2, 1, 75, 90),
    "float_expanded+causal_gqa": (True, -1, -1, lambda nq, nk: 20, 4, 2, 70, 80),
    "float_transposed+bottom_right": (True, -1, -1, bottom_right, 2, 2, 130, 70),
    "bool_sliced+window": (False, 40, 0, lambda nq, nk: 0, 2, 1, 90, 75),
}
# (dtype, D): every tensor-core instantiation.
TC_KERNELS = {"fp16_d64": (torch.float16, 64), "bf16_d64": (torch.bfloat16, 64),
              "fp16_d128": (torch.float16, 128), "bf16_d128": (torch.bfloat16, 128)}


def run_tc_mask_case(emu, case, dtype, dim, batch=2):  # noqa: F811
    causal, window_left, window_right, offset, hq, hk, nq, nk = MASK_CASES[case]
    attn_mask = make_mask(case.split("+")[0], batch, hq, nq, nk, dtype)
    emu.reset_counters()
    out, lse, grads, mask = run_mask_case(emu, (batch, hq, hk, nq, nk, dim), dtype, causal,
                                          (attn_mask, window_left, window_right, offset(nq, nk)))
    assert emu.counters()["mma"] > 0, "the tensor-core kernels did not run"
    return out, lse, grads, mask


# Every mask case on one instantiation (rotating through the four), and two more so that every
# instantiation meets a bool and a float mask: the full cross product would cost minutes in the
# emulation.
ROTATION = [(case, list(TC_KERNELS)[i % 4]) for i, case in enumerate(MASK_CASES)]
EXTRA = [("float_shared+window", "fp16_d128"), ("bool_full", "bf16_d128")]


@pytest.mark.parametrize("case,kernel", ROTATION + EXTRA)
def test_tensor_mask_on_tensor_cores(emu, case, kernel):  # noqa: F811
    dtype, dim = TC_KERNELS[kernel]
    out, lse, grads, mask = run_tc_mask_case(emu, case, dtype, dim)
    empty = (mask == NEG_INF).all(-1)
    if empty.any():
        assert_empty_rows(out, lse, grads, mask)  # out 0, lse -inf, dq 0
    # Keys no query of their group sees (right padding; a batch that sees nothing): dk, dv 0.
    hq, hk = mask.shape[1], grads[1].shape[1]
    unseen = (mask == NEG_INF).all(-2).view(mask.shape[0], hk, hq // hk, -1).all(2)
    assert (grads[1][unseen] == 0).all() and (grads[2][unseen] == 0).all()
    if case.startswith("bool_right_padding"):
        assert empty[1].all() and all((g[1] == 0).all() for g in grads)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16])
def test_finfo_min_rows_on_tensor_cores(emu, mask_dtype):  # noqa: F811
    """A row masked everywhere with bfloat16's finfo.min (Hugging Face's padding in a bf16 model;
    times log2(e) it overflows float): an ordinary row, the uniform softmax of the float64 math
    (forward, as for the tiled kernels)."""
    attn_mask = torch.zeros(2, 1, 70, 80, dtype=mask_dtype)
    attn_mask[..., 4, :] = torch.finfo(torch.bfloat16).min
    attn_mask[..., 9, 20:] = torch.finfo(torch.bfloat16).min
    attn_mask[1, ..., 66:] = torch.finfo(torch.bfloat16).min  # finfo.min rows in both 64-row blocks
    emu.reset_counters()
    out, lse, _, _ = run_mask_case(emu, (2, 2, 2, 70, 80, 64), torch.bfloat16, True, (attn_mask, -1, -1, 10),
                                   backward=False)
    assert emu.counters()["mma"] > 0
    assert torch.isfinite(lse).all()


def test_tensor_mask_with_dropout_on_tensor_cores(emu):  # noqa: F811
    """Dropout under a tensor mask: the keep mask of selfattn.dropout_mask on top of the dense
    mask, forward and backward, against eager float64 and the CPU kernels."""
    dtype, dim, batch, heads, heads_kv, nq, nk, p = torch.float16, 64, 2, 2, 1, 70, 90, 0.25
    q = make_tensor((batch, heads, nq, dim), dtype)
    k = make_tensor((batch, heads_kv, nk, dim), dtype)
    v = make_tensor((batch, heads_kv, nk, dim), dtype)
    grad_out = make_tensor((batch, heads, nq, dim), dtype)
    attn_mask = key_padding(batch, nk, [nk - 30, nk - 3])
    rng_state = torch.tensor([321, 7], dtype=torch.int64)
    scale = dim ** -0.5
    keep = selfattn.dropout_mask(rng_state, (batch, heads, nq, nk), p)
    causal_band = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
    dense = attn_mask & causal_band

    out = torch.full((batch, nq, heads, dim), float("nan"), dtype=dtype).transpose(1, 2)
    lse = torch.full((batch, heads, nq), float("nan"))
    args = (True, scale, attn_mask, -1, -1, nk - nq, p, rng_state)
    emu.reset_counters()
    emu.forward_dropout(q, k, v, *args, out, lse)
    grads = [torch.full(t.shape, float("nan"), dtype=dtype) for t in (q, k, v)]
    emu.backward_dropout(grad_out, q, k, v, out, lse, *args, *grads)
    assert emu.counters()["mma"] > 0

    def eager(*tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        o = eager_dropout_attention(*leaves, keep, p, scale, dense, heads // heads_kv)
        return o.detach(), torch.autograd.grad(o, leaves, grad_out.to(o.dtype))

    out64, grads64 = eager(q.double(), k.double(), v.double())
    eager_out, eager_grads = eager(q, k, v)
    assert_close(out, out64, eager_out, "out")
    for g, g64, ge, n in zip(grads, grads64, eager_grads, ("dq", "dk", "dv")):
        assert_close(g, g64, ge, n)
    cpu_out, cpu_lse = torch.ops.selfattn.attention_fwd(q, k, v, *args)
    torch.testing.assert_close(lse, cpu_lse, rtol=2e-6, atol=2e-6)
    assert_close(out, cpu_out.double(), eager_out, "out vs the CPU kernel")


def test_masked_tensor_cores_deterministic(emu):  # noqa: F811
    """Bitwise identical under other thread orders with a tensor mask, GQA and a window."""
    q = torch.randn(1, 4, 70, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 80, 64, dtype=torch.bfloat16) for _ in range(2))
    attn_mask = make_mask("float_shared", 1, 4, 70, 80, torch.bfloat16)
    emu.reset_counters()
    assert_same_under_two_seeds(emu, q, k, v, torch.randn_like(q), 0.2, (attn_mask, 20, -1, 10))
    assert emu.counters()["mma"] > 0
