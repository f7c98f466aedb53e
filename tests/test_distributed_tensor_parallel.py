"""Tensor parallelism over heads on 2 and 4 gloo ranks (float64, against the same computation in one
process): the ops' sharding rules on DTensors sharded on heads or batch, and a Llama-style block
(SelfAttentionParallel, RowwiseParallel out-projection, Colwise/Rowwise MLP) under
parallelize_module, with CommDebugMode showing no communication inside the attention.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from tests.distributed_harness import case_results, run_cases, run_ranks

HEADS, KV_HEADS, HEAD_DIM, EMBED, SEQ = 8, 4, 4, 24, 10
TOL = dict(rtol=0, atol=1e-12)


class LlamaBlock(nn.Module):
    """Pre-norm attention (the fused layer + an out-projection) and a SwiGLU MLP, with residuals."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        model = HEADS * HEAD_DIM
        self.attn_norm = nn.RMSNorm(EMBED, dtype=torch.float64)
        self.attn = attention
        self.wo = nn.Linear(model, EMBED, bias=False, dtype=torch.float64)
        self.mlp_norm = nn.RMSNorm(EMBED, dtype=torch.float64)
        self.w1 = nn.Linear(EMBED, 32, bias=False, dtype=torch.float64)
        self.w3 = nn.Linear(EMBED, 32, bias=False, dtype=torch.float64)
        self.w2 = nn.Linear(32, EMBED, bias=False, dtype=torch.float64)

    def forward(self, x, key_padding_mask=None):
        h = x + self.wo(self.attn(self.attn_norm(x), key_padding_mask=key_padding_mask))
        g = self.mlp_norm(h)
        return h + self.w2(nn.functional.silu(self.w1(g)) * self.w3(g))


def _mesh(world_size):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world_size,))


def _comm_in_modules(comm, name):
    """Collectives CommDebugMode saw inside module ``name`` (forward and backward)."""
    found = {}
    for fqn, per_pass in comm.comm_module_counts.items():
        if fqn.split(".")[-1] == name:
            for pass_name in ("forward", "backward"):
                for op, n in per_pass.get(pass_name, {}).items():
                    found[f"{pass_name}:{op}"] = n
    return found


