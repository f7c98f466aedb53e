"""The implementations benchmarked: how each is built, its estimated peak memory, and the steps
that run one call of it. They are listed in IMPLEMENTATIONS, the one table to add to."""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import selfattn

from .._torch_internals import fused_sdp_choice
from . import variants
from .cases import MIB, Case, Shape, input_shapes, out_projection_flops, output_shape, pairs_flops

Adapt = Callable[[List[Tensor], Optional[Tensor]], Tuple[List[Tensor], object]]


@dataclass
class Built:
    """An implementation ready to run: forward(*inputs) -> output, and its parameters."""

    forward: Callable[..., Tensor]
    params: List[Tensor] = field(default_factory=list)
    backend: str = ""
    # (one input set, its output gradient or None) -> the inputs forward takes, as new leaves, and
    # the gradient(s) of its output(s): made once per input set before timing, never timed.
    adapt: Optional[Adapt] = None


@dataclass(frozen=True)
class Impl:
    name: str
    level: str
    build: Callable[[Case, torch.device, Sequence[Tensor]], Built]
    estimate: Callable[[Case, str], float]  # peak bytes above inputs and parameters, per memory mode
    extra_flops: Callable[[Shape, str], float] = lambda shape, mode: 0.0
    note: str = ""
    devices: Tuple[str, ...] = ("cpu", "cuda")
    flops: Optional[Callable[[Case, str], float]] = None  # its own problem's count, instead of the level's
    applies: Callable[[Case], bool] = lambda case: True  # False: not a row of this case


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


def sdpa_choice(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Optional[Tensor] = None,
                gqa: bool = False) -> str:
    """The backend SDPA picks by itself for these inputs, lowercased ('?' when torch won't say)."""
    try:
        from torch.nn.attention import SDPBackend

        names = {int(member): name for name, member in SDPBackend.__members__.items()}
        extra = {"enable_gqa": True} if gqa else {}
        return names[int(fused_sdp_choice(q, k, v, mask, 0.0, causal, **extra))].lower()
    except Exception:  # a private API: any failure only loses the label
        return "?"


# ---------------------------------------------------------------------------------------------
# Builders: (case, device, one input set) -> Built. The input set shows what the calls will get:
# SDPA's choice of backend, which the row's label names, depends on it.


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


# ---------------------------------------------------------------------------------------------
# The masks level (variants.py): selfattn with the case's variant, without it ('plain'), SDPA
# given the same inputs, and (varlen) selfattn once per sequence. Masks and lengths come from the
# fixed seed, built once per case; what a row needs beyond the (B, Hq, N, D) q and (B, Hk, N, D)
# k, v it is given (packed sequences, k and v repeated to Hq) is made by its adapt, untimed.


def _leaves(tensors: Sequence[Tensor], grads: bool) -> List[Tensor]:
    return [t.detach().contiguous().requires_grad_(grads) for t in tensors]


def _packed_adapt(case: Case, per_sequence: bool) -> Adapt:
    """(B, H, N, D) -> packed (T, H, D) leaves; the output gradient packed, or as one view per sequence."""

    def adapt(inputs: List[Tensor], grad_out: Optional[Tensor]):
        leaves = _leaves([variants.pack(t, case) for t in inputs], inputs[0].requires_grad)
        grad = None if grad_out is None else variants.pack(grad_out, case)
        return leaves, variants.unpack_views(grad, case) if per_sequence and grad is not None else grad

    return adapt


def _tensor_mask(case: Case, device: torch.device) -> Optional[Tensor]:
    """The variant's mask tensor as selfattn and SDPA take it (True = take part), or None."""
    if case.variant in ("padding", "varlen"):
        return variants.padding_mask(case, device)
    if case.variant == "random":
        return variants.random_mask(case, device)
    return None


