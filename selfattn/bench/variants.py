"""The masked variants of the attention core (the ``masks`` level and sweep): what each gives
selfattn beyond q, k and v, the masks and sequence lengths (drawn from a fixed seed, so every
implementation of a case gets the same ones, built once and never timed), the visible (query,
key) pairs each row's problem has (its FLOP count), and the targets the summary checks.

Each variant's case runs four kinds of row (``impls.py``): ``selfattn`` with the variant,
``selfattn plain`` (the same shape without the variant: selfattn's own no-variant time),
``sdpa`` given the same inputs, and, for varlen only, ``selfattn separate`` (one call per
sequence). Here nothing but torch is imported: cases.py and impls.py build on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import selfattn

if TYPE_CHECKING:  # cases.py imports this module
    from .cases import Case

SEED = 0  # lengths and random masks: torch.Generator().manual_seed(SEED), on the CPU


@dataclass(frozen=True)
class Target:
    """An issue's goal for one comparison row. ``at_most``: selfattn's time over the row's,
    t_selfattn / t_row ≤ bound; otherwise the row's over selfattn's, t_row / t_selfattn ≥ bound."""

    impl: str
    bound: float
    at_most: bool

    def text(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}"

    def met(self, ratio: float) -> bool:
        return ratio <= self.bound if self.at_most else ratio >= self.bound


# The comparison rows and the direction each one's ratio is shown in (that of its targets).
COMPARISONS: Tuple[Tuple[str, bool, str], ...] = (  # (impl, at_most, column head)
    ("selfattn plain", True, "own: t / t_plain"),
    ("sdpa", False, "SDPA: t_sdpa / t"),
    ("selfattn separate", True, "separate: t / t_sep"),
)


@dataclass(frozen=True)
class Variant:
    """One masked variant. ``pairs``: the (query, key) pairs its problem must compute, summed
    over batch and query heads (its FLOP count is 4·D per pair forward, backward 2.5×);
    ``sdpa_pairs`` those of SDPA's problem when it differs (varlen: SDPA runs the padded batch
    with the padding mask). The plain row's problem has ``plain_pairs``."""

    title: str
    plain: str  # what the plain row runs, shown next to its name
    sdpa: str  # what SDPA is given
    pairs: Callable[["Case"], float]
    sdpa_pairs: Optional[Callable[["Case"], float]] = None
    kv_groups: int = 1  # GQA: Hq / Hk
    window: Tuple[int, int] = (-1, -1)
    separate: bool = False  # the 'selfattn separate' row runs (varlen)
    requires: str = ""  # a selfattn attribute the variant needs; the case is skipped without it
    targets: Tuple[Target, ...] = ()

    def unavailable(self) -> str:
        """Why this build cannot run the variant ('' when it can)."""
        if self.requires and not hasattr(selfattn, self.requires):
            return f"selfattn.{self.requires} is not in this build: case skipped"
        return ""

    def target(self, impl: str) -> Optional[Target]:
        return next((t for t in self.targets if t.impl == impl), None)


# ---------------------------------------------------------------------------------------------
# Lengths and masks, from the fixed seed; cached per case (and device), so built once.


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