def _check_llama_block(rank, world_size, bias):
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import selfattn
    from selfattn.distributed.tensor_parallel import SelfAttentionParallel, deinterleave_qkv

    torch.manual_seed(0)  # the same weights and inputs on every rank
    attention = selfattn.SelfAttention(EMBED, HEADS * HEAD_DIM, HEADS, num_kv_heads=KV_HEADS, bias=bias,
                                       causal=True, dtype=torch.float64)
    block = LlamaBlock(attention)
    single = copy.deepcopy(block)
    x = torch.randn(2, SEQ, EMBED, dtype=torch.float64)
    padding = torch.arange(SEQ) < torch.tensor([[SEQ], [SEQ - 3]])
    grad = torch.randn(2, SEQ, EMBED, dtype=torch.float64)

    plan = {"attn": SelfAttentionParallel(), "wo": RowwiseParallel(), "w1": ColwiseParallel(),
            "w3": ColwiseParallel(), "w2": RowwiseParallel()}
    parallelize_module(block, _mesh(world_size), plan)
    x_tp = x.clone().requires_grad_()
    with CommDebugMode() as comm:
        out = block(x_tp, key_padding_mask=padding)
        out.backward(grad)
    x_single = x.clone().requires_grad_()
    expected = single(x_single, key_padding_mask=padding)
    expected.backward(grad)

    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(x_tp.grad, x_single.grad, **TOL)
    for (name, p), (_, p_single) in zip(block.named_parameters(), single.named_parameters()):
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if name.startswith("attn.in_proj"):
            g = deinterleave_qkv(g, HEADS, KV_HEADS, world_size)
        torch.testing.assert_close(g, p_single.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")
    counts = {str(op): n for op, n in comm.get_comm_counts().items()}
    assert not [op for op in counts if "gather" in op], counts
    # Inside the attention layer: nothing in forward; in backward one all-reduce, of dx where the
    # replicated input came in (each rank's heads give part of it; ColwiseParallel does the same).
    assert _comm_in_modules(comm, "attn") == {"backward:c10d_functional.all_reduce": 1}, comm.comm_module_counts


def _check_attention_heads_sharded(rank, world_size):
    """q, k, v as DTensors sharded on heads (as column-parallel projections give them): the ops run
    on each rank's heads with no communication, forward and backward; a per-head mask is sharded
    with them, a mask broadcast over heads replicated."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    import selfattn
    import selfattn.distributed.tensor_parallel  # noqa: F401 - registers the sharding rules

    mesh = _mesh(world_size)
    torch.manual_seed(1)
    batch = 4  # divisible by the world size: an uneven split would fall back to replication
    q = torch.randn(batch, HEADS, SEQ, HEAD_DIM, dtype=torch.float64)
    k, v = (torch.randn(batch, KV_HEADS, SEQ, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(batch, HEADS, SEQ, HEAD_DIM, dtype=torch.float64)
    per_head = torch.rand(1, HEADS, SEQ, SEQ) < 0.7
    shared = torch.rand(batch, 1, SEQ, SEQ) < 0.7
    for mask, placement in ((None, None), (per_head, Shard(1)), (shared, Replicate())):
        for dim in (1, 0):  # heads, batch
            leaves = [distribute_tensor(t, mesh, [Shard(dim)]).requires_grad_() for t in (q, k, v)]
            mask_dt = None
            if mask is not None:
                mask_placement = placement if dim == 1 else (Shard(0) if mask.shape[0] > 1 else Replicate())
                mask_dt = distribute_tensor(mask, mesh, [mask_placement])
            grad_dt = distribute_tensor(grad, mesh, [Shard(dim)])
            with CommDebugMode() as comm:
                out = selfattn.attention(*leaves, mask_dt, is_causal=True, enable_gqa=True)
                out.backward(grad_dt)
            assert comm.get_total_counts() == 0, comm.get_comm_counts()
            assert isinstance(out, DTensor) and out.placements == (Shard(dim),)
            single = [t.clone().requires_grad_() for t in (q, k, v)]
            expected = selfattn.attention(*single, mask, is_causal=True, enable_gqa=True)
            expected.backward(grad)
            torch.testing.assert_close(out.full_tensor(), expected, **TOL)
            for leaf, ref in zip(leaves, single):
                assert leaf.grad.placements == (Shard(dim),)
                torch.testing.assert_close(leaf.grad.full_tensor(), ref.grad, **TOL)


def _check_layer_batch_sharded(rank, world_size):
    """The fused op on x sharded on the batch, weights replicated: local forward, the weight
    gradient Partial (summed when redistributed)."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    import selfattn
    import selfattn.distributed.tensor_parallel  # noqa: F401

    mesh = _mesh(world_size)
    torch.manual_seed(2)
    x = torch.randn(2 * world_size, SEQ, EMBED, dtype=torch.float64)
    w = torch.randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, EMBED, dtype=torch.float64)
    b = torch.randn(w.shape[0], dtype=torch.float64)
    x_dt = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    w_dt, b_dt = (distribute_tensor(t, mesh, [Replicate()]).requires_grad_() for t in (w, b))
    with CommDebugMode() as comm:
        out = selfattn.self_attention(x_dt, w_dt, b_dt, num_heads=HEADS, num_kv_heads=KV_HEADS, causal=True)
        grads = torch.autograd.grad(out, (x_dt, w_dt, b_dt), torch.ones_like(out), retain_graph=True)
        fwd, bwd = torch.ops.selfattn.self_attention_fwd.default, torch.ops.selfattn.self_attention_bwd.default
        _, qkv, lse = fwd(x_dt.detach(), w_dt.detach(), b_dt.detach(), HEADS, True, HEAD_DIM ** -0.5, KV_HEADS)
        _, gw, _, _ = bwd(torch.ones_like(out), x_dt.detach(), w_dt.detach(), qkv, out.detach(), lse, HEADS, True,
                       HEAD_DIM ** -0.5, [True, True, True, False], KV_HEADS)
    assert gw.placements == (Partial(),)
    counts = {str(op): n for op, n in comm.get_comm_counts().items()}
    assert not [op for op in counts if "gather" in op], counts  # the replicated weight's grad: all-reduce only
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    expected = selfattn.self_attention(*leaves, num_heads=HEADS, num_kv_heads=KV_HEADS, causal=True)
    expected_grads = torch.autograd.grad(expected, leaves, torch.ones_like(expected))
    torch.testing.assert_close(out.full_tensor(), expected, **TOL)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.full_tensor(), want, **TOL)
    torch.testing.assert_close(gw.full_tensor(), expected_grads[1], **TOL)


def _check_style_refuses_heads(rank, world_size):
    from torch.distributed.tensor.parallel import parallelize_module

    import selfattn
    from selfattn.distributed.tensor_parallel import SelfAttentionParallel

    layer = selfattn.SelfAttention(EMBED, 6 * world_size, 3 * world_size, num_kv_heads=3 if world_size > 3 else 1)
    with pytest.raises(ValueError, match="must both be divisible by the tensor-parallel degree"):
        parallelize_module(layer, _mesh(world_size), SelfAttentionParallel())


CASES = {
    "llama-block": functools.partial(_check_llama_block, bias=False),
    "llama-block-bias": functools.partial(_check_llama_block, bias=True),
    "attention-heads-or-batch-sharded": _check_attention_heads_sharded,
    "layer-batch-sharded": _check_layer_batch_sharded,
    "style-refuses-heads": _check_style_refuses_heads,
}


def _suite(rank, world_size):
    return run_cases(list(CASES.items()), rank, world_size)


@functools.lru_cache(maxsize=None)
def _suite_results(world_size):
    return run_ranks(_suite, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel(world_size, case):
    case_results(_suite_results(world_size), case)


def test_interleave_round_trip():
    from selfattn.distributed.tensor_parallel import deinterleave_qkv, interleave_qkv, qkv_rows_of_rank

    w = torch.arange((HEADS + 2 * KV_HEADS) * HEAD_DIM).float()[:, None]
    for tp in (1, 2, 4):
        inter = interleave_qkv(w, HEADS, KV_HEADS, tp)
        assert torch.equal(deinterleave_qkv(inter, HEADS, KV_HEADS, tp), w)
    rows = qkv_rows_of_rank(w, HEADS, KV_HEADS, 2, 1)[:, 0].long().tolist()
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    assert rows == (list(range(q // 2, q)) + list(range(q + kv // 2, q + kv))
                    + list(range(q + kv + kv // 2, q + 2 * kv)))