def _build_masked_selfattn(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    spec, causal = case.variant_spec, case.causal
    if case.variant == "varlen":
        cu, longest = variants.cu_seqlens(case, device), max(variants.case_lengths(case))

        def varlen(q, k, v):
            out = selfattn.attention_varlen(q, k, v, cu, cu, longest, longest, causal=causal)
            return out[0] if isinstance(out, tuple) else out

        return Built(varlen, adapt=_packed_adapt(case, per_sequence=False))
    mask, gqa = _tensor_mask(case, device), spec.kv_groups > 1
    window = spec.window if spec.window != (-1, -1) else None
    return Built(lambda q, k, v: selfattn.attention(q, k, v, mask, enable_gqa=gqa, causal=causal, window=window))


def _build_plain_selfattn(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    groups, causal = case.variant_spec.kv_groups, case.causal

    def repeat_kv(inputs: List[Tensor], grad_out: Optional[Tensor]):
        q, k, v = inputs
        kv = _leaves([t.repeat_interleave(groups, dim=1) for t in (k, v)], q.requires_grad)
        return [q] + kv, grad_out

    return Built(lambda q, k, v: selfattn.attention(q, k, v, causal=causal), backend=case.variant_spec.plain,
                 adapt=repeat_kv if groups > 1 else None)


def _build_masked_sdpa(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    spec = case.variant_spec
    mask = variants.window_mask(case, device) if case.variant == "window" else _tensor_mask(case, device)
    if case.causal and mask is not None:  # SDPA refuses is_causal with a mask: the intersection, once
        mask = mask & torch.ones(case.shape.seq, case.shape.seq, dtype=torch.bool, device=device).tril()
    causal, gqa = case.causal and mask is None, spec.kv_groups > 1

    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    return Built(forward, backend=f"{spec.sdpa}; default → {sdpa_choice(*example, causal, mask, gqa)}")


def _build_separate_selfattn(case: Case, device: torch.device, example: Sequence[Tensor]) -> Built:
    causal = case.causal

    def forward(q, k, v):
        return [selfattn.attention(*qkv, causal=causal)
                for qkv in zip(*(variants.unpack_views(t, case) for t in (q, k, v)))]

    return Built(forward, backend="one call per sequence", adapt=_packed_adapt(case, per_sequence=True))


def _plain_flops(case: Case, mode: str) -> float:
    return pairs_flops(variants.plain_pairs(case), case.shape.head_dim, mode)


def _sdpa_flops(case: Case, mode: str) -> float:
    spec = case.variant_spec
    return pairs_flops((spec.sdpa_pairs or spec.pairs)(case), case.shape.head_dim, mode)


# ---------------------------------------------------------------------------------------------
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


_flash_like = _estimate((4, 0, 0), (10, 0, 0))  # O(N) memory: outputs, lse, gradients

# Every implementation, in report order; selfattn first in each level (the others' speedups are
# relative to it, and it always runs).
IMPLEMENTATIONS: List[Impl] = [
    Impl("selfattn", "core", _build_selfattn_core, _flash_like),
    Impl("sdpa", "core", _build_sdpa_core(None), _flash_like),
    *(Impl(f"sdpa[{short}]", "core", _build_sdpa_core(backend), _flash_like, devices=("cuda",))
      for short, backend in _sdpa_backends().items()),
    Impl("selfattn", "layer", _build_selfattn_layer, _estimate((8, 0, 0), (18, 0, 0))),
    Impl("linear+sdpa", "layer", _build_linear_sdpa, _estimate((8, 0, 0), (18, 0, 0))),
    Impl("nn.MultiheadAttention", "layer", _build_mha, _estimate((12, 0, 0), (30, 0, 0)),
         extra_flops=out_projection_flops, note="includes its output projection (its FLOPs counted)"),
    Impl("eager", "layer", _build_eager, _estimate((12, 3, 0), (24, 5, 0))),
    Impl("reference", "layer", _build_reference, _estimate((12, 6, 1), (24, 10, 2))),
    Impl("selfattn", "masks", _build_masked_selfattn, _flash_like),
    Impl("selfattn plain", "masks", _build_plain_selfattn, _flash_like, flops=_plain_flops),
    Impl("sdpa", "masks", _build_masked_sdpa, _flash_like, flops=_sdpa_flops),
    Impl("selfattn separate", "masks", _build_separate_selfattn, _flash_like,
         applies=lambda case: case.variant_spec.separate),
]


def implementations(device_type: str) -> List[Impl]:
    """Every implementation benchmarked on this device ('cpu' or 'cuda')."""
    return [impl for impl in IMPLEMENTATIONS if device_type in impl.devices]


def implementations_by_key(device_type: str) -> Dict[Tuple[str, str], Impl]:
    return {(impl.level, impl.name): impl for impl in implementations(device_type)}


# ---------------------------------------------------------------------------------------------
# Inputs and the step functions that run one call


def make_inputs(case: Case, level: str, device: torch.device, grads: bool) -> List[Tensor]:
    return [torch.randn(shape, device=device, dtype=case.torch_dtype).requires_grad_(grads)
            for shape in input_shapes(case, level)]


def make_step(built: Built, input_sets: List[List[Tensor]], grad_outs: List[Tensor], mode: str) -> Callable[[], object]:
    """One call of `mode`, each call on the next input set (adapted first, when the row adapts them)."""
    counter = itertools.count()
    if built.adapt is not None:
        adapted = [built.adapt(inputs, grad_outs[i] if grad_outs else None) for i, inputs in enumerate(input_sets)]
        input_sets = [inputs for inputs, _ in adapted]
        grad_outs = [grad for _, grad in adapted] if grad_outs else []

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


def prepare(impl: Impl, case: Case, level: str, device: torch.device, mode: str, n_sets: int):
    """An implementation built, its input sets, and a gradient for each set's output."""
    grads = mode != "fwd"
    input_sets = [make_inputs(case, level, device, grads) for _ in range(n_sets)]
    built = impl.build(case, device, input_sets[0])
    grad_outs = [torch.randn(output_shape(case, level), device=device, dtype=case.torch_dtype)
                 for _ in range(n_sets)] if grads else []
    return built, input_sets, grad_outs
