"""selfattn under torch.distributed.

    ring_attention(q, k, v, group=..., causal=..., layout="contiguous" | "zigzag")  # ring.py
    split_sequence / unsplit_sequence                          # a rank's chunk of a sequence, and back
    SelfAttentionParallel, register_sharding_rules             # tensor_parallel.py (DTensor)

Data parallelism (DDP, FSDP2's fully_shard) needs nothing from here: the ops take the plain
tensors those wrappers hand the module. tensor_parallel imports torch.distributed.tensor, so it is
loaded on first use of one of its names (importing it registers the ops' sharding rules).
"""

from .ring import ring_attention, split_sequence, unsplit_sequence

_TENSOR_PARALLEL = ("SelfAttentionParallel", "register_sharding_rules")


def __getattr__(name):
    if name in _TENSOR_PARALLEL or name == "tensor_parallel":
        import importlib
        tensor_parallel = importlib.import_module(".tensor_parallel", __name__)  # (not `from .`: it recurses here)
        return tensor_parallel if name == "tensor_parallel" else getattr(tensor_parallel, name)
    raise AttributeError(f"module 'selfattn.distributed' has no attribute {name!r}")


__all__ = ["ring_attention", "split_sequence", "unsplit_sequence", *_TENSOR_PARALLEL]
