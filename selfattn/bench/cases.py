"""What is benchmarked: shapes, cases, levels (what a level's implementations take and the FLOPs
they are credited with) and the named sweeps. See the package docstring for how to add to them."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from .variants import VARIANTS, Variant

MODES = ("fwd", "fwd+bwd", "bwd")
MEMORY_MODES = ("fwd", "fwd+bwd")  # bwd alone is not measured: its peak is fwd+bwd's
MIB = 2.0**20
GIB = 2.0**30

# The dtypes a case may have, with the short names the plot uses.
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


@dataclass(frozen=True)
class Shape:
    """A layer's shape: input (batch, seq, embed), model_dim = embed, heads of embed/heads."""

    batch: int
    seq: int
    embed: int
    heads: int
    timed: bool = True  # False: a memory point, measured for memory only

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads

    def label(self) -> str:
        return f"({self.batch}, {self.seq}, {self.embed}, {self.heads})"


@dataclass(frozen=True)
class Case:
    """One point of a sweep; every level and mode runs on it. Hashable: the report groups by it."""

    shape: Shape
    causal: bool
    dtype: str
    variant: str = ""  # the masks level: a key of variants.VARIANTS

    @property
    def variant_spec(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def kv_heads(self) -> int:
        return self.shape.heads // self.variant_spec.kv_groups if self.variant else self.shape.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def label(self) -> str:
        variant = f" {self.variant}" if self.variant else ""
        return f"{self.shape.label()} {self.dtype} {'causal' if self.causal else 'non-causal'}{variant}"

    def to_json(self) -> dict:
        s = self.shape
        d = {"batch": s.batch, "seq": s.seq, "embed": s.embed, "heads": s.heads, "head_dim": s.head_dim,
             "causal": self.causal, "dtype": self.dtype, "timed": s.timed}
        return dict(d, variant=self.variant, kv_heads=self.kv_heads) if self.variant else d

    @staticmethod
    def from_json(d: dict) -> "Case":
        return Case(Shape(d["batch"], d["seq"], d["embed"], d["heads"], d.get("timed", True)),
                    d["causal"], d["dtype"], d.get("variant", ""))


def parse_shapes(text: str) -> Tuple[Shape, ...]:
    """'8x512x512x8,2x2048x512x8' (B x N x E x H) -> shapes."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"shape {item!r}: expected BxNxExH, e.g. 8x512x512x8")
        b, n, e, h = map(int, parts)
        if e % h:
            raise argparse.ArgumentTypeError(f"shape {item!r}: E = {e} is not divisible by H = {h}")
        shapes.append(Shape(b, n, e, h))
    return tuple(shapes)


# ---------------------------------------------------------------------------------------------
# FLOPs: the package docstring's count. Causal eager and reference compute every score and mask;
# they are credited with the useful FLOPs only, like everyone.

BACKWARD_FACTOR = {"attention": 2.5, "linear": 2.0}


def _by_mode(forward: float, kind: str, mode: str) -> float:
    backward = BACKWARD_FACTOR[kind] * forward
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def attention_flops(shape: Shape, causal: bool, mode: str) -> float:
    forward = 4.0 * shape.batch * shape.heads * shape.seq * shape.seq * shape.head_dim
    return _by_mode(forward / 2 if causal else forward, "attention", mode)


def pairs_flops(pairs: float, head_dim: int, mode: str) -> float:
    """Attention over `pairs` visible (query, key) pairs (all batches and heads): 4·D per pair forward."""
    return _by_mode(4.0 * pairs * head_dim, "attention", mode)


def projection_flops(shape: Shape, mode: str) -> float:
    return _by_mode(6.0 * shape.batch * shape.seq * shape.embed * shape.embed, "linear", mode)


def out_projection_flops(shape: Shape, mode: str) -> float:
    """nn.MultiheadAttention's extra work: its (M -> E) output projection."""
    return _by_mode(2.0 * shape.batch * shape.seq * shape.embed * shape.embed, "linear", mode)


# ---------------------------------------------------------------------------------------------
# Levels: what the implementations of a level take (random tensors of the case's dtype; the
# output has the first input's shape), the FLOPs they are credited with, and the report's title.


@dataclass(frozen=True)
class Level:
    input_shapes: Callable[[Case], List[Tuple[int, ...]]]
    flops: Callable[[Case, str], float]  # (case, mode) -> FLOPs of one call
    title: Callable[[Case], str]


LEVELS: Dict[str, Level] = {
    "core": Level(
        input_shapes=lambda c: [(c.shape.batch, c.shape.heads, c.shape.seq, c.shape.head_dim)] * 3,
        flops=lambda c, mode: attention_flops(c.shape, c.causal, mode),
        title=lambda c: f"attention core, q k v (B, H, N, D) = "
                        f"({c.shape.batch}, {c.shape.heads}, {c.shape.seq}, {c.shape.head_dim})"),
    "layer": Level(
        input_shapes=lambda c: [(c.shape.batch, c.shape.seq, c.shape.embed)],
        flops=lambda c, mode: attention_flops(c.shape, c.causal, mode) + projection_flops(c.shape, mode),
        title=lambda c: f"whole layer, x (B, N, E) = ({c.shape.batch}, {c.shape.seq}, {c.shape.embed}), "
                        f"{c.shape.heads} heads, M = E"),
    # A masked variant of the core (variants.py); FLOPs: its visible pairs, 4·D each forward.
    "masks": Level(
        input_shapes=lambda c: [(c.shape.batch, c.shape.heads, c.shape.seq, c.shape.head_dim)]
                               + [(c.shape.batch, c.kv_heads, c.shape.seq, c.shape.head_dim)] * 2,
        flops=lambda c, mode: pairs_flops(c.variant_spec.pairs(c), c.shape.head_dim, mode),
        title=lambda c: f"{c.variant}: {c.variant_spec.title}, q (B, Hq, N, D) = ({c.shape.batch}, "
                        f"{c.shape.heads}, {c.shape.seq}, {c.shape.head_dim}), Hk = {c.kv_heads}"),
}
MASKS_LEVEL = "masks"  # the level of the cases with a variant, and only of those


def input_shapes(case: Case, level: str) -> List[Tuple[int, ...]]:
    return LEVELS[level].input_shapes(case)


def output_shape(case: Case, level: str) -> Tuple[int, ...]:
    return input_shapes(case, level)[0]


def set_bytes(case: Case, level: str) -> int:
    """One input set: the inputs and a gradient for the output."""
    shapes = input_shapes(case, level) + [output_shape(case, level)]
    return sum(math.prod(shape) for shape in shapes) * case.itemsize


def case_flops(case: Case, level: str, mode: str) -> float:
    return LEVELS[level].flops(case, mode)


def case_title(case: Case, level: str) -> str:
    return f"{LEVELS[level].title(case)}, {case.dtype}, {'causal' if case.causal else 'non-causal'}"


# ---------------------------------------------------------------------------------------------
# Sweeps: each shape runs in every dtype, causal and not (unless --causal), at each level.


@dataclass(frozen=True)
class Sweep:
    shapes: Tuple[Shape, ...]
    dtypes: Tuple[str, ...] = ("float32", "bfloat16")
    levels: Tuple[str, ...] = ("core", "layer")
    modes: Tuple[str, ...] = ("fwd", "fwd+bwd")
    note: str = ""
    cases: Tuple[Case, ...] = ()  # instead of shapes × dtypes × causal: these (--shapes: each at those shapes)
    memory: bool = True  # measured unless --no-memory (False: only with --memory)


SWEEPS: Dict[str, Sweep] = {
    "default": Sweep((Shape(8, 128, 512, 8), Shape(8, 512, 512, 8), Shape(2, 2048, 512, 8),
                      Shape(1, 8192, 512, 8, timed=False)),
                     note="N = 8192 is a memory point (not timed; --shapes 1x8192x512x8 times it)"),
    "quick": Sweep((Shape(2, 256, 256, 4), Shape(1, 1024, 512, 8)),
                   note="the tutorial's module is timed at N = 256 only (seconds a call at N = 1024)"),
    # FlashAttention's benchmark: batch·seqlen = 16384, heads·head_dim = 2048.
    "fa": Sweep(tuple(Shape(16384 // n, n, 2048, 2048 // d) for d in (64, 128)
                      for n in (512, 1024, 2048, 4096, 8192)),
                dtypes=("bfloat16",), levels=("core",), modes=("fwd", "bwd"),
                note="FlashAttention's benchmark shapes (batch·seqlen = 16384, heads·head_dim = 2048)"),
    # The every-CPU targets (--sweep isa runs them once per instruction-set cap).
    "targets": Sweep((Shape(8, 512, 512, 8), Shape(2, 2048, 512, 8)), memory=False,
                     note="the every-CPU targets: core and layer, float32 and bfloat16"),
    # Issue 9's cases: each variant against selfattn without it and SDPA given the same inputs.
    "masks": Sweep((), dtypes=("float32",), levels=(MASKS_LEVEL,), memory=False,
                   cases=(Case(Shape(8, 512, 512, 8), False, "float32", "padding"),
                          Case(Shape(8, 512, 512, 8), False, "float32", "varlen"),
                          Case(Shape(1, 1024, 2048, 32), False, "float32", "gqa"),
                          Case(Shape(1, 4096, 512, 8), True, "float32", "window"),
                          Case(Shape(8, 512, 512, 8), False, "float32", "random")),
                   note="masked variants (issue 9); memory not measured unless --memory"),
}
