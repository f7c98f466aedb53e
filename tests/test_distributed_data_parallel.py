"""Data parallel training with selfattn layers on 2 and 4 gloo ranks: DDP and FSDP2 (fully_shard),
eager, under torch.utils.checkpoint and under torch.compile, give the losses and parameters of
single-process training on the same global batch (float32, within rounding).

The attention layers are a table (``LAYERS``): a new layer (selfattn.MultiheadAttention when it
exists) is one entry — a constructor and how to call it on (B, N, E).
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from torch import nn

from tests.distributed_harness import case_results, run_cases, run_ranks

EMBED, HEADS, SEQ, GLOBAL_BATCH, STEPS, LR = 16, 4, 6, 4, 3, 0.2
# aot_eager traces the ops through their fake kernels and autograd as inductor does, without a
# C++ compile per rank (minutes on two shared cores); SELFATTN_TEST_COMPILE_BACKEND=inductor for more.
COMPILE_BACKEND = os.environ.get("SELFATTN_TEST_COMPILE_BACKEND", "aot_eager")


def _self_attention():
    import selfattn
    return selfattn.SelfAttention(EMBED, EMBED, HEADS, num_kv_heads=2, bias=True, causal=True)


def _multihead_attention():
    import selfattn
    return selfattn.MultiheadAttention(EMBED, HEADS, batch_first=True)


LAYERS = {
    "SelfAttention": (_self_attention, lambda layer, h: layer(h)),
    "MultiheadAttention": (_multihead_attention, lambda layer, h: layer(h, h, h, need_weights=False)[0]),
}


def _layer_exists(name) -> bool:
    import selfattn
    return hasattr(selfattn, name)


class TinyModel(nn.Module):
    def __init__(self, layer_name, checkpoint):
        super().__init__()
        make, self._call = LAYERS[layer_name]
        self.inp = nn.Linear(8, EMBED)
        self.attn = make()
        self.out = nn.Linear(EMBED, 1)
        self.checkpoint = checkpoint

    def forward(self, x):
        h = self.inp(x)
        if self.checkpoint:
            a = torch.utils.checkpoint.checkpoint(self._call, self.attn, h, use_reentrant=False)
        else:
            a = self._call(self.attn, h)
        return self.out(torch.tanh(h + a)).pow(2).mean()  # the mean over this rank's batch


def _train(model, batches, sync_loss=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for x in batches:
        opt.zero_grad()
        loss = model(x)
        loss.backward()
        opt.step()
        losses.append(loss.detach() if sync_loss is None else sync_loss(loss.detach()))
    return torch.stack(losses)


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _check(rank, world_size, wrapper, layer_name, checkpoint, compiled):
    import torch.distributed as dist

    torch.manual_seed(0)  # the same model and data on every rank
    single = TinyModel(layer_name, checkpoint=False)  # the reference: plain eager, one process
    model = copy.deepcopy(single)
    model.checkpoint = checkpoint
    batches = [torch.randn(GLOBAL_BATCH, SEQ, 8) for _ in range(STEPS)]
    expected_losses = _train(single, batches)
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model.attn)
        wrapped = fully_shard(model)
    if compiled:
        torch._dynamo.reset()
        wrapped = torch.compile(wrapped, backend=COMPILE_BACKEND)
    per_rank = GLOBAL_BATCH // world_size
    local = [x[rank * per_rank:(rank + 1) * per_rank] for x in batches]

    def global_mean(loss):
        dist.all_reduce(loss)
        return loss / world_size
    with torch.autograd.profiler.profile() as prof:
        losses = _train(wrapped, local, global_mean)
    ran = {e.name for e in prof.function_events if e.name.startswith("selfattn::")}
    assert any(name.endswith("_fwd") for name in ran) and any(name.endswith("_bwd") for name in ran), ran
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    for (name, p), (_, p_single) in zip(model.named_parameters(), single.named_parameters()):
        torch.testing.assert_close(_full(p.detach()), p_single.detach(), rtol=1e-5, atol=2e-6,
                                   msg=lambda m: f"{name} after {STEPS} steps: {m}")


def _cases(world_size):
    cases = {}
    for layer_name in LAYERS:
        for wrapper in ("ddp", "fsdp2"):
            variants = [("eager", False, False), ("checkpoint", True, False), ("compile", False, True)]
            if world_size > 2:  # the compiled runs once, at world size 2 (a compile per rank costs seconds)
                variants = variants[:2]
            for variant, checkpoint, compiled in variants:
                cases[f"{layer_name}-{wrapper}-{variant}"] = functools.partial(
                    _check, wrapper=wrapper, layer_name=layer_name, checkpoint=checkpoint, compiled=compiled)
    return cases


def _suite(rank, world_size):
    cases = [(name, fn) for name, fn in _cases(world_size).items() if _layer_exists(name.split("-")[0])]
    return run_cases(cases, rank, world_size)


@functools.lru_cache(maxsize=None)
def _suite_results(world_size):
    return run_ranks(_suite, world_size, timeout=240)


@pytest.mark.parametrize("world_size,case", [(w, c) for w in (2, 4) for c in _cases(w)])
def test_data_parallel(world_size, case):
    if not _layer_exists(case.split("-")[0]):
        pytest.skip(f"selfattn.{case.split('-')[0]} does not exist yet")
    case_results(_suite_results(world_size), case)
