"""Dropout in the CUDA kernels (tiled, tensor-core, float64 generic), run in the CPU emulation
(tests/cuda_emulation/): forward and backward against eager float64 given the keep mask of
selfattn.dropout_mask, and against the CPU kernels given the same rng_state. Opt-in like
test_cuda_emulation.py: SELFATTN_TEST_EMULATION=1.
"""

from __future__ import annotations

import os

import pytest
import torch

import selfattn
from tests.common import assert_close, make_tensor
from tests.test_cuda_emulation import emu, emu_forward, packed_grads  # noqa: F401  (emu: the fixture)
from tests.test_dropout import eager_dropout_attention

pytestmark = pytest.mark.skipif(os.environ.get("SELFATTN_TEST_EMULATION") != "1",
                                reason="set SELFATTN_TEST_EMULATION=1 to run the CUDA kernels in CPU emulation")

# (dtype, D, Hq, Hk, causal): the kernel each reaches.
KERNELS = {
    "tiled f32 D16 gqa": (torch.float32, 16, 4, 2, False),
    "tiled f32 D80 causal": (torch.float32, 80, 2, 2, True),
    "tiled f16 D32 causal": (torch.float16, 32, 2, 1, True),
    "tensor-core bf16 D64": (torch.bfloat16, 64, 2, 2, False),
    "tensor-core f16 D128 causal gqa": (torch.float16, 128, 2, 1, True),
    "generic f64 D16 causal": (torch.float64, 16, 2, 2, True),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_emulated_kernels_apply_the_mask(emu, name):  # noqa: F811
    dtype, dim, heads, heads_kv, causal = KERNELS[name]
    batch, nq, nk, p = 2, 70, 45, 0.3
    q = make_tensor((batch, heads, nq, dim), dtype)
    k = make_tensor((batch, heads_kv, nk, dim), dtype)
    v = make_tensor((batch, heads_kv, nk, dim), dtype)
    grad_out = make_tensor((batch, heads, nq, dim), dtype)
    rng_state = torch.tensor([123, 45], dtype=torch.int64)
    scale = dim ** -0.5
    keep = selfattn.dropout_mask(rng_state, (batch, heads, nq, nk), p)
    band = (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None]) if causal else None
    group = heads // heads_kv

    # The emulated CUDA kernels.
    b, h = batch, heads
    out = torch.full((b, nq, h, dim), float("nan"), dtype=dtype).transpose(1, 2)
    lse = torch.full((b, h, nq), float("nan"), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    emu.forward_dropout(q, k, v, causal, scale, None, -1, -1, 0, p, rng_state, out, lse)
    grads = packed_grads(q, k, v) if heads == heads_kv else [torch.full(t.shape, float("nan"), dtype=dtype)
                                                             for t in (q, k, v)]
    emu.backward_dropout(grad_out, q, k, v, out, lse, causal, scale, None, -1, -1, 0, p, rng_state, *grads)

    # Eager, at the dtype and in float64, given the same mask.
    def eager(*tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        o = eager_dropout_attention(*leaves, keep, p, scale, band, group)
        return o.detach(), torch.autograd.grad(o, leaves, grad_out.to(o.dtype))

    out64, grads64 = eager(q.double(), k.double(), v.double())
    eager_out, eager_grads = eager(q, k, v)
    assert_close(out, out64, eager_out, f"{name} out")
    for g, g64, ge, n in zip(grads, grads64, eager_grads, ("dq", "dk", "dv")):
        assert_close(g, g64, ge, f"{name} {n}")

    # The CPU kernels with the same rng_state: the same mask, so the same result up to rounding.
    cpu_out, cpu_lse = torch.ops.selfattn.attention_fwd(q, k, v, causal, scale, None, -1, -1, 0, p, rng_state)
    assert_close(out, cpu_out.double(), eager_out, f"{name} out vs the CPU kernel")
    torch.testing.assert_close(lse, cpu_lse, rtol=2e-6, atol=2e-6)
    cpu_grads = torch.ops.selfattn.attention_bwd(grad_out, q, k, v, out, lse, causal, scale, None, -1, -1, 0, p,
                                                 rng_state)
    for g, cg, ge, n in zip(grads, cpu_grads, eager_grads, ("dq", "dk", "dv")):
        assert_close(g, cg.double(), ge, f"{name} {n} vs the CPU kernel")
