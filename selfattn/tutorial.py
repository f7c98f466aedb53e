"""The tutorial's worked example: 3 tokens, embed dim 4, model dim 3, unscaled scores.

The video does not show its weight matrices, so these are invented small integers, written
(E, M) as the tutorial writes them (query = inputs @ W_QUERY); a linear layer holds the transpose.
"""

from __future__ import annotations

import torch

from . import reference

INPUTS = [[1, 0, 1, 0], [0, 2, 0, 1], [1, 1, 0, 1]]
W_QUERY = [[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1]]
W_KEY = [[0, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 0]]
W_VALUE = [[1, 2, 0], [0, 1, 1], [2, 0, 1], [1, 0, 3]]


def inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(INPUTS, dtype=dtype)


def reference_module(dtype=torch.float32) -> reference.SelfAttention:
    """The tutorial's module with the known weights loaded (its last step), scale 1.0."""
    module = reference.SelfAttention(embed_dim=4, model_dim=3, scale=1.0).to(dtype)
    with torch.no_grad():
        module.to_query.weight.copy_(torch.tensor(W_QUERY, dtype=dtype).t())
        module.to_key.weight.copy_(torch.tensor(W_KEY, dtype=dtype).t())
        module.to_value.weight.copy_(torch.tensor(W_VALUE, dtype=dtype).t())
    return module
