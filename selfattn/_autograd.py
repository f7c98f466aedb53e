"""Autograd for the ops (attention, the fused layer, varlen attention): reverse mode, forward
mode, the torch.func transforms, and clear refusals of what is not implemented yet.

Supported: reverse mode (backward, torch.autograd.grad), torch.func.grad, vjp, jacrev and vmap
with their compositions (vmap(grad(f)): per-sample gradients), and forward mode of every forward
op (torch.func.jvp, jacfwd, dual tensors of torch.autograd.forward_ad) through the attention_jvp
op. Refused at once, with an error naming the op and the alternative: every second derivative
(double backward, hessian, a derivative of a jvp). A tensor attn_mask is not differentiable: one
that requires grad or carries a tangent is refused. cu_seqlens of the varlen ops are integer
tensors and never differentiable.

Each op gets a Python kernel on the dispatcher's Autograd key, generated from its description in
the op table (_op_table.py), so the raw torch.ops.selfattn.* ops and the public functions behave
alike; arguments travel by schema name. When something is to be differentiated, the kernel applies
the op's autograd Function: for a forward op, backward is the matching backward op and jvp calls
attention_jvp (which recomputes out beside its tangent, so forward mode costs a forward and a
jvp pass; varlen calls it once per sequence); for a backward op or attention_jvp, backward and jvp
refuse (_refusals.py; a second-derivative kernel slots in there: `_refuse_double_backward`,
`_refuse_forward_mode`, `_refuse_derivative_of_jvp`).
Batching rules (vmap) are in _vmap.py.

Why not torch.library.register_autograd: its Function has no setup_context (torch.func refuses
it) and no jvp (forward mode got a zero tangent), and nothing covered the backward ops (DESIGN.md).
selfattn.attention in plain eager mode takes a C++ autograd instead (csrc/eager.cpp).

How torch.func gets through: like a C++ autograd kernel, not like an autograd.Function called
from Python. The kernel runs once per grad level, on that level's wrapped tensors, so it applies a
*single-level* Function (what functorch itself generates for each level of an autograd.Function);
its forward goes below autograd and the dispatcher carries the call on to the next level down.
(A plain autograd.Function cannot be applied from inside a dispatcher kernel under torch.func: it
re-enters functorch through the custom_function_call operator, which finds no kernel there.)
Its forward takes ctx, the classic form: a setup_context Function binds its arguments with
inspect.signature on every call (~28 µs here; pytorch#189573). vmap never reaches the Function:
each op's batching rule (_vmap.py) runs before autograd and folds the vmapped dim into the batch dim
(the varlen ops, whose packed layout has no batch dim, take one op call per sample).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ._op_table import OPS, OpDescription
from ._refusals import (
    _refuse_derivative_of_jvp,
    _refuse_double_backward,
    _refuse_forward_mode,
    _refuse_mask_grad,
    _refuse_mask_tangent,
)
from ._torch_internals import (
    AutoDispatchBelowAutograd,
    SingleLevelFunction,
    after_autograd_keyset,
    are_functorch_transforms_active,
    enable_single_level_autograd_function,
    forward_ad_level,
    is_any_autocast_enabled,
    op_entry,
    set_fwd_grad_enabled,
)

_ATTENTION_FWD = OPS["attention_fwd"]
# attention_fwd's out with the C++ autograd (csrc/eager.cpp), through the compiled build's direct
# entry (csrc/python_module.cpp): attention_fwd's arguments by position, converted without torch.ops'
# generic conversion; NotImplemented when it cannot take them (a tensor subclass, a
# __torch_function__ mode, an argument of another type). The JIT build is loaded as a plain
# library, without that module: it takes call() and the Python autograd.
_attention_eager = getattr(sys.modules.get("selfattn._C"), "attention_eager", None)

_BelowAutograd = AutoDispatchBelowAutograd
_lib = torch.library.Library("selfattn", "IMPL")

# ---------------------------------------------------------------------------------------------
# When autograd is involved


_is_compiling = torch.compiler.is_compiling
_functorch_active = are_functorch_transforms_active
_any_autocast_enabled = is_any_autocast_enabled


def _differentiating(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether a call must go through the op's autograd Function: a gradient is wanted of one of
    its tensors, or forward-mode AD is on (an input carrying only a tangent does not require grad,
    so requires_grad alone would miss it). A loop, not torch's private _any_requires_grad: ~5x faster."""
    if forward_ad_level() >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def call(op, function, args: tuple, tensors: tuple):
    """op(*args) with its autograd, as the Autograd kernel would run it; in plain eager mode (no
    compiler tracing, torch.func transform or autocast) without the trip through that kernel, a
    C++ -> Python -> C++ round trip of ~5 µs. Otherwise the dispatcher must order things:
    autocast casts before autograd records, and each torch.func level sets up its own state.
    ``tensors`` are the tensor arguments among ``args``. For the public functions and the
    backward formulas."""
    # is_compiling first, so that Dynamo folds it to True and traces none of the rest.
    if _is_compiling() or _functorch_active() or _any_autocast_enabled():
        return op(*args)
    if _differentiating(tensors):
        return function.apply(*args)
    with _BelowAutograd():
        return op_entry(op)(*args)  # the C++ entry point: OpOverload.__call__ costs ~0.5 µs more


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, **arguments) -> Tensor:
    """attention_fwd's out, differentiable; its arguments after ``scale`` by schema name (those left
    out at their defaults). In plain eager mode through the C++ entry with the C++ autograd
    (csrc/eager.cpp): a small call in grad mode takes ~3/4 of the time (BENCHMARKS.md). What needs
    the Python Autograd kernel (tracing, torch.func, autocast's cast before autograd records, forward
    mode), what the C++ entry declines and the JIT build take call()."""
    direct = _attention_eager is not None and not (
        _is_compiling() or _functorch_active() or _any_autocast_enabled() or forward_ad_level() >= 0)
    if not arguments:
        if direct:  # the plain small call: no tuple to build (~0.3 µs of a 10 µs call)
            out = _attention_eager(q, k, v, causal, scale)
            if out is not NotImplemented:
                return out
        args = (q, k, v, causal, scale)
    else:
        arguments.update(q=q, k=k, v=v, causal=causal, scale=scale)
        args = tuple(_ATTENTION_FWD.signature.positional(arguments))
        if direct:
            out = _attention_eager(*args)
            if out is not NotImplemented:
                return out
    return call(_ATTENTION_FWD.handle, attention_fwd_function, args, tuple(a for a in args if isinstance(a, Tensor)))[0]


