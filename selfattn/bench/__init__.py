"""selfattn's benchmark: ``python -m selfattn.bench`` (``--help`` for the options).

What it measures, in one run:

* the **attention core**: ``selfattn.attention`` against ``F.scaled_dot_product_attention`` on
  the same (B, H, N, D) tensors (on CUDA, SDPA once per backend forced with ``sdpa_kernel``,
  and once with its own choice, each row naming the backend);
* the **whole layer**, input (B, N, E) -> packed projection to 3M (M = E, no bias) -> H heads,
  no output projection: the tutorial's module (``selfattn.reference``), eager matmul + softmax
  + matmul, ``F.linear`` + SDPA (the strongest fair baseline), ``nn.MultiheadAttention`` (which
  also runs its output projection: more work, counted in its FLOPs) and selfattn's fused
  ``SelfAttention``;
* in modes ``fwd`` (under ``torch.no_grad``), ``fwd+bwd`` (forward, then ``autograd.grad`` of
  the inputs and parameters) and, when asked, ``bwd`` (backward alone, on a retained graph).

How:

* **time**: every implementation of a group (plus a large GEMM) is warmed up, then timed in
  interleaved rounds, the order rotating each round; one sample is the mean of enough calls
  to last ``target`` ms (CPU: ``time.perf_counter``; CUDA: CUDA events). Inputs rotate over
  several sets so caches do not flatter. Reported: the median and min-max over the rounds;
  GFLOP/s (DESIGN.md's count: attention 4·B·H·N²·D forward, half when causal, backward 2.5×
  forward; projections 6·B·N·E·M forward, twice that backward); the percentage of the GEMM
  rate timed in the same rounds; selfattn's speedup over each other row = the median (min-max)
  of the per-round ratios t_row / t_selfattn.
* **memory**: CPU: in a child process per case, each implementation first runs once on a tiny
  input (to load its code), then the child returns freed memory to the OS (``malloc_trim``),
  resets its peak RSS (``/proc/self/clear_refs`` ← 5), and reads ``VmHWM`` − ``VmRSS`` around one
  call: the peak resident growth over a baseline that holds the inputs and parameters. Where
  clear_refs is refused, one fresh child per measurement uses ``ru_maxrss`` instead. CUDA:
  ``torch.cuda.max_memory_allocated`` over ``memory_allocated``, reset between measurements.
* **skips**: before anything runs, each implementation's peak is estimated from its
  algorithm (the tutorial's broadcast builds B·H·N²·D elements; eager keeps B·H·N² scores);
  one whose estimate exceeds the memory budget (default: 60 % of the memory available at start)
  is reported as skipped with its estimate — never run into the OOM killer.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import selfattn
from selfattn import _system

MODES = ("fwd", "fwd+bwd", "bwd")
MEMORY_MODES = ("fwd", "fwd+bwd")
LEVELS = ("core", "layer")
MIB = 2.0**20
GIB = 2.0**30
MIN_PAIRS = 7  # DESIGN.md: a ratio is the median of at least 7 interleaved pairs
CPU_GEMM_SIZE = 2048  # the GEMM rate: a square sgemm of this size (CPU), of the case's dtype (CUDA)
CUDA_GEMM_SIZE = 8192


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Shapes, sweeps and cases


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
class Sweep:
    shapes: Tuple[Shape, ...]
    dtypes: Tuple[str, ...] = ("float32", "bfloat16")
    levels: Tuple[str, ...] = LEVELS
    modes: Tuple[str, ...] = ("fwd", "fwd+bwd")
    note: str = ""


SWEEPS: Dict[str, Sweep] = {
    "default": Sweep((Shape(8, 128, 512, 8), Shape(8, 512, 512, 8), Shape(2, 2048, 512, 8),
                      Shape(1, 8192, 512, 8, timed=False)),
                     note="N = 8192 is a memory point (not timed; --shapes 1x8192x512x8 times it)"),
    "quick": Sweep((Shape(2, 256, 256, 4), Shape(1, 1024, 512, 8))),
    # FlashAttention's benchmark: batch·seqlen = 16384, heads·head_dim = 2048.
    "fa": Sweep(tuple(Shape(16384 // n, n, 2048, 2048 // d) for d in (64, 128)
                      for n in (512, 1024, 2048, 4096, 8192)),
                dtypes=("bfloat16",), levels=("core",), modes=("fwd", "bwd"),
                note="FlashAttention's benchmark shapes (batch·seqlen = 16384, heads·head_dim = 2048)"),
}


@dataclass(frozen=True)
class Case:
    shape: Shape
    causal: bool
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def label(self) -> str:
        return f"{self.shape.label()} {self.dtype} {'causal' if self.causal else 'non-causal'}"

    def to_json(self) -> dict:
        s = self.shape
        return {"batch": s.batch, "seq": s.seq, "embed": s.embed, "heads": s.heads, "head_dim": s.head_dim,
                "causal": self.causal, "dtype": self.dtype, "timed": s.timed}

    @staticmethod
    def from_json(d: dict) -> "Case":
        return Case(Shape(d["batch"], d["seq"], d["embed"], d["heads"], d.get("timed", True)),
                    d["causal"], d["dtype"])


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
# FLOPs (DESIGN.md): attention forward 4·B·H·Nq·Nk·D (causal: half), backward 2.5× forward;
# projections 6·B·N·E·M forward, backward twice that. Causal eager and reference compute every
# score and mask; they are credited with the useful FLOPs only, like everyone.

BACKWARD_FACTOR = {"attention": 2.5, "linear": 2.0}


def _by_mode(forward: float, kind: str, mode: str) -> float:
    backward = BACKWARD_FACTOR[kind] * forward
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def attention_flops(shape: Shape, causal: bool, mode: str) -> float:
    forward = 4.0 * shape.batch * shape.heads * shape.seq * shape.seq * shape.head_dim
    return _by_mode(forward / 2 if causal else forward, "attention", mode)


def projection_flops(shape: Shape, mode: str) -> float:
    return _by_mode(6.0 * shape.batch * shape.seq * shape.embed * shape.embed, "linear", mode)


def out_projection_flops(shape: Shape, mode: str) -> float:
    """nn.MultiheadAttention's extra work: its (M -> E) output projection."""
    return _by_mode(2.0 * shape.batch * shape.seq * shape.embed * shape.embed, "linear", mode)


