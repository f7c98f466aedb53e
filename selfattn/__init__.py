"""selfattn: fused self-attention for PyTorch, as a C++/CUDA operator.

    selfattn.attention(q, k, v, causal=False, scale=None)          # like F.scaled_dot_product_attention
    selfattn.self_attention(x, w_qkv, b_qkv=None, num_heads=1)      # projections + attention, fused
    selfattn.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,  # packed variable-length sequences,
                              max_seqlen_q, max_seqlen_k)           # FlashAttention's layout
    selfattn.SelfAttention(embed_dim, model_dim, num_heads=1)       # nn.Module over the fused op
    selfattn.MultiheadAttention(embed_dim, num_heads, ...)          # drop-in for nn.MultiheadAttention
    selfattn.swap_attention(model)                                  # ... in place of every one in a model
    selfattn.reference.SelfAttention(...)                           # the tutorial's five steps, literally
    selfattn.dropout_mask(rng_state, (B, Hq, Nq, Nk), dropout_p)    # the keep mask of a dropout call
    selfattn.distributed.ring_attention(q, k, v, group=...)         # the sequence split across ranks
"""

from . import _load

_load.load()

from . import reference, rng  # noqa: E402
from .mha import MultiheadAttention, swap_attention  # noqa: E402
from .modules import SelfAttention  # noqa: E402
from .ops import attention, self_attention  # noqa: E402
from .rng import dropout_mask  # noqa: E402
from .varlen import attention_varlen  # noqa: E402


def __getattr__(name):
    # selfattn.distributed on first use: it imports torch.distributed's pieces, which plain
    # single-process use does not need.
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'selfattn' has no attribute {name!r}")


def build_info() -> _load.BuildInfo:
    """Which build of the C++ library this process loaded (compiled or jit), how it was built,
    and which copy of the CPU kernels runs (``cpu_capability``: DEFAULT, AVX2 or AVX512, chosen
    for this CPU at run time among the compiled ``cpu_capabilities``)."""
    return _load.build_info()


__all__ = ["attention", "attention_varlen", "self_attention", "SelfAttention", "MultiheadAttention", "swap_attention",
           "reference", "build_info", "dropout_mask", "rng"]
__version__ = "0.1.0"