def forward(name: str, **arguments):
    """The forward op ``name``'s outputs, differentiable; its arguments by schema name (those left
    out at their defaults). For the public functions other than selfattn.attention."""
    description = OPS[name]
    args = tuple(description.signature.positional(arguments))
    return call(description.handle, FUNCTIONS[name], args, tuple(a for a in args if isinstance(a, Tensor)))


# ---------------------------------------------------------------------------------------------
# Generated from the op table: each op's autograd Function and Autograd-key kernel.


def _register(description: OpDescription, setup_context: Callable, backward: Callable, jvp: Callable):
    """The op's autograd Function and its Autograd kernel; returns the Function."""
    op = description.handle
    entry = op_entry(op)
    signature = description.signature
    tensor_positions = [i for i, name in enumerate(signature.names) if name in signature.tensor_names]

    def forward(ctx, *args):
        if _functorch_active():
            # Function.apply turned both gradient modes off; the torch.func levels below this one
            # (the outer grad of grad(grad(f)), the jvp of jacfwd(jacrev(f))) must still record
            # this call. functorch's own single-level Functions do the same.
            with torch.enable_grad(), set_fwd_grad_enabled(True), _BelowAutograd():
                output = op(*args)
        else:
            with _BelowAutograd():
                output = entry(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{description.name}_function", (SingleLevelFunction,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward), "jvp": staticmethod(jvp)})

    def autograd_kernel(keyset, *args):
        # (The dispatcher leaves out trailing arguments at their defaults, such as attn_mask=None.)
        if not _differentiating([args[i] for i in tensor_positions if i < len(args)]):
            with _BelowAutograd():
                return op.redispatch(keyset & after_autograd_keyset, *args)
        if _functorch_active():
            with enable_single_level_autograd_function():
                return function.apply(*args)
        return function.apply(*args)

    _lib.impl(description.name, autograd_kernel, "Autograd", with_keyset=True)
    return function


def _register_derivative_op(description: OpDescription, is_jvp: bool):
    """A backward op or the forward-mode op: their own derivatives are second derivatives, refused
    at the moment one is taken. (Refusing as soon as a backward runs with create_graph=True would
    break torch.func.grad, which always builds a graph of the gradient.)"""
    args = (description.name, description.public, description.alternative)
    if is_jvp:
        backward = jvp = _refuse_derivative_of_jvp(*args)
    else:
        backward, jvp = _refuse_double_backward(*args), _refuse_forward_mode(*args)
    return _register(description, lambda ctx, inputs, output: None, backward, jvp)


def _forward_mode_possible() -> bool:
    """Whether a jvp may follow this forward (a dual level is open, or a torch.func transform is
    active): only then are the inputs kept for it (save_for_forward), off the plain backward path."""
    return forward_ad_level() >= 0 or _functorch_active()


def _register_forward_op(description: OpDescription, adapt_tangent: Optional[Callable] = None):
    """A forward op: backward by its backward op, forward mode by its jvp op, both called with the
    forward's arguments by name. ctx keeps the forward's non-tensor arguments by name
    (``ctx.arguments``) and the tensors each derivative reads (by the names in ``saved_names`` /
    ``forward_names``). ``adapt_tangent(ctx, values, tangents)``, for an op whose inputs are not
    attention_jvp's, computes the tangent of the first output from ``values`` (the saved tensors
    and arguments by name) and ``tangents`` (by input name)."""
    signature = description.signature
    backward_op = OPS[description.backward]
    output_name = signature.returns[0]
    # The tensors the backward op reads: the forward's tensor inputs and outputs it names.
    saved_names = tuple(n for n in backward_op.signature.names if n in signature.tensor_names or n in signature.returns)
    input_tensors = tuple(n for n in signature.names if n in signature.tensor_names)
    forward_names = input_tensors + description.kept_outputs
    no_grad = tuple(n for g in description.groups if g.no_grad for n in g.arguments)
    refusing_forward_mode = tuple(g for g in description.groups if g.forward_mode is not None)
    differentiable_positions = [signature.names.index(n) for n in description.differentiable]
    wants_output_mask = "output_mask" in backward_op.signature.names
    public = description.public

    def setup_context(ctx, inputs, output):
        values = signature.bind(inputs)
        for name in no_grad:
            _refuse_mask_grad(values[name], public, name)
        outputs = dict(zip(signature.returns, output))
        ctx.mark_non_differentiable(*(outputs[n] for n in description.kept_outputs))
        # Otherwise autograd hands the backward zero tensors for the gradients of the kept outputs
        # (the layer's qkv: measured +48 MiB peak at N = 8192, E = 512).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(values[n] if n in values else outputs[n] for n in saved_names))
        if _forward_mode_possible():
            ctx.save_for_forward(*(values[n] for n in input_tensors), *(outputs[n] for n in description.kept_outputs))
        ctx.arguments = {n: v for n, v in values.items() if n not in signature.tensor_names}
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_output, *_kept_output_grads):
        if grad_output is None:
            return (None,) * ctx.num_inputs
        needs = ctx.needs_input_grad
        values = dict(zip(saved_names, ctx.saved_tensors))
        values.update(ctx.arguments)
        values["grad_" + output_name] = grad_output
        if wants_output_mask:  # which gradients to compute (the layer's)
            values["output_mask"] = [i < len(needs) and bool(needs[i]) for i in differentiable_positions]
        args = tuple(backward_op.signature.positional(values))
        grads = call(backward_op.handle, FUNCTIONS[backward_op.name], args,
                     tuple(a for a in args if isinstance(a, Tensor)))
        result = [None] * ctx.num_inputs
        for i, grad in zip(differentiable_positions, grads):
            if i < ctx.num_inputs and needs[i]:
                result[i] = grad
        return tuple(result)

    def jvp(ctx, *tangents):
        """The tangent of the first output (the kept ones are not differentiable)."""
        tangents = dict(zip(signature.names, tangents))
        for name in no_grad:
            _refuse_mask_tangent(tangents.get(name), public, name)
        values = dict(zip(forward_names, ctx.saved_tensors))
        values.update(ctx.arguments)
        for group in refusing_forward_mode:
            group.forward_mode(values, public)
        nothing = (None,) * (1 + len(description.kept_outputs))
        if all(tangents.get(n) is None for n in description.differentiable):
            return nothing
        if adapt_tangent is not None:
            return (adapt_tangent(ctx, values, tangents),) + nothing[1:]
        for name in description.differentiable:
            values["tangent_" + name] = tangents.get(name)
        return (_tangent(values, description.jvp, "tangent_" + output_name),) + nothing[1:]

    return _register(description, setup_context, backward, jvp)


