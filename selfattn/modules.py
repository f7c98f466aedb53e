"""nn.Module over the fused self-attention op."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from .ops import self_attention


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with packed Q/K/V projections, on the fused
    C++/CUDA op.

    Input (N, E) or (B, N, E) -> output (…, N, M), heads side by side, no output projection.
    Parameters use nn.MultiheadAttention's names: ``in_proj_weight`` ((H + 2·Hkv)·D, E), with
    D = M / H, holds [W_q; W_k; W_v] in nn.Linear layout — q heads, then k heads, then v heads —
    and ``in_proj_bias`` the same rows (or None). ``num_kv_heads`` = Hkv (default H) must divide
    ``num_heads`` = H: grouped-query attention, 1 for multi-query. ``scale=None`` is 1/sqrt(D);
    ``causal`` masks as F.scaled_dot_product_attention; ``window=(left, right)`` keeps keys
    i - left <= j <= i + right (-1 unbounded). ``forward(x, key_padding_mask=None,
    attn_mask=None)`` takes the masks of ``selfattn.self_attention`` — key_padding_mask True = a
    real token (the inverse of nn.MultiheadAttention's). ``dropout`` is the attention dropout
    probability, applied in training mode only (as nn.MultiheadAttention's).

    Score modifications (``selfattn.attention``'s meaning): ``softcap`` (0 = off); ``alibi_slopes``,
    a float32 (H,) tensor kept as a buffer (not trained); ``sinks=True`` creates a learnable
    zero-initialised (H,) ``nn.Parameter`` ``sinks`` (GPT-OSS's), a tensor is taken as given
    (registered as a parameter when it is one, as a buffer otherwise).
    """

    def __init__(self, embed_dim: int, model_dim: int, num_heads: int = 1, bias: bool = False,
                 causal: bool = False, scale: Optional[float] = None, num_kv_heads: Optional[int] = None,
                 window: Optional[tuple] = None, dropout: float = 0.0, softcap: float = 0.0,
                 alibi_slopes: Optional[Tensor] = None, sinks=None, device=None, dtype=None):
        super().__init__()
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for value, name in ((embed_dim, "embed_dim"), (model_dim, "model_dim"), (num_heads, "num_heads"),
                            (kv_heads, "num_kv_heads")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SelfAttention: {name} must be an int >= 1, got {value!r}")
        if model_dim % num_heads != 0:
            raise ValueError(f"SelfAttention: model_dim ({model_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if num_heads % kv_heads != 0:
            raise ValueError(f"SelfAttention: num_kv_heads ({kv_heads}) must divide num_heads ({num_heads})")
        if window is not None:
            if (not isinstance(window, (tuple, list)) or len(window) != 2
                    or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)):
                raise ValueError(f"SelfAttention: window must be None or (left, right), ints >= -1 "
                                 f"(-1: unbounded), got {window!r}")
            window = (int(window[0]), int(window[1]))
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"SelfAttention: dropout must be a float in [0, 1), got {dropout!r}")
        self.embed_dim = embed_dim
        self.model_dim = model_dim
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = model_dim // num_heads
        self.causal = causal
        self.scale = scale
        self.window = window
        self.dropout = float(dropout)
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0.0:
            raise ValueError(f"SelfAttention: softcap must be a float >= 0 (0 = off), got {softcap!r}")
        self.softcap = float(softcap)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("alibi_slopes", alibi_slopes)
        if sinks is True:
            self.sinks = nn.Parameter(torch.zeros(num_heads, **factory))
        elif isinstance(sinks, nn.Parameter):
            self.sinks = sinks
        elif isinstance(sinks, Tensor):
            self.register_buffer("sinks", sinks)
        elif sinks is None or sinks is False:
            self.sinks = None
        else:
            raise ValueError(f"SelfAttention: sinks must be True, a tensor or None, got {type(sinks).__name__}")
        rows = (num_heads + 2 * kv_heads) * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(rows, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # What nn.Linear(embed_dim, ·) layers for q, k and v would start from.
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))
        if self.in_proj_bias is not None:
            bound = 1.0 / math.sqrt(self.embed_dim)
            nn.init.uniform_(self.in_proj_bias, -bound, bound)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.embed_dim:
            raise ValueError(f"SelfAttention: input must be (N, E) or (B, N, E) with E = embed_dim = "
                             f"{self.embed_dim}, got shape {tuple(x.shape)}")
        return self_attention(x, self.in_proj_weight, self.in_proj_bias, num_heads=self.num_heads,
                              num_kv_heads=self.num_kv_heads, causal=self.causal, scale=self.scale,
                              key_padding_mask=key_padding_mask, attn_mask=attn_mask, window=self.window,
                              dropout_p=self.dropout if self.training else 0.0, softcap=self.softcap,
                              alibi_slopes=self.alibi_slopes, sinks=self.sinks)

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
        extra = ""
        if self.num_kv_heads != self.num_heads:
            extra += f", num_kv_heads={self.num_kv_heads}"
        if self.window is not None:
            extra += f", window={self.window}"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.softcap:
            extra += f", softcap={self.softcap}"
        if self.alibi_slopes is not None:
            extra += ", alibi_slopes"
        if self.sinks is not None:
            extra += ", sinks"
        return (f"embed_dim={self.embed_dim}, model_dim={self.model_dim}, num_heads={self.num_heads}, "
                f"bias={self.in_proj_bias is not None}, causal={self.causal}, scale={self.scale}{extra}")
