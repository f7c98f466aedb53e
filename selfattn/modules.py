"""nn.Module over the fused self-attention op."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from .ops import self_attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with packed Q/K/V projections, on the fused C++/CUDA op.

    Input (N, E) or (B, N, E) -> output (…, N, M), heads side by side, no output projection.
    Parameters use nn.MultiheadAttention's names: ``in_proj_weight`` (3M, E) holds
    [W_q; W_k; W_v] in nn.Linear layout and ``in_proj_bias`` (3M) their biases (or None).
    ``scale=None`` is 1/sqrt(M / num_heads); ``causal`` masks as F.scaled_dot_product_attention.
    """

    def __init__(self, embed_dim: int, model_dim: int, num_heads: int = 1, bias: bool = False,
                 causal: bool = False, scale: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        for value, name in ((embed_dim, "embed_dim"), (model_dim, "model_dim"), (num_heads, "num_heads")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SelfAttention: {name} must be an int >= 1, got {value!r}")
        if model_dim % num_heads != 0:
            raise ValueError(f"SelfAttention: model_dim ({model_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        self.embed_dim = embed_dim
        self.model_dim = model_dim
        self.num_heads = num_heads
        self.causal = causal
        self.scale = scale
        factory = {"device": device, "dtype": dtype}
        self.in_proj_weight = nn.Parameter(torch.empty(3 * model_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * model_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # What three nn.Linear(embed_dim, model_dim) layers would start from.
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))
        if self.in_proj_bias is not None:
            bound = 1.0 / math.sqrt(self.embed_dim)
            nn.init.uniform_(self.in_proj_bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.embed_dim:
            raise ValueError(f"SelfAttention: input must be (N, E) or (B, N, E) with E = embed_dim = "
                             f"{self.embed_dim}, got shape {tuple(x.shape)}")
        return self_attention(x, self.in_proj_weight, self.in_proj_bias, num_heads=self.num_heads,
                              causal=self.causal, scale=self.scale)

    @classmethod
    def from_reference(cls, ref: reference.SelfAttention) -> "SelfAttention":
        """The same layer as a reference.SelfAttention, with its weights (the tutorial's step of
        loading known weight matrices)."""
        has_bias = ref.to_query.bias is not None
        weight = ref.to_query.weight
        module = cls(ref.embed_dim, ref.model_dim, ref.num_heads, bias=has_bias, causal=ref.causal,
                     scale=ref.scale, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.in_proj_weight.copy_(torch.cat([ref.to_query.weight, ref.to_key.weight, ref.to_value.weight]))
            if has_bias:
                module.in_proj_bias.copy_(torch.cat([ref.to_query.bias, ref.to_key.bias, ref.to_value.bias]))
        return module

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, model_dim={self.model_dim}, num_heads={self.num_heads}, "
                f"bias={self.in_proj_bias is not None}, causal={self.causal}, scale={self.scale}")
