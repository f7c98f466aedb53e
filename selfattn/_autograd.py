"""Autograd for the ops (attention, the fused layer, varlen attention): reverse mode, forward
mode, the torch.func transforms, and clear refusals of what is not implemented yet.

Supported: reverse mode (backward, torch.autograd.grad), torch.func.grad, vjp, jacrev and vmap
with their compositions (vmap(grad(f)): per-sample gradients), and forward mode of every forward
op (torch.func.jvp, jacfwd, dual tensors of torch.autograd.forward_ad) through the attention_jvp
op. Refused at once, with an error naming the op and the alternative: every second derivative
(double backward, hessian, a derivative of a jvp). A tensor attn_mask is not differentiable: one
that requires grad or carries a tangent is refused. cu_seqlens of the varlen ops are integer
tensors and never differentiable.

Each op gets a Python kernel on the dispatcher's Autograd key, so the raw torch.ops.selfattn.* ops
and the public functions behave alike. When something is to be differentiated, the kernel applies
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

from ._torch_internals import (AutoDispatchBelowAutograd, OptionalType, SingleLevelFunction, TensorType,
                               after_autograd_keyset, are_functorch_transforms_active,
                               enable_single_level_autograd_function, forward_ad_level, is_any_autocast_enabled,
                               op_entry, op_name, op_schema, set_fwd_grad_enabled)

from ._refusals import (_LAYER_ALTERNATIVE, _SDPA_MATH, _VARLEN_ALTERNATIVE, _refuse_derivative_of_jvp,
                        _refuse_double_backward, _refuse_dropout_tangent, _refuse_forward_mode, _refuse_mask_grad,
                        _refuse_mask_tangent)


from ._op_handles import (_attention_bwd, _attention_fwd, _attention_jvp, _self_attention_bwd, _self_attention_fwd,
                          _varlen_attention_bwd, _varlen_attention_fwd)
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


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, attn_mask: Optional[Tensor] = None,
              window_left: int = -1, window_right: int = -1, diagonal_offset: int = 0, dropout_p: float = 0.0,
              rng_state: Optional[Tensor] = None) -> Tensor:
    """attention_fwd's out, differentiable. In plain eager mode through the C++ entry with the C++
    autograd (csrc/eager.cpp): a small call in grad mode takes ~3/4 of the time (BENCHMARKS.md). What needs the
    Python Autograd kernel (tracing, torch.func, autocast's cast before autograd records, forward
    mode), what the C++ entry declines and the JIT build take call()."""
    plain = rng_state is None and dropout_p == 0.0 and attn_mask is None and window_left == -1 and (
        window_right == -1 and diagonal_offset == 0)
    if not (_is_compiling() or _functorch_active() or _any_autocast_enabled() or forward_ad_level() >= 0) and (
            _attention_eager is not None):
        if plain:
            out = _attention_eager(q, k, v, causal, scale)
        else:
            out = _attention_eager(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset,
                                   dropout_p, rng_state)
        if out is not NotImplemented:
            return out
    if plain:
        return call(_attention_fwd, attention_fwd_function, (q, k, v, causal, scale), (q, k, v))[0]
    if rng_state is None and dropout_p == 0.0:
        return call(_attention_fwd, attention_fwd_function,
                    (q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset),
                    (q, k, v, attn_mask))[0]
    return call(_attention_fwd, attention_fwd_function,
                (q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset, dropout_p, rng_state),
                (q, k, v, attn_mask))[0]


def self_attention_fwd(x: Tensor, w_qkv: Tensor, b_qkv: Optional[Tensor], num_heads: int, causal: bool,
                       scale: float, num_kv_heads: int = 0, attn_mask: Optional[Tensor] = None,
                       window_left: int = -1, window_right: int = -1, dropout_p: float = 0.0,
                       rng_state: Optional[Tensor] = None):
    args = (x, w_qkv, b_qkv, num_heads, causal, scale, num_kv_heads, attn_mask, window_left, window_right)
    if rng_state is not None or dropout_p != 0.0:
        args = args + (dropout_p, rng_state)
    return call(_self_attention_fwd, self_attention_fwd_function, args, (x, w_qkv, b_qkv, attn_mask))


def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, window_left: int = -1,
                         window_right: int = -1, bottom_right: bool = False, dropout_p: float = 0.0,
                         rng_state: Optional[Tensor] = None):
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
            window_right, bottom_right)
    if rng_state is not None or dropout_p != 0.0:
        args = args + (dropout_p, rng_state)
    return call(_varlen_attention_fwd, varlen_attention_fwd_function, args, (q, k, v))


def _register(op, setup_context: Callable, backward: Callable, jvp: Callable):
    """The op's autograd Function and its Autograd kernel; returns the Function."""
    name = op_name(op)
    entry = op_entry(op)
    tensor_positions = [i for i, arg in enumerate(op_schema(op).arguments)
                        if arg.type in (TensorType.get(), OptionalType(TensorType.get()))]

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

    function = type(f"{name}_function", (SingleLevelFunction,), {
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

    _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    return function


# ---------------------------------------------------------------------------------------------
# The backward ops: their own autograd refuses a second derivative, at the moment one is taken.
# (Refusing as soon as a backward runs with create_graph=True would break torch.func.grad, which
# always builds a graph of the gradient.)


def _nothing_to_save(ctx, inputs, output):
    pass


attention_bwd_function = _register(
    _attention_bwd, _nothing_to_save,
    _refuse_double_backward("attention_bwd", "selfattn.attention", _SDPA_MATH),
    _refuse_forward_mode("attention_bwd", "selfattn.attention's backward", _SDPA_MATH))

self_attention_bwd_function = _register(
    _self_attention_bwd, _nothing_to_save,
    _refuse_double_backward("self_attention_bwd", "selfattn.self_attention", _LAYER_ALTERNATIVE),
    _refuse_forward_mode("self_attention_bwd", "selfattn.self_attention's backward", _LAYER_ALTERNATIVE))

varlen_attention_bwd_function = _register(
    _varlen_attention_bwd, _nothing_to_save,
    _refuse_double_backward("varlen_attention_bwd", "selfattn.attention_varlen", _VARLEN_ALTERNATIVE),
    _refuse_forward_mode("varlen_attention_bwd", "selfattn.attention_varlen's backward", _VARLEN_ALTERNATIVE))


# The forward-mode op: no derivative of its own (that would be a second derivative).
attention_jvp_function = _register(
    _attention_jvp, _nothing_to_save,
    _refuse_derivative_of_jvp("attention_jvp", "selfattn.attention's forward-mode derivative", _SDPA_MATH),
    _refuse_derivative_of_jvp("attention_jvp", "selfattn.attention's forward-mode derivative", _SDPA_MATH))


# ---------------------------------------------------------------------------------------------
# The forward ops. lse (and the fused op's qkv buffer) are kept for backward and are not
# differentiable.


def _forward_mode_possible() -> bool:
    """Whether a jvp may follow this forward (a dual level is open, or a torch.func transform is
    active): only then are the inputs kept for it (save_for_forward), off the plain backward path."""
    return forward_ad_level() >= 0 or _functorch_active()


def _attention_setup_context(ctx, inputs, output):
    # rest: attn_mask, window_left, window_right, diagonal_offset, dropout_p, rng_state (or a prefix)
    q, k, v, causal, scale, *rest = inputs
    attn_mask = rest[0] if rest else None
    rng_state = rest[5] if len(rest) > 5 else None  # saved: the backward regenerates the same keep mask
    _refuse_mask_grad(attn_mask, "selfattn.attention")
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero tensor for lse's (absent) gradient
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, rng_state)
    if _forward_mode_possible():
        ctx.save_for_forward(q, k, v, attn_mask)
    ctx.args = (causal, scale)
    ctx.window = tuple(rest[1:5])  # the window, diagonal offset and dropout_p
    ctx.num_inputs = len(inputs)


def _attention_backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return (None,) * ctx.num_inputs
    q, k, v, out, lse, attn_mask, rng_state = ctx.saved_tensors
    tensors = (grad_out, q, k, v, out, lse)
    if attn_mask is None and not ctx.window:
        args = (*tensors, *ctx.args)
    else:
        args = (*tensors, *ctx.args, attn_mask, *ctx.window)
    if rng_state is not None:
        args = args + (rng_state,)
    grad_q, grad_k, grad_v = call(_attention_bwd, attention_bwd_function, args, tensors)
    return (grad_q, grad_k, grad_v) + (None,) * (ctx.num_inputs - 3)


def _attention_tangent(ctx, tangent_q, tangent_k, tangent_v, *mask_tangents):
    """The tangent of out (lse is not differentiable) by the attention_jvp op, which recomputes out
    beside it in one pass. An input without a tangent (None) adds nothing."""
    _refuse_mask_tangent(mask_tangents[2] if len(mask_tangents) > 2 else None, "selfattn.attention")
    _refuse_dropout_tangent(ctx.window[3:], "selfattn.attention")
    if tangent_q is None and tangent_k is None and tangent_v is None:
        return None, None
    q, k, v, attn_mask = ctx.saved_tensors
    tensors = (q, k, v, tangent_q, tangent_k, tangent_v)
    if attn_mask is None and not ctx.window:
        args = (*tensors, *ctx.args)
    else:
        args = (*tensors, *ctx.args, attn_mask, *ctx.window[:3])
    _, _, tangent_out = call(_attention_jvp, attention_jvp_function, args, tensors)
    return tangent_out, None


def _split_heads(qkv: Tensor, num_heads: int, num_kv_heads: int):
    """q (B, H, N, D), k and v (B, Hkv, N, D): views of the fused op's (B, N, (H + 2·Hkv)·D) buffer."""
    heads = qkv.unflatten(-1, (num_heads + 2 * num_kv_heads, -1)).transpose(1, 2)
    return heads[:, :num_heads], heads[:, num_heads:num_heads + num_kv_heads], heads[:, num_heads + num_kv_heads:]


def _self_attention_setup_context(ctx, inputs, output):
    # mask_args: num_kv_heads, attn_mask, window_left, window_right, dropout_p, rng_state (or a prefix)
    x, w_qkv, b_qkv, num_heads, causal, scale, *mask_args = inputs
    attn_mask = mask_args[1] if len(mask_args) > 1 else None
    rng_state = mask_args[5] if len(mask_args) > 5 else None
    _refuse_mask_grad(attn_mask, "selfattn.self_attention")
    out, qkv, lse = output
    ctx.mark_non_differentiable(qkv, lse)
    # Otherwise autograd hands the backward a zero tensor the size of qkv (B·N·(H + 2Hkv)·D) as
    # the gradient of that non-differentiable output: measured +48 MiB peak at N = 8192, E = 512.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w_qkv, qkv, out, lse, attn_mask, rng_state)
    if _forward_mode_possible():
        ctx.save_for_forward(x, w_qkv, qkv, attn_mask)
    ctx.has_bias = b_qkv is not None
    ctx.args = (num_heads, causal, scale)
    ctx.mask_args = (mask_args[0] if mask_args else 0, *mask_args[2:5])  # num_kv_heads, window sides, dropout_p
    ctx.num_inputs = len(inputs)


def _self_attention_backward(ctx, grad_out, _grad_qkv, _grad_lse):
    if grad_out is None:
        return (None,) * ctx.num_inputs
    x, w_qkv, qkv, out, lse, attn_mask, rng_state = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2])]
    tensors = (grad_out, x, w_qkv, qkv, out, lse)
    num_kv_heads, *window = ctx.mask_args
    args = (*tensors, *ctx.args, mask, num_kv_heads, attn_mask, *window)
    if rng_state is not None:
        args = args + (rng_state,)
    grad_x, grad_w, grad_b = call(_self_attention_bwd, self_attention_bwd_function, args, tensors)
    return (grad_x if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None) \
        + (None,) * (ctx.num_inputs - 3)