def case_flops(case: Case, level: str, mode: str) -> float:
    flops = attention_flops(case.shape, case.causal, mode)
    return flops + projection_flops(case.shape, mode) if level == "layer" else flops


# ---------------------------------------------------------------------------------------------
# Implementations


@dataclass
class Built:
    """An implementation ready to run: forward(*inputs) -> output, and its parameters."""

    forward: Callable[..., Tensor]
    params: List[Tensor] = field(default_factory=list)
    backend: str = ""


@dataclass(frozen=True)
class Impl:
    name: str
    level: str
    build: Callable[[Case, torch.device, Sequence[Tensor]], Built]
    estimate: Callable[[Case, str], float]  # peak bytes above inputs and parameters, per memory mode
    extra_flops: Callable[[Shape, str], float] = lambda shape, mode: 0.0
    note: str = ""


def _split_heads(qkv: Tensor, heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3M) -> q, k, v as (B, H, N, D) views."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(out: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, M)."""
    return out.transpose(1, 2).flatten(2)


def _causal_mask(n: int, device: torch.device) -> Tensor:
    """True where a query may not look (nn.MultiheadAttention's convention)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _packed_weight(case: Case, device: torch.device) -> Tensor:
    e = case.shape.embed
    w = torch.randn(3 * e, e, device=device, dtype=case.torch_dtype) / math.sqrt(e)
    return w.requires_grad_(True)


def _sdpa_backends() -> Dict[str, object]:
    """The SDPA backends this torch can force, by short name ({} when sdpa_kernel is missing)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    return {short: getattr(SDPBackend, long) for short, long in names.items() if hasattr(SDPBackend, long)}


def _forced_backend(backend) -> contextlib.AbstractContextManager:
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend)


