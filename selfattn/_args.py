"""The public functions' argument helpers, shared by ops.py, varlen.py and distributed/: type checks
of what a schema cannot check (a Python object that is not a tensor, a bool passed as an int),
scale=None, and dropout's rng_state drawn when none is given. The ops check everything else
themselves (csrc/checks.cpp), on every dispatch key."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import rng


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse and of all accumulation for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def require_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"selfattn: {name} must be a torch.Tensor, got {type(t).__name__}")


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"selfattn: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"selfattn: {name} must be a bool, got {type(value).__name__}")
    return value


def check_int(value, name: str):
    """An int (or a SymInt under torch.compile), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"selfattn: {name} must be an int, got {type(value).__name__}")
    return value


def dropout_args(dropout_p, rng_state, device) -> tuple:
    """(dropout_p, rng_state) for the op: p checked (before anything is drawn); rng_state drawn
    from ``device``'s default generator when p > 0 and none is given."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"selfattn: dropout_p must be a float, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    rng.check_dropout_p(dropout_p)
    if rng_state is not None:
        require_tensor(rng_state, "rng_state")
    elif dropout_p > 0.0:
        rng_state = rng.draw_rng_state(device)
    return dropout_p, rng_state