def _self_attention_tangent(ctx, tangent_x, tangent_w, tangent_b, *rest):
    """The projection's tangent (dx·Wᵀ + x·dWᵀ + db), then attention_jvp on the heads of the saved
    projection and of its tangent, then the tangent of out with the heads side by side."""
    _refuse_mask_tangent(rest[4] if len(rest) > 4 else None, "selfattn.self_attention")  # attn_mask's
    _refuse_dropout_tangent(ctx.mask_args[3:], "selfattn.self_attention")
    x, w_qkv, qkv, attn_mask = ctx.saved_tensors
    tangent_qkv = None
    for term in (None if tangent_x is None else torch.nn.functional.linear(tangent_x, w_qkv),
                 None if tangent_w is None else torch.nn.functional.linear(x, tangent_w),
                 tangent_b):
        if term is not None:
            tangent_qkv = term if tangent_qkv is None else tangent_qkv + term
    if tangent_qkv is None:
        return None, None, None
    num_heads, causal, scale = ctx.args
    num_kv_heads, *window = ctx.mask_args[:3]
    heads_kv = num_kv_heads or num_heads
    q, k, v = _split_heads(qkv, num_heads, heads_kv)
    tangent_q, tangent_k, tangent_v = _split_heads(tangent_qkv.expand_as(qkv), num_heads, heads_kv)
    tensors = (q, k, v, tangent_q, tangent_k, tangent_v)
    _, _, tangent_out = call(_attention_jvp, attention_jvp_function,
                             (*tensors, causal, scale, attn_mask, *window), tensors)
    # (B, H, N, D) laid out as (B, N, H, D): the (B, N, H·D) tangent with the heads side by side.
    return tangent_out.transpose(1, 2).flatten(2), None, None


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *args = inputs
    rng_state = args[8] if len(args) > 8 else None  # saved: the backward regenerates the same keep mask
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero tensor for lse's (absent) gradient
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state)
    if _forward_mode_possible():
        ctx.save_for_forward(q, k, v, cu_seqlens_q, cu_seqlens_k)
    # max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, bottom_right, dropout_p
    ctx.args = tuple(args[:8])
    ctx.num_inputs = len(inputs)


