"""The selfattn ops' overloads, looked up once (for _autograd.py and _vmap.py, which call them
directly: `torch.ops.selfattn.x` resolves the overload at every call)."""

import torch

_attention_fwd = torch.ops.selfattn.attention_fwd.default
_attention_bwd = torch.ops.selfattn.attention_bwd.default
_attention_jvp = torch.ops.selfattn.attention_jvp.default
_self_attention_fwd = torch.ops.selfattn.self_attention_fwd.default
_self_attention_bwd = torch.ops.selfattn.self_attention_bwd.default
_varlen_attention_fwd = torch.ops.selfattn.varlen_attention_fwd.default
_varlen_attention_bwd = torch.ops.selfattn.varlen_attention_bwd.default