def sdpa_choice(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str:
    """The backend SDPA picks by itself for these inputs, lowercased ('?' when torch won't say)."""
    try:
        from torch.nn.attention import SDPBackend

        names = {int(member): name for name, member in SDPBackend.__members__.items()}
        return names[int(torch._fused_sdp_choice(q, k, v, None, 0.0, causal))].lower()
    except Exception:  # a private API: any failure only loses the label
        return "?"


def _build_sdpa_core(backend):
    def build(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
        causal = case.causal

        def forward(q, k, v):
            with _forced_backend(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        label = f"default → {sdpa_choice(*example, causal)}" if backend is None else f"forced {backend.name.lower()}"
        return Built(forward, backend=label)

    return build


def _build_selfattn_core(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    causal = case.causal
    return Built(lambda q, k, v: selfattn.attention(q, k, v, causal=causal))


def _build_selfattn_layer(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    s = case.shape
    module = selfattn.SelfAttention(s.embed, s.embed, s.heads, bias=False, causal=case.causal,
                                    device=device, dtype=case.torch_dtype)
    return Built(module, list(module.parameters()))


def _build_linear_sdpa(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    weight, heads, causal = _packed_weight(case, device), case.shape.heads, case.causal

    def forward(x):
        q, k, v = _split_heads(F.linear(x, weight), heads)
        return _merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    with torch.set_grad_enabled(example[0].requires_grad):  # the choice depends on it
        q, k, v = _split_heads(F.linear(example[0], weight), heads)
    return Built(forward, [weight], backend=f"default → {sdpa_choice(q, k, v, causal)}")


def _build_eager(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    weight, heads = _packed_weight(case, device), case.shape.heads
    scale = case.shape.head_dim ** -0.5
    hidden = _causal_mask(case.shape.seq, device) if case.causal else None

    def forward(x):
        q, k, v = _split_heads(F.linear(x, weight), heads)
        scores = (q * scale) @ k.transpose(-2, -1)
        if hidden is not None:
            scores = scores.masked_fill(hidden, float("-inf"))
        return _merge_heads(torch.softmax(scores, dim=-1) @ v)

    return Built(forward, [weight])


def _build_mha(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    s = case.shape
    module = nn.MultiheadAttention(s.embed, s.heads, bias=False, batch_first=True, device=device,
                                   dtype=case.torch_dtype).eval()  # eval: its inference fast path when allowed
    # is_causal is only a hint to MHA that attn_mask is causal; it then drops the mask for SDPA's is_causal.
    mask = _causal_mask(s.seq, device) if case.causal else None

    def forward(x):
        return module(x, x, x, need_weights=False, attn_mask=mask, is_causal=case.causal)[0]

    return Built(forward, list(module.parameters()))


def _build_reference(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    s = case.shape
    module = selfattn.reference.SelfAttention(s.embed, s.embed, s.heads, bias=False, causal=case.causal)
    module = module.to(device=device, dtype=case.torch_dtype)
    return Built(module, list(module.parameters()))


# Memory estimates: the peak bytes an implementation allocates above its inputs and parameters,
# from its algorithm, as counts of tensors of three sizes alive at the peak:
#   act = B·N·M elements, counted at >= 4 bytes (reduced precision keeps float32 intermediates),
#   scores = B·H·N² and bcast = B·H·N²·D (the tutorial's broadcast), at the dtype's size.
# The counts are upper bounds of what the memory measurement gives at moderate shapes (e.g. the
# reference: 1.04 bcast forward, 2.04-2.08 forward+backward, as autograd holds both broadcast
# gradients of the multiply before reducing them), plus 10 % and a fixed slack.

SLACK = 64 * MIB  # per-thread buffers, library workspaces, allocator rounding
MARGIN = 1.1


def _units(case: Case) -> Tuple[float, float, float]:
    s = case.shape
    act = s.batch * s.seq * s.embed * max(case.itemsize, 4)
    scores = s.batch * s.heads * s.seq * s.seq * case.itemsize
    return act, scores, scores * s.head_dim


def _estimate(forward: Tuple[float, float, float], backward: Tuple[float, float, float]) -> Callable[[Case, str], float]:
    """An estimate from counts of (act, scores, bcast)-sized tensors: forward, forward+backward."""

    def estimate(case: Case, mode: str) -> float:
        counts = forward if mode == "fwd" else backward  # bwd: the forward+backward peak
        return SLACK + MARGIN * sum(n * unit for n, unit in zip(counts, _units(case)))

    return estimate


MemoryItem = Tuple[str, str, str]  # (level, impl name, mode)


def implementations(device_type: str) -> List[Impl]:
    """Every implementation benchmarked on this device; selfattn first in each level."""
    flash_like = _estimate((4, 0, 0), (10, 0, 0))  # O(N) memory: outputs, lse, gradients
    impls = [Impl("selfattn", "core", _build_selfattn_core, flash_like),
             Impl("sdpa", "core", _build_sdpa_core(None), flash_like)]
    if device_type == "cuda":
        impls += [Impl(f"sdpa[{short}]", "core", _build_sdpa_core(backend), flash_like)
                  for short, backend in _sdpa_backends().items()]
    return impls + [
        Impl("selfattn", "layer", _build_selfattn_layer, _estimate((8, 0, 0), (18, 0, 0))),
        Impl("linear+sdpa", "layer", _build_linear_sdpa, _estimate((8, 0, 0), (18, 0, 0))),
        Impl("nn.MultiheadAttention", "layer", _build_mha, _estimate((12, 0, 0), (30, 0, 0)),
             extra_flops=out_projection_flops, note="includes its output projection (its FLOPs counted)"),
        Impl("eager", "layer", _build_eager, _estimate((12, 3, 0), (24, 5, 0))),
        Impl("reference", "layer", _build_reference, _estimate((12, 6, 1), (24, 10, 2))),
    ]


def implementations_by_key(device_type: str) -> Dict[Tuple[str, str], Impl]:
    return {(impl.level, impl.name): impl for impl in implementations(device_type)}


# ---------------------------------------------------------------------------------------------
# Inputs and the step functions that run one call


def input_shapes(case: Case, level: str) -> List[Tuple[int, ...]]:
    s = case.shape
    if level == "core":
        return [(s.batch, s.heads, s.seq, s.head_dim)] * 3
    return [(s.batch, s.seq, s.embed)]


def output_shape(case: Case, level: str) -> Tuple[int, ...]:
    return input_shapes(case, level)[0]


def set_bytes(case: Case, level: str) -> int:
    """One input set: the inputs and a gradient for the output."""
    shapes = input_shapes(case, level) + [output_shape(case, level)]
    return sum(math.prod(shape) for shape in shapes) * case.itemsize


def make_inputs(case: Case, level: str, device: torch.device, grads: bool) -> List[Tensor]:
    return [torch.randn(shape, device=device, dtype=case.torch_dtype).requires_grad_(grads)
            for shape in input_shapes(case, level)]


def make_step(built: Built, input_sets: List[List[Tensor]], grad_outs: List[Tensor], mode: str) -> Callable[[], object]:
    """One call of `mode`, each call on the next input set."""
    counter = itertools.count()

    def leaves(inputs: List[Tensor]) -> List[Tensor]:
        return list(inputs) + built.params

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return built.forward(*input_sets[next(counter) % len(input_sets)])
    elif mode == "fwd+bwd":
        def step():
            i = next(counter) % len(input_sets)
            out = built.forward(*input_sets[i])
            return torch.autograd.grad(out, leaves(input_sets[i]), grad_outs[i])
    elif mode == "bwd":
        outs = [built.forward(*inputs) for inputs in input_sets]  # the graphs, retained

        def step():
            i = next(counter) % len(input_sets)
            return torch.autograd.grad(outs[i], leaves(input_sets[i]), grad_outs[i], retain_graph=True)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return step


# ---------------------------------------------------------------------------------------------
# Devices: timing, the GEMM rate, the memory budget and memory measurements


class CpuDevice:
    type = "cpu"
    flop_unit, flop_scale = "GFLOP/s", 1e9
    target_s, warmup_s = 0.03, 0.3
    memory_method = "peak RSS growth in a child process per case: VmHWM − VmRSS after malloc_trim and clear_refs"
    gemm_note = "GEMM rate timed in the same rounds: a float32 sgemm for every dtype, so bfloat16 can pass 100 %"

    def __init__(self, threads: int):
        self.device = torch.device("cpu")
        self.threads = threads

    def describe(self) -> str:
        return f"CPU {_system.cpu_model()}, {self.threads} threads (of {os.cpu_count()} CPUs)"

    def measure(self, fn: Callable[[], object], number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number

    def gemm(self, dtype: str) -> Tuple[str, float, Callable[[], object]]:
        """A large square sgemm: the rate the kernels are compared with (float32 whatever the case)."""
        return _square_gemm(self.device, CPU_GEMM_SIZE, torch.float32)

    def memory_budget(self) -> float:
        available = _system.mem_available_bytes()
        return 0.6 * available if available else 8 * GIB

    def measure_memory(self, case: Case, todo: List[MemoryItem]) -> Dict[MemoryItem, dict]:
        return measure_memory_in_child(case, todo, self.threads)


class CudaDevice:
    type = "cuda"
    flop_unit, flop_scale = "TFLOP/s", 1e12
    target_s, warmup_s = 0.01, 0.2
    memory_method = "torch.cuda.max_memory_allocated − memory_allocated, reset between measurements"
    gemm_note = "GEMM rate timed in the same rounds, a matmul in the case's dtype"

    def __init__(self):
        self.device = torch.device("cuda", torch.cuda.current_device())

    def describe(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        return f"{props.name}, {props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda}"

    def measure(self, fn: Callable[[], object], number: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number

    def gemm(self, dtype: str) -> Tuple[str, float, Callable[[], object]]:
        """A large square matmul in the case's dtype (float32 without TF32, unless the user enabled it)."""
        return _square_gemm(self.device, CUDA_GEMM_SIZE, getattr(torch, dtype))

    def memory_budget(self) -> float:
        free, _total = torch.cuda.mem_get_info(self.device)
        return 0.8 * free

    def measure_memory(self, case: Case, todo: List[MemoryItem]) -> Dict[MemoryItem, dict]:
        impls = implementations_by_key("cuda")
        results = {}
        for level, name, mode in todo:
            try:
                built, input_sets, grad_outs = prepare(impls[(level, name)], case, level, self.device, mode, 1)
                step = make_step(built, input_sets, grad_outs, mode)
                step()  # warm-up: workspaces, cuDNN plans
                torch.cuda.synchronize()
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
                result = step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated(self.device) - base
                del result, step, built, input_sets, grad_outs
                results[(level, name, mode)] = {"peak_bytes": peak}
            except Exception as exc:  # noqa: BLE001 - reported in the table
                results[(level, name, mode)] = {"error": _first_line(exc)}
        return results


def _square_gemm(device: torch.device, n: int, dtype: torch.dtype) -> Tuple[str, float, Callable[[], object]]:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    name = {torch.float32: "sgemm", torch.bfloat16: "bf16 GEMM", torch.float16: "fp16 GEMM"}.get(dtype, f"{dtype} GEMM")
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        name += " (TF32 allowed)"
    return f"{name} {n}³", 2.0 * n**3, lambda: torch.mm(a, b, out=c)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------
# CPU memory, measured in a child process


def prepare(impl: Impl, case: Case, level: str, device: torch.device, mode: str, n_sets: int):
    """An implementation built, its input sets, and a gradient for each set's output."""
    grads = mode != "fwd"
    input_sets = [make_inputs(case, level, device, grads) for _ in range(n_sets)]
    built = impl.build(case, device, input_sets[0])
    grad_outs = [torch.randn(output_shape(case, level), device=device, dtype=case.torch_dtype)
                 for _ in range(n_sets)] if grads else []
    return built, input_sets, grad_outs


def _tiny(case: Case) -> Case:
    s = case.shape
    return Case(Shape(1, min(s.seq, 32), s.embed, s.heads), case.causal, case.dtype)


def _measure_rss_growth(impl: Impl, case: Case, level: str, mode: str, method: str) -> dict:
    """Peak resident growth of one call over a baseline that holds its inputs and parameters."""
    device = torch.device("cpu")
    if method == "hwm":  # load the code paths on a tiny input; ru_maxrss cannot forget its peak
        make_step(*prepare(impl, _tiny(case), level, device, mode, 1), mode)()
    built, input_sets, grad_outs = prepare(impl, case, level, device, mode, 1)
    step = make_step(built, input_sets, grad_outs, mode)
    gc.collect()
    _system.malloc_trim()
    if method == "hwm":
        _system.reset_peak_rss()
        base = _system.status_kib("VmRSS") * 1024
    else:
        base = _system.max_rss_bytes()
    result = step()
    peak = _system.status_kib("VmHWM") * 1024 if method == "hwm" else _system.max_rss_bytes()
    del result
    return {"peak_bytes": max(0, peak - base),
            "method": "VmHWM − VmRSS after clear_refs" if method == "hwm" else "ru_maxrss growth, fresh process"}


def _memory_child_main() -> None:
    """Entry of the child process: a JSON request on stdin, one JSON line per measurement on stdout."""
    request = json.loads(sys.stdin.read())
    torch.set_num_threads(request["threads"])
    case, method = Case.from_json(request["case"]), request["method"]
    impls = implementations_by_key("cpu")
    if method == "hwm" and not (_system.reset_peak_rss() and os.path.exists("/proc/self/status")):
        print(json.dumps({"unsupported": "cannot reset the peak RSS via /proc/self/clear_refs"}), flush=True)
        return
    for level, name, mode in request["todo"]:
        try:
            result = _measure_rss_growth(impls[(level, name)], case, level, mode, method)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            result = {"error": _first_line(exc)}
        print(json.dumps({"item": [level, name, mode], **result}), flush=True)


def _run_memory_child(request: dict) -> Tuple[List[dict], str]:
    package_root = str(Path(selfattn.__file__).resolve().parent.parent)  # the same selfattn as ours
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(request["threads"]))
    code = "from selfattn.bench import _memory_child_main; _memory_child_main()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(request), capture_output=True,
                          text=True, env=env)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    problem = "" if proc.returncode == 0 else f"memory child exited with code {proc.returncode}: " \
                                                  f"{proc.stderr.strip().splitlines()[-1:] or ''}"
    return lines, problem


def measure_memory_in_child(case: Case, todo: List[MemoryItem], threads: int) -> Dict[MemoryItem, dict]:
    """Every measurement of a case in one child (or, without clear_refs, one child each)."""
    request = {"case": case.to_json(), "threads": threads, "method": "hwm", "todo": todo}
    lines, problem = _run_memory_child(request)
    if lines and "unsupported" in lines[0]:
        lines, problems = [], []
        for item in todo:
            more, problem = _run_memory_child(dict(request, method="maxrss", todo=[item]))
            lines += more
            problems.append(problem)
        problem = next((p for p in problems if p), "")
    results = {tuple(line.pop("item")): line for line in lines}
    for item in todo:  # those the child did not report, e.g. because it was killed
        results.setdefault(tuple(item), {"error": problem or "no result from the memory child"})
    return results


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Contestant:
    name: str
    step: Callable[[], object]
    number: int = 1


def warm_up(contestant: Contestant, dev, target_s: float, warmup_s: float) -> None:
    """Runs a contestant for about warmup_s (at least twice, or once when slow) and sets how many
    calls one timed sample holds, so that a sample lasts about target_s."""
    spent, calls, last = 0.0, 0, 0.0
    while calls == 0 or (spent < warmup_s and calls < 1000) or (calls < 2 and last < warmup_s):
        last = dev.measure(contestant.step, 1)
        spent += last
        calls += 1
    contestant.number = max(1, min(10000, round(target_s / max(last, 1e-9))))


def time_interleaved(contestants: List[Contestant], dev, repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each contestant in each round; rounds rotate the order."""
    samples: Dict[str, List[float]] = {c.name: [] for c in contestants}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(contestants)
            for c in contestants[shift:] + contestants[:shift]:
                samples[c.name].append(dev.measure(c.step, c.number))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def summarize(times: List[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "times_ms": [t * 1e3 for t in times]}


def pair_ratios(baseline: List[float], ours: List[float]) -> dict:
    """selfattn's speedup over a baseline: the median (min-max) of the per-round ratios."""
    ratios = [b / s for b, s in zip(baseline, ours)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# ---------------------------------------------------------------------------------------------
# The run: records per (case, level, impl), timing groups per (case, level, mode)


@dataclass
class Options:
    cases: List[Case]
    levels: Tuple[str, ...]
    modes: Tuple[str, ...]
    repeats: int
    memory: bool
    budget: float
    n_sets_max: int = 8
    impl_names: Optional[Tuple[str, ...]] = None
    target_s: Optional[float] = None
    warmup_s: Optional[float] = None


ROTATE_BYTES = 256 * MIB  # input sets cycled per contestant: enough to spill the caches, at most 8


def n_input_sets(case: Case, level: str, n_max: int) -> int:
    return max(2, min(n_max, math.ceil(ROTATE_BYTES / set_bytes(case, level))))


def plan_skips(impls: List[Impl], case: Case, level: str, modes: Sequence[str], n_sets: int, budget: float) -> Dict[Tuple[str, str], dict]:
    """(impl, mode) -> the skip verdict for those whose estimated peak would not fit the budget."""
    inputs = n_sets * set_bytes(case, level)
    skips = {}
    for impl in impls:
        for mode in modes:
            estimate = impl.estimate(case, mode) * (n_sets if mode == "bwd" else 1) + inputs
            if estimate > budget:
                skips[(impl.name, mode)] = {
                    "status": "skipped", "estimate_bytes": estimate,
                    "reason": f"est. {estimate / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB"}
    return skips


def _new_record(case: Case, level: str, impl: Impl) -> dict:
    return {"case": case.to_json(), "level": level, "impl": impl.name, "note": impl.note, "modes": {}, "memory": {}}


def _warnings_text(caught: List[warnings.WarningMessage]) -> str:
    """The first lines of the distinct warnings (SDPA says there why a backend refused)."""
    lines = dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip())
    return "; ".join(list(lines)[:2])


def ready_contestant(impl: Impl, case: Case, level: str, mode: str, dev, inputs: tuple, timing: Tuple[float, float]):
    """(the implementation built, warmed up and calibrated, its backend) — or raises with the reason
    it cannot run, SDPA's warnings included."""
    input_sets, grad_outs = inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            built = impl.build(case, dev.device, input_sets[0])
            contestant = Contestant(impl.name, make_step(built, input_sets, grad_outs, mode))
            warm_up(contestant, dev, *timing)
        except Exception as exc:
            why = _warnings_text(caught)
            raise RuntimeError(f"{why} ({_first_line(exc)})" if why else _first_line(exc)) from exc
    return contestant, built.backend


def _timing_entry(case: Case, level: str, mode: str, impl: Impl, contestant: Contestant,
                  samples: Dict[str, List[float]], gemm_rate: float) -> dict:
    flops = case_flops(case, level, mode) + impl.extra_flops(case.shape, mode)
    stats = summarize(samples[impl.name])
    rate = flops / (stats["median_ms"] / 1e3)
    theirs = impl.name != "selfattn" and "selfattn" in samples
    return dict(status="ok", **stats, calls_per_sample=contestant.number, flops=flops, flop_rate=rate,
                pct_gemm=100.0 * rate / gemm_rate,
                speedup=pair_ratios(samples[impl.name], samples["selfattn"]) if theirs else None)


def run_timing_group(dev, case: Case, level: str, mode: str, impls: List[Impl], records: Dict[str, dict],
                     skips: dict, opts: Options) -> dict:
    """Times every implementation of a (case, level, mode) and the GEMM, interleaved; fills records."""
    n_sets = n_input_sets(case, level, opts.n_sets_max)
    inputs = ([make_inputs(case, level, dev.device, mode != "fwd") for _ in range(n_sets)],
              [torch.randn(output_shape(case, level), device=dev.device, dtype=case.torch_dtype)
               for _ in range(n_sets)])
    timing = (opts.target_s or dev.target_s, opts.warmup_s or dev.warmup_s)
    gemm_name, gemm_flops, gemm_fn = dev.gemm(case.dtype)
    gemm = Contestant(gemm_name, gemm_fn)
    warm_up(gemm, dev, *timing)
    ready: Dict[str, Tuple[Impl, Contestant]] = {}
    for impl in impls:
        if (impl.name, mode) in skips:
            records[impl.name]["modes"][mode] = skips[(impl.name, mode)]
            continue
        try:
            contestant, backend = ready_contestant(impl, case, level, mode, dev, inputs, timing)
        except Exception as exc:  # noqa: BLE001 - e.g. a forced SDPA backend that refuses the inputs
            records[impl.name]["modes"][mode] = {"status": "unavailable", "reason": str(exc)}
            continue
        ready[impl.name] = (impl, contestant)
        records[impl.name]["modes"][mode] = {"backend": backend}
    samples = time_interleaved([gemm] + [c for _, c in ready.values()], dev, opts.repeats)
    gemm_rate = gemm_flops / statistics.median(samples[gemm_name])
    for name, (impl, contestant) in ready.items():
        records[name]["modes"][mode].update(_timing_entry(case, level, mode, impl, contestant, samples, gemm_rate))
    return {"case": case.to_json(), "level": level, "mode": mode, "gemm": gemm_name, "gemm_flop_rate": gemm_rate,
            "repeats": opts.repeats, "input_sets": n_sets}


def plan_memory(case: Case, level: str, impls: List[Impl], records: Dict[str, dict], skips: dict) -> List[tuple]:
    """Fills each record's memory entries with its estimate or skip; returns what is to be measured."""
    todo = []
    for impl in impls:
        refused = next((e for e in records[impl.name]["modes"].values() if e.get("status") == "unavailable"), None)
        for mode in MEMORY_MODES:
            if (impl.name, mode) in skips:
                records[impl.name]["memory"][mode] = skips[(impl.name, mode)]
            elif refused:  # it did not run when timed: no use trying again
                records[impl.name]["memory"][mode] = refused
            else:
                records[impl.name]["memory"][mode] = {"estimate_bytes": impl.estimate(case, mode)}
                todo.append((level, impl.name, mode))
    return todo


def _level_impls(dev, level: str, opts: Options) -> List[Impl]:
    return [impl for impl in implementations(dev.type) if impl.level == level
            and (opts.impl_names is None or impl.name in opts.impl_names or impl.name == "selfattn")]


def run_case(dev, case: Case, opts: Options, progress: str) -> Tuple[List[dict], List[dict]]:
    """Times every level and mode of a case, then measures its memory (one child process on CPU)."""
    records: Dict[str, Dict[str, dict]] = {}
    groups, memory_todo = [], []
    for level in opts.levels:
        impls = _level_impls(dev, level, opts)
        n_sets = n_input_sets(case, level, opts.n_sets_max)
        modes = opts.modes if case.shape.timed else ()
        skips = plan_skips(impls, case, level, tuple(modes) + MEMORY_MODES, n_sets, opts.budget)
        records[level] = {impl.name: _new_record(case, level, impl) for impl in impls}
        for mode in modes:
            started = time.perf_counter()
            groups.append(run_timing_group(dev, case, level, mode, impls, records[level], skips, opts))
            _log(f"{progress} {level} {mode} {case.label()}: {_progress_line(records[level], mode)} "
                 f"[{time.perf_counter() - started:.0f} s]")
            gc.collect()
        if opts.memory:
            memory_todo += plan_memory(case, level, impls, records[level], skips)
    if memory_todo:
        started = time.perf_counter()
        for (level, name, mode), result in dev.measure_memory(case, memory_todo).items():
            records[level][name]["memory"][mode].update(result, status="error" if "error" in result else "ok")
        for level in opts.levels:
            _log(f"{progress} {level} memory {case.label()}: {_memory_line(records[level])}")
        _log(f"{progress} memory measured in {time.perf_counter() - started:.0f} s")
    return [r for level in opts.levels for r in records[level].values()], groups


def _progress_line(records: Dict[str, dict], mode: str) -> str:
    parts = []
    for name, record in records.items():
        entry = record["modes"].get(mode, {})
        if entry.get("status") == "ok":
            ratio = f" (selfattn {entry['speedup']['median']:.2f}×)" if entry.get("speedup") else ""
            parts.append(f"{name} {_num(entry['median_ms'])} ms{ratio}")
        else:
            parts.append(f"{name} {entry.get('status', '?')}")
    return ", ".join(parts)


def _memory_line(records: Dict[str, dict]) -> str:
    return ", ".join(f"{name} " + "/".join(_fmt_memory(record["memory"].get(m, {})) for m in MEMORY_MODES)
                     for name, record in records.items())


# ---------------------------------------------------------------------------------------------
# Report: markdown tables, JSON, plot


def _num(x: float) -> str:
    """3 significant digits, without exponents: 0.0412, 4.12, 41.2, 412, 4120."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _fmt_ms(entry: dict) -> str:
    return f"{_num(entry['median_ms'])} ({_num(entry['min_ms'])}–{_num(entry['max_ms'])})"


def _fmt_ratio(speedup: Optional[dict]) -> str:
    if not speedup:
        return "—"
    return f"{speedup['median']:.2f}× ({speedup['min']:.2f}–{speedup['max']:.2f})"


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _fmt_memory(entry: dict) -> str:
    status = entry.get("status")
    if status == "ok":
        return _fmt_bytes(entry["peak_bytes"])
    if status == "skipped":
        return f"skipped ({entry['reason']})"
    if status == "error":
        return f"error: {entry['error']}"
    return status or "—"  # unavailable: the reason is under the table


def _mode_cells(entry: Optional[dict], flop_scale: float) -> List[str]:
    if entry is None:
        return ["not timed", "", "", ""]
    if entry["status"] == "skipped":
        return [f"skipped ({entry['reason']})", "—", "—", "—"]
    if entry["status"] != "ok":  # unavailable: the reason, often long, goes under the table
        return [entry["status"], "—", "—", "—"]
    return [_fmt_ms(entry), _num(entry["flop_rate"] / flop_scale), f"{entry['pct_gemm']:.0f}%",
            _fmt_ratio(entry["speedup"])]


def _impl_label(record: dict) -> str:
    """The name, † when it has a note, and the SDPA backend(s) it used."""
    label = record["impl"] + (" †" if record["note"] else "")
    backends = " / ".join(dict.fromkeys(e["backend"] for e in record["modes"].values() if e.get("backend")))
    return f"{label} [{backends}]" if backends else label


def _table(head: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def case_table(records: List[dict], groups: List[dict], modes: Sequence[str], flop_unit: str, flop_scale: float) -> List[str]:
    """Every implementation of one (case, level): times, rates, speedups, peak memory."""
    head = ["impl"]
    for mode in modes:
        head += [f"{mode} ms (min–max)", flop_unit, "% GEMM", "selfattn speedup (min–max)"]
    head += [f"peak {m}" for m in MEMORY_MODES]
    rows = []
    for record in records:
        cells = [_impl_label(record)]
        for mode in modes:
            cells += _mode_cells(record["modes"].get(mode), flop_scale)
        rows.append(cells + [_fmt_memory(record["memory"].get(m, {})) for m in MEMORY_MODES])
    lines = _table(head, rows) + [""]
    for record in records:
        reasons = dict.fromkeys(e["reason"] for e in record["modes"].values() if e.get("status") == "unavailable")
        lines += [f"- {record['impl']} unavailable: {reason}" for reason in reasons]
    lines += [f"- {g['mode']}: {g['gemm']} at {_num(g['gemm_flop_rate'] / flop_scale)} {flop_unit} in the same "
              f"rounds; {g['repeats']} rounds, {g['input_sets']} input sets rotated." for g in groups]
    return lines


def _by_case(records: List[dict], level: str) -> Dict[str, Dict[str, dict]]:
    """{case as JSON: {impl: record}} for one level, in run order."""
    by_case: Dict[str, Dict[str, dict]] = {}
    for r in records:
        if r["level"] == level:
            by_case.setdefault(json.dumps(r["case"], sort_keys=True), {})[r["impl"]] = r
    return by_case


def _case_cells(case_json: str) -> List[str]:
    c = json.loads(case_json)
    return [f"({c['batch']}, {c['seq']}, {c['embed']}, {c['heads']})", c["dtype"], "yes" if c["causal"] else "no"]


CASE_HEAD = ["(B, N, E, H)", "dtype", "causal"]


def summary_table(records: List[dict], level: str, modes: Sequence[str]) -> List[str]:
    """One line per timed case: selfattn's time and its speedup over each other implementation."""
    by_case = _by_case(records, level)
    others = list(dict.fromkeys(name for impls in by_case.values() for name in impls if name != "selfattn"))
    rows = []
    for case_json, impls in by_case.items():
        ours = impls.get("selfattn", {"modes": {}})["modes"]
        if not ours:  # a memory point
            continue
        cells = _case_cells(case_json) + [" / ".join(_num(ours[m]["median_ms"]) if ours.get(m, {}).get("status") == "ok"
                                                     else "—" for m in modes)]
        for name in others:
            entries = [impls.get(name, {"modes": {}})["modes"].get(m, {}) for m in modes]
            cells.append(" / ".join(f"{e['speedup']['median']:.2f}×" if e.get("speedup") else
                                    ("skip" if e.get("status") == "skipped" else "—") for e in entries))
        rows.append(cells)
    return _table(CASE_HEAD + [f"selfattn ms {' / '.join(modes)}"] + [f"vs {name}" for name in others], rows)


def rate_summary_table(records: List[dict], level: str, modes: Sequence[str], flop_scale: float) -> List[str]:
    """One line per timed case: every implementation's FLOP rate (DESIGN.md's count), mode by mode."""
    by_case = _by_case(records, level)
    names = list(dict.fromkeys(name for impls in by_case.values() for name in impls))
    rows = []
    for case_json, impls in by_case.items():
        if not impls.get("selfattn", {"modes": {}})["modes"]:  # a memory point
            continue
        cells = _case_cells(case_json) + [str(json.loads(case_json)["head_dim"])]
        for name in names:
            entries = [impls.get(name, {"modes": {}})["modes"].get(m, {}) for m in modes]
            cells.append(" / ".join(_num(e["flop_rate"] / flop_scale) if e.get("status") == "ok" else
                                    ("skip" if e.get("status") == "skipped" else "—") for e in entries))
        rows.append(cells)
    return _table(CASE_HEAD + ["D"] + names, rows)


def memory_summary_table(records: List[dict], level: str) -> List[str]:
    """One line per case: each implementation's peak memory, fwd / fwd+bwd."""
    by_case = _by_case(records, level)
    impls = list(dict.fromkeys(name for by_impl in by_case.values() for name in by_impl))
    rows = []
    for case_json, by_impl in by_case.items():
        cells = _case_cells(case_json)
        for name in impls:
            memory = by_impl.get(name, {"memory": {}})["memory"]
            cells.append(" / ".join(_fmt_bytes(e["peak_bytes"]) if e.get("status") == "ok" else
                                    ("skip" if e.get("status") == "skipped" else "—")
                                    for e in (memory.get(m, {}) for m in MEMORY_MODES)))
        rows.append(cells)
    return _table(CASE_HEAD + impls, rows)


def _case_title(case_json: str, level: str) -> str:
    c = Case.from_json(json.loads(case_json))
    s = c.shape
    where = (f"attention core, q k v (B, H, N, D) = ({s.batch}, {s.heads}, {s.seq}, {s.head_dim})" if level == "core"
             else f"whole layer, x (B, N, E) = ({s.batch}, {s.seq}, {s.embed}), {s.heads} heads, M = E")
    return f"{where}, {c.dtype}, {'causal' if c.causal else 'non-causal'}"


def report(result: dict, modes: Sequence[str]) -> str:
    meta, records = result["meta"], result["records"]
    out = [f"# selfattn benchmark — {meta['device']}",
           "",
           f"torch {meta['torch']}; {meta['selfattn_build']}; {meta['repeats']} interleaved rounds per timing; "
           f"memory budget {_fmt_bytes(meta['memory_budget_bytes'])}; {meta['wall_s']:.0f} s wall.",
           "",
           "- Times: median (min–max) per call. selfattn speedup: median (min–max) of the per-round ratios "
           "t_impl / t_selfattn (> 1: selfattn faster).",
           f"- Peak: memory growth above inputs and parameters ({meta['memory_method']}).",
           f"- % GEMM: of the {meta['gemm_note']}.",
           "- † nn.MultiheadAttention also runs its output projection (+2·B·N·M·E FLOP forward, counted in its "
           "rate). Causal, it is called as documented, attn_mask = the causal mask with is_causal=True; it "
           "converts that mask to N² elements of the dtype.",
           "- Causal FLOPs are half the full count for everyone (eager and reference compute all scores, then mask).",
           ""]
    if meta.get("note"):
        out += [f"Sweep: {meta['note']}.", ""]
    for level in meta["levels"]:
        for case_json, by_impl in _by_case(records, level).items():
            groups = [g for g in result["groups"] if g["level"] == level
                      and json.dumps(g["case"], sort_keys=True) == case_json]
            out += [f"## {_case_title(case_json, level)}", ""]
            out += case_table(list(by_impl.values()), groups, modes, meta["flop_unit"], meta["flop_scale"]) + [""]
    if any(r["memory"] for r in records):
        out += [f"## Summary: peak memory, {' / '.join(MEMORY_MODES)} (skip: estimated over the budget)", ""]
        for level in meta["levels"]:
            out += [f"### {level}", ""] + memory_summary_table(records, level) + [""]
    out += [f"## Summary: selfattn ms and speedup, {' / '.join(modes)} (> 1: selfattn faster)", ""]
    for level in meta["levels"]:
        out += [f"### {level}", ""] + summary_table(records, level, modes) + [""]
    # Last: the compact table a log's tail shows.
    out += [f"## Summary: {meta['flop_unit']} of every implementation, {' / '.join(modes)}", ""]
    for level in meta["levels"]:
        out += [f"### {level}", ""] + rate_summary_table(records, level, modes, meta["flop_scale"]) + [""]
    return "\n".join(out)


def write_plot(result: dict, path: Path, modes: Sequence[str]) -> Optional[str]:
    """Bars of each implementation's FLOP rate per case, one panel per (level, mode)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the 'bench' extra): no plot"
    levels = result["meta"]["levels"]
    width = max(7.0, 0.12 * len(result["records"]))  # about 0.6 inch per case and level
    fig, axes = plt.subplots(len(levels), len(modes), figsize=(width * len(modes), 4.5 * len(levels)), squeeze=False)
    fig.suptitle(f"{result['meta']['device']} — x: B×N, E/H, dtype, c = causal", fontsize=9)
    for row, level in enumerate(levels):
        for col, mode in enumerate(modes):
            _plot_panel(axes[row][col], result["records"], level, mode, result["meta"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _short_label(case_json: str) -> str:
    c = json.loads(case_json)
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}[c["dtype"]]
    return f"{c['batch']}×{c['seq']}\n{c['embed']}/{c['heads']}\n{dtype}{' c' if c['causal'] else ''}"


def _plot_panel(ax, records: List[dict], level: str, mode: str, meta: dict) -> None:
    by_case = {case: impls for case, impls in _by_case(records, level).items()
               if any(r["modes"].get(mode, {}).get("status") == "ok" for r in impls.values())}
    names = list(dict.fromkeys(name for impls in by_case.values() for name in impls))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        entries = [impls.get(name, {"modes": {}})["modes"].get(mode, {}) for impls in by_case.values()]
        values = [e["flop_rate"] / meta["flop_scale"] if e.get("status") == "ok" else 0.0 for e in entries]
        ax.bar([x + i * width for x in range(len(by_case))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(by_case))], [_short_label(c) for c in by_case], fontsize=7)
    ax.set_ylabel(meta["flop_unit"])
    ax.set_title(f"{level}, {mode}")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------
# Command line


DESCRIPTION = """\
Times selfattn against PyTorch's attention: the attention core (selfattn.attention vs SDPA) and the
whole layer (the tutorial's module, eager, F.linear + SDPA, nn.MultiheadAttention, selfattn's
SelfAttention), forward and forward+backward, interleaved in rounds with a large GEMM. Reports
median (min-max) times, FLOP rates, % of the GEMM rate, selfattn's speedup over each (median of
per-round ratios) and peak memory; prints markdown tables, writes JSON and a PNG plot."""


def _sweeps_help() -> str:
    lines = ["sweeps (shapes as B x N x E x H, M = E; each causal and not):"]
    for name, sweep in SWEEPS.items():
        shapes = ", ".join(f"{s.batch}x{s.seq}x{s.embed}x{s.heads}" + ("" if s.timed else " (memory only)")
                           for s in sweep.shapes)
        lines.append(f"  {name}: {shapes}; {', '.join(sweep.dtypes)}; {', '.join(sweep.levels)}; {', '.join(sweep.modes)}")
    names = dict.fromkeys(f"{i.level}: {i.name}" for i in implementations("cuda"))
    lines.append("implementations (--impls): " + ", ".join(names) + " (sdpa[...]: CUDA only)")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selfattn.bench", description=DESCRIPTION, epilog=_sweeps_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sweep", choices=sorted(SWEEPS), default=None, help="shape sweep (default: 'default'; "
                   "'quick' with --quick; 'fa': FlashAttention's shapes, bf16, core, fwd and bwd)")
    p.add_argument("--quick", action="store_true", help="small sweep, short samples (tests, GPU checks)")
    p.add_argument("--shapes", type=parse_shapes, default=None, help="BxNxExH[,...], e.g. 8x512x512x8 (overrides the sweep)")
    p.add_argument("--dtype", default=None, help="comma-separated: float32,bfloat16,float16 (default: the sweep's)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--level", choices=("both",) + LEVELS, default=None, help="attention core, whole layer, or both")
    p.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default: the sweep's)")
    p.add_argument("--impls", default=None, help="comma-separated implementation names to run (selfattn always runs)")
    p.add_argument("--repeats", type=int, default=None, help=f"interleaved rounds (default {MIN_PAIRS})")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="skip implementations estimated above this (default: 60%% of available RAM; CUDA: 80%% of free)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="results file (default: bench_results/bench-<device>-<time>.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (default: next to the JSON)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def _dtype_names(text: str) -> Tuple[str, ...]:
    names = tuple(DTYPE_ALIASES.get(d.strip(), d.strip()) for d in text.split(","))
    for name in names:
        if name not in ("float32", "bfloat16", "float16", "float64"):
            raise SystemExit(f"selfattn.bench: unknown dtype {name!r} (float32, bfloat16, float16, float64)")
    return names


def _cases(sweep: Sweep, args: argparse.Namespace) -> List[Case]:
    shapes = args.shapes or sweep.shapes
    dtypes = _dtype_names(args.dtype) if args.dtype else sweep.dtypes
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    return [Case(shape, causal, dtype) for shape in shapes for dtype in dtypes for causal in causals]


def make_options(args: argparse.Namespace, dev) -> Tuple[Options, Sweep]:
    sweep = SWEEPS[args.sweep or ("quick" if args.quick else "default")]
    levels = sweep.levels if args.level in (None,) else (LEVELS if args.level == "both" else (args.level,))
    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else sweep.modes
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"selfattn.bench: unknown mode(s) {bad}; choose from {MODES}")
    repeats = args.repeats or MIN_PAIRS
    if repeats < MIN_PAIRS:
        _log(f"warning: {repeats} rounds < {MIN_PAIRS}: the ratios are indicative only")
    budget = args.memory_budget_gb * GIB if args.memory_budget_gb is not None else dev.memory_budget()
    quick = {"target_s": dev.target_s / 5, "warmup_s": dev.warmup_s / 5} if args.quick else {}
    impl_names = tuple(n.strip() for n in args.impls.split(",")) if args.impls else None
    return Options(_cases(sweep, args), levels, modes, repeats, not args.no_memory, budget,
                   n_sets_max=2 if args.quick else 8, impl_names=impl_names, **quick), sweep


def _make_device(args: argparse.Namespace):
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("selfattn.bench: --device cuda, but torch.cuda.is_available() is False "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing was run")
        return CudaDevice()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return CpuDevice(threads)


def run(opts: Options, dev, sweep_note: str = "") -> dict:
    started = time.perf_counter()
    records, groups = [], []
    for i, case in enumerate(opts.cases):
        more_records, more_groups = run_case(dev, case, opts, f"[{i + 1}/{len(opts.cases)}]")
        records += more_records
        groups += more_groups
    meta = {
        "device": dev.describe(), "device_type": dev.type, "torch": torch.__version__,
        "selfattn_build": str(selfattn.build_info()), "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "levels": list(opts.levels), "modes": list(opts.modes), "repeats": opts.repeats,
        "memory_budget_bytes": opts.budget, "flop_unit": dev.flop_unit, "flop_scale": dev.flop_scale,
        "memory_method": dev.memory_method, "gemm_note": dev.gemm_note,
        "threads": getattr(dev, "threads", None), "note": sweep_note,
        "wall_s": time.perf_counter() - started,
    }
    return {"meta": meta, "records": records, "groups": groups}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    dev = _make_device(args)
    opts, sweep = make_options(args, dev)
    _log(f"{dev.describe()}; torch {torch.__version__}; {selfattn.build_info()}; "
         f"{len(opts.cases)} cases × {len(opts.levels)} levels, modes {', '.join(opts.modes)}, "
         f"memory budget {_fmt_bytes(opts.budget)}")
    result = run(opts, dev, sweep.note if not args.shapes else "")
    json_path = args.json or Path("bench_results") / f"bench-{dev.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    _log(f"wrote {json_path}")
    if not args.no_plot:
        plot_path = args.plot or json_path.with_suffix(".png")
        problem = write_plot(result, plot_path, opts.modes)
        _log(problem or f"wrote {plot_path}")
    print(report(result, opts.modes))
    return 0