def _varlen_backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return (None,) * ctx.num_inputs
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state = ctx.saved_tensors
    tensors = (grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    args = (*tensors, *ctx.args) + ((rng_state,) if rng_state is not None else ())
    grad_q, grad_k, grad_v = call(_varlen_attention_bwd, varlen_attention_bwd_function, args, tensors)
    return (grad_q, grad_k, grad_v) + (None,) * (ctx.num_inputs - 3)


attention_fwd_function = _register(
    _attention_fwd, _attention_setup_context, _attention_backward, _attention_tangent)

self_attention_fwd_function = _register(
    _self_attention_fwd, _self_attention_setup_context, _self_attention_backward, _self_attention_tangent)


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


def _varlen_tangent(ctx, tangent_q, tangent_k, tangent_v, *_integer_inputs):
    """attention_jvp once per sequence, on (1, H, n_s, D) views of the packed tensors (the
    sequence boundaries read on the host: a synchronisation on CUDA), tangents joined along T."""
    # ctx.args: max_seqlen_q, max_seqlen_k, causal, scale, then the defaults' prefix given
    _, _, causal, scale, window_left, window_right, bottom_right, dropout_p = \
        ctx.args + (-1, -1, False, 0.0)[len(ctx.args) - 4:]
    _refuse_dropout_tangent((dropout_p,), "selfattn.attention_varlen")
    if tangent_q is None and tangent_k is None and tangent_v is None:
        return None, None
    q, k, v, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    bounds_q, bounds_k = _values(cu_seqlens_q), _values(cu_seqlens_k)

    def rows(t, start, end):
        return None if t is None else t[start:end].transpose(0, 1).unsqueeze(0)

    pieces = []
    for s in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[s:s + 2], bounds_k[s:s + 2]
        tensors = (rows(q, q0, q1), rows(k, k0, k1), rows(v, k0, k1), rows(tangent_q, q0, q1),
                   rows(tangent_k, k0, k1), rows(tangent_v, k0, k1))
        offset = (k1 - k0) - (q1 - q0) if bottom_right else 0
        _, _, tangent = call(_attention_jvp, attention_jvp_function,
                             (*tensors, causal, scale, None, window_left, window_right, offset), tensors)
        pieces.append(tangent[0].transpose(0, 1))  # (n_s, Hq, Dv)
    if not pieces:
        return q.new_zeros(0, q.shape[1], v.shape[2]), None
    return torch.cat(pieces), None


varlen_attention_fwd_function = _register(
    _varlen_attention_fwd, _varlen_setup_context, _varlen_backward, _varlen_tangent)


from . import _vmap  # noqa: E402,F401  (registers the batching rules)
