"""The tutorial's self-attention in plain PyTorch, following its five steps literally.

1. query, key and value from the input vectors by three linear layers;
2. attention scores: query times key transposed;
3. softmax over the last dimension turns each query's scores into a probability distribution;
4. weighted values: the score of (query i, key j) multiplies value j. As in the tutorial, the
   transposed scores get a new last axis and the values a new middle axis, so that a plain
   broadcast multiply forms every (key, query, value) product;
5. the weighted values of each query are summed over the keys.

It builds a (…, Nk, Nq, D) tensor of products, which is what makes it slow and memory-hungry
(B·N²·M elements): it exists to check the fused op against, not to be used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def attention(query: Tensor, key: Tensor, value: Tensor, causal: bool = False,
              scale: float | None = None) -> Tensor:
    """Steps 2-5 on query (…, Nq, D), key (…, Nk, D), value (…, Nk, Dv) -> (…, Nq, Dv)."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    # 2. Attention scores.
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if causal:  # top-left aligned, as in F.scaled_dot_product_attention: query i sees keys j <= i
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    # 3. Scores into probability distributions.
    probs = torch.softmax(scores, dim=-1)
    # 4. Weighted values: (…, Nk, Nq, 1) * (…, Nk, 1, Dv) -> (…, Nk, Nq, Dv).
    probs_formatted = probs.transpose(-2, -1)[..., :, :, None]
    value_formatted = value[..., :, None, :]
    weighted = probs_formatted * value_formatted
    # 5. Sum the weighted values of each query over the keys.
    return weighted.sum(dim=-3)


class SelfAttention(nn.Module):
    """Multi-head self-attention in the tutorial's five steps; input (N, E) or (B, N, E).

    ``scale=None`` is 1/sqrt(head_dim), the convention of F.scaled_dot_product_attention;
    ``scale=1.0`` is the tutorial's unscaled form. There is no output projection.
    """

    def __init__(self, embed_dim: int, model_dim: int, num_heads: int = 1, bias: bool = False,
                 causal: bool = False, scale: float | None = None):
        super().__init__()
        if num_heads < 1 or model_dim % num_heads != 0:
            raise ValueError(f"model_dim ({model_dim}) must be divisible by num_heads ({num_heads}), "
                             "which must be >= 1")
        self.embed_dim = embed_dim
        self.model_dim = model_dim
        self.num_heads = num_heads
        self.causal = causal
        self.scale = scale
        self.to_query = nn.Linear(embed_dim, model_dim, bias=bias)
        self.to_key = nn.Linear(embed_dim, model_dim, bias=bias)
        self.to_value = nn.Linear(embed_dim, model_dim, bias=bias)

    def forward(self, inputs: Tensor) -> Tensor:
        # 1. Query, key and value from the input vectors.
        query = self.to_query(inputs)
        key = self.to_key(inputs)
        value = self.to_value(inputs)
        # Heads: (…, N, M) -> (…, H, N, D).
        heads = self.num_heads
        query, key, value = (t.unflatten(-1, (heads, -1)).transpose(-3, -2) for t in (query, key, value))
        # 2-5. Scores, softmax, weighted values, sum.
        out = attention(query, key, value, causal=self.causal, scale=self.scale)
        # Heads back side by side: (…, H, N, D) -> (…, N, M).
        return out.transpose(-3, -2).flatten(-2)
