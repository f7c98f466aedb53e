"""The op table: one description per selfattn op. _autograd.py generates each op's Autograd-key
kernel and autograd Function from it, _vmap.py its batching rule.

Argument names, order, defaults and output names come from the schemas (csrc/selfattn.cpp), read
once here (`Signature`); a description says only what a schema cannot: which inputs get gradients,
which op computes the backward and the forward-mode derivative, which argument groups need care
(a mask that cannot be differentiated, dropout, which forward mode refuses and vmap runs sample by
sample), and how vmap folds the samples into the batch. Arguments travel by name: `Signature.bind`
gives a call's arguments as a dict by schema name, defaults filled in, and `Signature.positional`
turns such a dict back into the op's arguments. A new scalar argument (say ``softcap``) is named in
the schema and in the kernels' argument builder in C++; here it needs nothing, or one group entry
when autograd or vmap must treat it specially.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from ._refusals import LAYER_ALTERNATIVE, SDPA_MATH, VARLEN_ALTERNATIVE, _refuse_dropout_tangent
from ._torch_internals import OptionalType, TensorType, op_schema

_REQUIRED = object()  # the default of an argument that has none



@dataclass(frozen=True)
class Signature:
    """An op's schema as Python reads it: argument names in order, their defaults, which are
    tensors, and the names of the outputs."""

    names: Tuple[str, ...]
    defaults: Tuple[object, ...]
    tensor_names: frozenset
    returns: Tuple[str, ...]

    @staticmethod
    def of(op) -> "Signature":
        schema = op_schema(op)
        tensor_types = (TensorType.get(), OptionalType(TensorType.get()))
        return Signature(
            names=tuple(a.name for a in schema.arguments),
            defaults=tuple(a.default_value if a.has_default_value() else _REQUIRED for a in schema.arguments),
            tensor_names=frozenset(a.name for a in schema.arguments if a.type in tensor_types),
            returns=tuple(r.name for r in schema.returns))

    def bind(self, args: tuple) -> Dict[str, object]:
        """The call's arguments by name; those left out (the dispatcher drops trailing defaults)
        at their defaults."""
        values = dict(zip(self.names, args))
        for name, default in zip(self.names[len(args):], self.defaults[len(args):]):
            values[name] = default
        return values

    def positional(self, values: Dict[str, object]) -> list:
        """The op's arguments in schema order from ``values`` by name, defaults for the rest; the
        trailing ones at their defaults left out (fewer arguments for the dispatcher to convert)."""
        args = [values.get(name, default) for name, default in zip(self.names, self.defaults)]
        end = len(args)
        while end and self.defaults[end - 1] is not _REQUIRED and _same(args[end - 1], self.defaults[end - 1]):
            end -= 1
        # (By name: dynamo in torch 2.6 cannot compare a traced value with the sentinel.)
        missing = [n for n, d in zip(self.names[:end], self.defaults[:end]) if d is _REQUIRED and n not in values]
        if missing:
            raise TypeError(f"selfattn: missing argument(s) {', '.join(missing)}")
        return args[:end]


def _same(value, default) -> bool:
    """value is the default itself (not merely equal: True == 1, and a tensor compares by element)."""
    return type(value) is type(default) and not isinstance(value, torch.Tensor) and value == default


@dataclass(frozen=True)
class Group:
    """Arguments that autograd or vmap treat alike.

    ``active(values)``: whether the group is in use in a call. ``per_sample``: vmap runs one op
    call per sample while it is active (dropout: folding samples into the batch would change each
    sample's keep mask). ``forward_mode``: a function(values, public) refusing forward-mode AD
    while active, or None. ``no_grad``: the group's tensors are never differentiated; one that
    requires grad or carries a tangent is refused with ``refuse_grad`` / ``refuse_tangent``."""

    name: str
    arguments: Tuple[str, ...]
    active: Callable[[dict], bool] = lambda values: False
    per_sample: bool = False
    forward_mode: Optional[Callable[[dict, str], None]] = None
    no_grad: bool = False


@dataclass(frozen=True)
class OpDescription:
    name: str                       # the schema's: torch.ops.selfattn.<name>
    public: str                     # the function users call, for messages
    alternative: str                # what computes what selfattn refuses (second derivatives)
    groups: Tuple[Group, ...] = ()
    # Forward ops: the backward op, the inputs it gives gradients of (in its outputs' order), the
    # op computing forward mode (the tangent of the first output; called with the forward's
    # arguments and tangent_<input> by name, unless _autograd.py adapts the call for this op),
    # and the outputs after the first, which are not differentiable (kept for backward).
    backward: Optional[str] = None
    differentiable: Tuple[str, ...] = ()
    jvp: Optional[str] = None
    kept_outputs: Tuple[str, ...] = ()
    # vmap: the tensor arguments whose dim 0 is the batch dim, into which the samples fold; the
    # attn_mask-like arguments folded with the broadcasting rule; when to take one call per
    # sample instead; which outputs are per sample (default: all).
    folded: Tuple[str, ...] = ()
    folded_masks: Tuple[str, ...] = ()
    per_sample_when: Callable[[dict], bool] = lambda values: False
    per_sample_outputs: Optional[Callable[[dict], Tuple[bool, ...]]] = None
    signature: Signature = field(init=False, compare=False)
    handle: object = field(init=False, compare=False)

    def __post_init__(self):
        handle = getattr(torch.ops.selfattn, self.name).default
        object.__setattr__(self, "handle", handle)
        object.__setattr__(self, "signature", Signature.of(handle))
        for group in self.groups:
            unknown = set(group.arguments) - set(self.signature.names)
            assert not unknown, f"{self.name}: group {group.name} names {unknown}, not in the schema"


# ---------------------------------------------------------------------------------------------
# The groups


def _dropout_active(values: dict) -> bool:
    return values["dropout_p"] != 0.0 or values["rng_state"] is not None


MASK = Group("mask", ("attn_mask",), active=lambda values: values["attn_mask"] is not None, no_grad=True)
# Slopes per (batch, head) do not fold into a bigger batch: vmap takes one call per sample then.
ALIBI = Group("alibi", ("alibi_slopes",), no_grad=True, per_sample=True,
              active=lambda values: values["alibi_slopes"] is not None and values["alibi_slopes"].dim() == 2)
# The backward ops' grad_sinks sums over the batch: folded samples would share one sum.
SINKS_GRAD = Group("sinks", ("sinks",), per_sample=True, active=lambda values: values["sinks"] is not None)
DROPOUT = Group("dropout", ("dropout_p", "rng_state"), active=_dropout_active, per_sample=True,
                forward_mode=_refuse_dropout_tangent)



def _layer_per_sample_bwd(values: dict) -> bool:
    # grad_w and grad_b sum over the op's batch: a fold would mix the samples' weight gradients.
    return bool(values["output_mask"][1] or values["output_mask"][2] or values["output_mask"][3])


# ---------------------------------------------------------------------------------------------
# The ops. (How the layer and varlen call attention_jvp is in _autograd.py.)

ATTENTION_FWD = OpDescription(
    "attention_fwd", "selfattn.attention", SDPA_MATH, groups=(MASK, ALIBI, DROPOUT),
    backward="attention_bwd", differentiable=("q", "k", "v", "sinks"), jvp="attention_jvp", kept_outputs=("lse",),
    folded=("q", "k", "v"), folded_masks=("attn_mask",))
ATTENTION_BWD = OpDescription(
    "attention_bwd", "selfattn.attention's backward", SDPA_MATH, groups=(MASK, ALIBI, SINKS_GRAD, DROPOUT),
    folded=("grad_out", "q", "k", "v", "out", "lse"), folded_masks=("attn_mask",),
    per_sample_outputs=lambda values: (True, True, True, False))  # grad_sinks: empty when folded
ATTENTION_JVP = OpDescription(
    "attention_jvp", "selfattn.attention's forward-mode derivative", SDPA_MATH, groups=(MASK, ALIBI),
    folded=("q", "k", "v", "tangent_q", "tangent_k", "tangent_v"), folded_masks=("attn_mask",))

SELF_ATTENTION_FWD = OpDescription(
    "self_attention_fwd", "selfattn.self_attention", LAYER_ALTERNATIVE, groups=(MASK, ALIBI, DROPOUT),
    backward="self_attention_bwd", differentiable=("x", "w_qkv", "b_qkv", "sinks"), jvp="attention_jvp",
    kept_outputs=("qkv", "lse"), folded=("x",), folded_masks=("attn_mask",))
SELF_ATTENTION_BWD = OpDescription(
    "self_attention_bwd", "selfattn.self_attention's backward", LAYER_ALTERNATIVE,
    groups=(MASK, ALIBI, SINKS_GRAD, DROPOUT),
    folded=("grad_out", "x", "qkv", "out", "lse"), folded_masks=("attn_mask",),
    per_sample_when=_layer_per_sample_bwd,
    # grad_w and grad_b are not wanted when folded (empty); grad_x may not be either.
    per_sample_outputs=lambda values: (bool(values["output_mask"][0]), False, False, False))

# The packed layout has no batch dim to fold into (a fold would shift every sample's cu_seqlens,
# whose values only the host sees): vmap takes one call per sample (no `folded`).
VARLEN_ATTENTION_FWD = OpDescription(
    "varlen_attention_fwd", "selfattn.attention_varlen", VARLEN_ALTERNATIVE, groups=(ALIBI, DROPOUT),
    backward="varlen_attention_bwd", differentiable=("q", "k", "v", "sinks"), jvp="attention_jvp", kept_outputs=("lse",))
VARLEN_ATTENTION_BWD = OpDescription(
    "varlen_attention_bwd", "selfattn.attention_varlen's backward", VARLEN_ALTERNATIVE,
    groups=(ALIBI, SINKS_GRAD, DROPOUT))

OPS = {d.name: d for d in (ATTENTION_FWD, ATTENTION_BWD, ATTENTION_JVP, SELF_ATTENTION_FWD, SELF_ATTENTION_BWD,
                           VARLEN_ATTENTION_FWD, VARLEN_ATTENTION_BWD)}