def _tangent(values: dict, jvp: str = "attention_jvp", output: str = "tangent_out") -> Tensor:
    """The forward-mode op ``jvp``'s ``output`` for the arguments in ``values``, by name."""
    jvp_op = OPS[jvp]
    args = tuple(jvp_op.signature.positional(values))
    outputs = call(jvp_op.handle, FUNCTIONS[jvp], args, tuple(a for a in args if isinstance(a, Tensor)))
    return outputs[jvp_op.signature.returns.index(output)]


def _split_heads(qkv: Tensor, num_heads: int, num_kv_heads: int):
    """q (B, H, N, D), k and v (B, Hkv, N, D): views of the fused op's (B, N, (H + 2·Hkv)·D) buffer."""
    heads = qkv.unflatten(-1, (num_heads + 2 * num_kv_heads, -1)).transpose(1, 2)
    return heads[:, :num_heads], heads[:, num_heads:num_heads + num_kv_heads], heads[:, num_heads + num_kv_heads:]


def _self_attention_tangent(ctx, values: dict, tangents: dict) -> Optional[Tensor]:
    """The projection's tangent (dx·Wᵀ + x·dWᵀ + db), then attention_jvp on the heads of the saved
    projection and of its tangent, then the tangent of out with the heads side by side."""
    x, w_qkv, qkv = values["x"], values["w_qkv"], values["qkv"]
    tangent_x, tangent_w, tangent_b = tangents.get("x"), tangents.get("w_qkv"), tangents.get("b_qkv")
    tangent_qkv = None
    for term in (None if tangent_x is None else torch.nn.functional.linear(tangent_x, w_qkv),
                 None if tangent_w is None else torch.nn.functional.linear(x, tangent_w),
                 tangent_b):
        if term is not None:
            tangent_qkv = term if tangent_qkv is None else tangent_qkv + term
    num_heads = values["num_heads"]
    heads_kv = values["num_kv_heads"] or num_heads
    # The layer's arguments by name serve attention_jvp's mask and scale arguments as they are.
    values["q"], values["k"], values["v"] = _split_heads(qkv, num_heads, heads_kv)
    values["tangent_q"], values["tangent_k"], values["tangent_v"] = \
        _split_heads(tangent_qkv.expand_as(qkv), num_heads, heads_kv)
    # (B, H, N, D) laid out as (B, N, H, D): the (B, N, H·D) tangent with the heads side by side.
    return _tangent(values).transpose(1, 2).flatten(2)


