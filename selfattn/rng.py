"""Dropout's random numbers: the (seed, offset) each call draws, and the keep mask they decide.

The kernels keep element (b, h, i, j) of a (B, Hq, Nq, Nk) attention when a Philox4x32-10 output
(csrc/philox.h) is at least ``floor(p · 2^32)``: counter (j // 4, i, h, b), word j % 4, under a
key that is itself Philox of (offset, 0, 0, 0) under the seed. So the mask is a pure function of
(seed, offset, b, h, i, j): no thread count or tiling changes it, and the backward regenerates it
from the same ``rng_state``. For varlen attention, b is the sequence index and i, j the row and
key within the sequence. Kept probabilities are scaled by 1 / (1 - p).

:func:`dropout_mask` computes the same decisions here, independently of the kernels, in torch
integer arithmetic (32-bit words in int64; a product of two of them wraps in int64 but keeps its
64 bits), for tests and debugging.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


_check_dropout_p = torch.ops.selfattn._check_dropout_p.default


def check_dropout_p(dropout_p: float) -> None:
    """dropout_p's range, [0, 1): out of it, the ops' own ValueError (csrc/checks.cpp, through the
    private op _check_dropout_p; under torch.compile, at trace time). The public functions check it
    before drawing an rng_state, so that a bad value consumes nothing from the generator. The op is
    called only for a bad value: a good call records no extra op (dispatch modes, compiled graphs)."""
    if not 0.0 <= dropout_p < 1.0:
        _check_dropout_p(dropout_p)


def draw_rng_state(device) -> Tensor:
    """A fresh (seed, offset), int64 (2,), drawn on ``device`` from its default generator.

    A traced random op (``torch.randint``): ``torch.manual_seed`` reproduces it, two calls give
    two states, ``torch.compile`` keeps two calls apart, and ``torch.utils.checkpoint``, which
    restores the generators before recomputing, draws the same state again."""
    return torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, device=device)


def philox4x32_10(counter: Sequence, key: Sequence) -> list:
    """Philox4x32-10 of 4 counter words under 2 key words: Python ints, or int64 tensors holding
    32-bit values (broadcasting together). Returns the 4 output words the same way."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = c0 * _M0, c2 * _M1
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK) ^ c1 ^ k0, p1 & _MASK, ((p0 >> 32) & _MASK) ^ c3 ^ k1, p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return [c0, c1, c2, c3]


def dropout_threshold(dropout_p: float) -> int:
    """The 32-bit threshold: a random word below it drops its element (csrc/philox.h)."""
    return min(int(dropout_p * 4294967296.0), _MASK)


def _call_key(seed: int, offset: int) -> tuple:
    words = philox4x32_10((offset & _MASK, (offset >> 32) & _MASK, 0, 0), (seed & _MASK, (seed >> 32) & _MASK))
    return words[0], words[1]


def dropout_mask(rng_state: Tensor, shape: Sequence[int], dropout_p: float) -> Tensor:
    """The keep mask the kernels apply for ``rng_state`` and ``dropout_p``: bool (B, Hq, Nq, Nk),
    True = kept, on rng_state's device.

    ``shape`` = (B, Hq, Nq, Nk) of the attention (for varlen, B = the number of sequences and
    Nq, Nk at least the longest: sequence s's rows and keys are ``mask[s, :, :nq_s, :nk_s]``).
    Element (b, h, i, j) depends on nothing else than (seed, offset, b, h, i, j). With the same
    ``rng_state``, ``selfattn.attention(q, k, v, dropout_p=p, rng_state=rng_state)`` equals
    ``softmax(scale · q kᵀ + mask) ∘ dropout_mask(...) / (1 - p) @ v``. Reads rng_state on the host.
    """
    check_dropout_p(dropout_p)
    if not isinstance(rng_state, Tensor) or rng_state.dtype != torch.int64 or rng_state.shape != (2,):
        raise ValueError("selfattn: rng_state must be an int64 tensor of shape (2,) = (seed, offset)")
    batch, heads, nq, nk = (int(n) for n in shape)
    seed, offset = (int(x) for x in rng_state.tolist())
    key = _call_key(seed, offset)
    device = rng_state.device

    def index(n: int, dim: int) -> Tensor:
        view = [1, 1, 1, 1]
        view[dim] = n
        return torch.arange(n, dtype=torch.int64, device=device).view(view)

    key_blocks = (nk + 3) // 4
    words = philox4x32_10((index(key_blocks, 3), index(nq, 2), index(heads, 1), index(batch, 0)), key)
    full = [batch, heads, nq, key_blocks]
    words = torch.stack([w.expand(full) for w in words], dim=-1).reshape(batch, heads, nq, 4 * key_blocks)
    return words[..., :nk] >= dropout_threshold(dropout_p)
