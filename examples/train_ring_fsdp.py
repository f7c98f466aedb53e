"""Trains a small causal language model on CPU with selfattn under FSDP2 and ring attention.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 examples/train_ring_fsdp.py

Every rank holds the same batch of sequences but only its zigzag chunk of each (context
parallelism: the attention runs as ``selfattn.distributed.ring_attention`` over the ranks), and
FSDP2 (``fully_shard``) shards the parameters over the same ranks. Each rank's loss is the mean
over its tokens; FSDP2 averages the gradients, which is the mean over all tokens (equal chunks).
The task: copy a random token sequence shifted by one — learnable only by attending backwards.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import selfattn.distributed as sd

VOCAB, EMBED, HEADS, SEQ, BATCH, STEPS = 32, 64, 4, 64, 8, 60


class RingAttention(nn.Module):
    """Causal multi-head self-attention over a sequence split across the ranks of ``group``."""

    def __init__(self, group):
        super().__init__()
        self.qkv = nn.Linear(EMBED, 3 * EMBED)
        self.out = nn.Linear(EMBED, EMBED)
        self.group = group

    def forward(self, x):  # x: this rank's chunk, (B, n, E)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, EMBED // HEADS).permute(2, 0, 3, 1, 4)
        o = sd.ring_attention(q, k, v, group=self.group, causal=True, layout="zigzag")
        return self.out(o.transpose(1, 2).reshape(b, n, EMBED))


class Model(nn.Module):
    def __init__(self, group):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.pos = nn.Parameter(torch.randn(SEQ, EMBED) * 0.02)
        self.blocks = nn.ModuleList([RingAttention(group) for _ in range(2)])
        self.head = nn.Linear(EMBED, VOCAB)

    def forward(self, tokens, positions):
        h = self.embed(tokens) + self.pos[positions]
        for block in self.blocks:
            h = h + block(nn.functional.layer_norm(h, (EMBED,)))
        return self.head(h)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Model(dist.group.WORLD)
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    positions = sd.split_sequence(torch.arange(SEQ), world, rank, layout="zigzag", dim=0)
    gen = torch.Generator().manual_seed(1)  # the same batches on every rank
    for step in range(STEPS):
        tokens = torch.randint(VOCAB, (BATCH, SEQ + 1), generator=gen)
        inputs, targets = tokens[:, 1:], tokens[:, :-1].clone()  # predict the previous token
        targets[:, 0] = -1  # (the first has none)
        mine = sd.split_sequence(inputs, world, rank, layout="zigzag", dim=1)
        wanted = sd.split_sequence(targets, world, rank, layout="zigzag", dim=1)
        logits = model(mine, positions)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), wanted.flatten(), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and (step % 10 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  loss {total.item() / world:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main()