@functools.lru_cache(maxsize=None)
def lengths(batch: int, seq: int) -> Tuple[int, ...]:
    """Each batch entry's length, uniform in [N/2, N]."""
    return tuple(torch.randint(seq // 2, seq + 1, (batch,), generator=_generator()).tolist())


def case_lengths(case: "Case") -> Tuple[int, ...]:
    return lengths(case.shape.batch, case.shape.seq)


def cu_seqlens(case: "Case", device: torch.device) -> Tensor:
    """FlashAttention's (S + 1,) int32 offsets of the packed sequences."""
    offsets = [0]
    for n in case_lengths(case):
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=8)
def padding_mask(case: "Case", device: torch.device) -> Tensor:
    """(B, 1, 1, N) bool, True = a real key (SDPA's meaning)."""
    n = torch.tensor(case_lengths(case), device=device)
    return (torch.arange(case.shape.seq, device=device) < n[:, None]).view(case.shape.batch, 1, 1, -1)


@functools.lru_cache(maxsize=4)
def random_mask(case: "Case", device: torch.device) -> Tensor:
    """(B, H, N, N) bool, each element True with probability 1/2."""
    s = case.shape
    return (torch.rand(s.batch, s.heads, s.seq, s.seq, generator=_generator()) < 0.5).to(device)


@functools.lru_cache(maxsize=4)
def window_mask(case: "Case", device: torch.device) -> Tensor:
    """(N, N) bool: the variant's band (window, and causal if the case is) as a dense mask."""
    left, right = case.variant_spec.window
    i = torch.arange(case.shape.seq, device=device)[:, None]
    j = torch.arange(case.shape.seq, device=device)[None, :]
    visible = torch.ones(case.shape.seq, case.shape.seq, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    if case.causal:
        visible &= j <= i
    return visible


def pack(padded: Tensor, case: "Case") -> Tensor:
    """(B, H, N, D) -> (T, H, D): each entry's first n_b rows, back to back."""
    return torch.cat([padded[b, :, :n].transpose(0, 1) for b, n in enumerate(case_lengths(case))])


def unpack_views(packed: Tensor, case: "Case") -> List[Tensor]:
    """(T, H, D) -> one (1, H, n_s, D) view per sequence (no copy)."""
    views, start = [], 0
    for n in case_lengths(case):
        views.append(packed[start:start + n].unsqueeze(0).transpose(1, 2))
        start += n
    return views


# ---------------------------------------------------------------------------------------------
# Visible (query, key) pairs, summed over batch and query heads, causal counted when the case is.


def _band_pairs(nq: int, nk: int, causal: bool) -> int:
    """Pairs of an nq × nk block, all visible or (causal, top-left) those with j <= i."""
    if not causal:
        return nq * nk
    return sum(min(i + 1, nk) for i in range(nq))


def plain_pairs(case: "Case") -> float:
    """The plain row's problem: the case's shape, causal or not, without the variant."""
    s = case.shape
    return float(s.batch * s.heads * _band_pairs(s.seq, s.seq, case.causal))


def padding_pairs(case: "Case") -> float:
    """Every query row (padded ones too: they are part of the output) sees its entry's n_b keys."""
    s = case.shape
    return float(s.heads * sum(_band_pairs(s.seq, n, case.causal) for n in case_lengths(case)))


def varlen_pairs(case: "Case") -> float:
    return float(case.shape.heads * sum(_band_pairs(n, n, case.causal) for n in case_lengths(case)))


def window_pairs(case: "Case") -> float:
    return float(case.shape.batch * case.shape.heads * int(window_mask(case, torch.device("cpu")).sum()))


def random_pairs(case: "Case") -> float:
    mask = random_mask(case, torch.device("cpu"))
    return float((mask.tril() if case.causal else mask).sum())


VARIANTS: Dict[str, Variant] = {
    "padding": Variant(
        "key padding mask (B, 1, 1, N) bool, lengths uniform in [N/2, N]", plain="no mask",
        sdpa="the same mask", pairs=padding_pairs,
        targets=(Target("selfattn plain", 0.87, True), Target("sdpa", 1.0, False))),
    "varlen": Variant(
        "packed varlen (T, H, D), attention_varlen, the padding case's lengths", plain="padded batch, no mask",
        sdpa="the padded batch with the padding mask", pairs=varlen_pairs,
        sdpa_pairs=padding_pairs, separate=True, requires="attention_varlen",
        targets=(Target("selfattn plain", 0.72, True), Target("sdpa", 1.3, False),
                 Target("selfattn separate", 1.1, True))),
    "gqa": Variant(
        "GQA, Hk = Hq / 4, enable_gqa=True", plain="k, v repeated to Hq (repeat not timed)",
        sdpa="enable_gqa=True", pairs=plain_pairs, kv_groups=4,
        targets=(Target("selfattn plain", 1.02, True), Target("sdpa", 1.0, False))),
    "window": Variant(
        "sliding window (left 255, right 0)", plain="no window (dense, causal as the case)",
        sdpa="the equivalent dense (N, N) bool mask", pairs=window_pairs,
        window=(255, 0), targets=(Target("selfattn plain", 0.2, True),)),
    "random": Variant(
        "dense random bool mask (B, H, N, N), 50 % True", plain="no mask", sdpa="the same mask",
        pairs=random_pairs, targets=(Target("sdpa", 1.0, False),)),
}