def _values(t: Tensor) -> list:
    """A 1-d tensor's values as a Python list, read on the host. torch 2.6's tolist() reads the
    data pointer itself, which a tensor wrapped by a torch.func level (cu_seqlens saved under
    torch.func.jvp) lacks ("Cannot access data pointer of Tensor that doesn't have storage");
    element by element, each read goes through the dispatcher and the wrapper. Newer torch's
    tolist() works on it."""
    try:
        return t.tolist()
    except RuntimeError:
        return [x.item() for x in t]


def _varlen_tangent(ctx, values: dict, tangents: dict) -> Tensor:
    """attention_jvp once per sequence, on (1, H, n_s, D) views of the packed tensors (the
    sequence boundaries read on the host: a synchronisation on CUDA), tangents joined along T."""
    q, v = values["q"], values["v"]
    bounds_q, bounds_k = _values(values["cu_seqlens_q"]), _values(values["cu_seqlens_k"])

    def rows(t, start, end):
        return None if t is None else t[start:end].transpose(0, 1).unsqueeze(0)

    pieces = []
    for s in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[s:s + 2], bounds_k[s:s + 2]
        sequence = dict(values)  # the band's arguments by name; its offset per sequence:
        sequence["diagonal_offset"] = (k1 - k0) - (q1 - q0) if values["bottom_right"] else 0
        for name, (start, end) in (("q", (q0, q1)), ("k", (k0, k1)), ("v", (k0, k1))):
            sequence[name] = rows(values[name], start, end)
            sequence["tangent_" + name] = rows(tangents.get(name), start, end)
        pieces.append(_tangent(sequence)[0].transpose(0, 1))  # (n_s, Hq, Dv)
    if not pieces:
        return q.new_zeros(0, q.shape[1], v.shape[2])
    return torch.cat(pieces)


# The derivative ops first: the forward ops' derivatives call them through their Functions.
FUNCTIONS = {}
for _name in ("attention_bwd", "self_attention_bwd", "varlen_attention_bwd", "attention_jvp"):
    FUNCTIONS[_name] = _register_derivative_op(OPS[_name], is_jvp=_name == "attention_jvp")
FUNCTIONS["attention_fwd"] = _register_forward_op(OPS["attention_fwd"])
FUNCTIONS["self_attention_fwd"] = _register_forward_op(OPS["self_attention_fwd"], _self_attention_tangent)
FUNCTIONS["varlen_attention_fwd"] = _register_forward_op(OPS["varlen_attention_fwd"], _varlen_tangent)
attention_fwd_function = FUNCTIONS["attention_fwd"]


from . import _vmap  # noqa: E402,F401  (registers the batching rules)
