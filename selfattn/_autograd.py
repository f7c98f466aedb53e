"""Autograd for the ops (attention, the fused layer, varlen attention): reverse mode, the
torch.func transforms, and clear refusals of what is not implemented yet.

Supported: reverse mode (backward, torch.autograd.grad) and torch.func.grad, vjp, jacrev and vmap
with their compositions (vmap(grad(f)): per-sample gradients). Refused at once, with an error
naming the op and the alternative: forward mode (torch.func.jvp, jacfwd, hessian, dual tensors of
torch.autograd.forward_ad) and double backward (a derivative of a gradient). A tensor attn_mask
is not differentiable: one that requires grad is refused. cu_seqlens of the varlen ops are
integer tensors and never differentiable.

Each op gets a Python kernel on the dispatcher's Autograd key, so the raw torch.ops.selfattn.* ops
and the public functions behave alike. When something is to be differentiated, the kernel applies
the op's autograd Function: for a forward op, backward is the matching backward op; for a backward
op, backward refuses (a double-backward kernel slots in there: `_refuse_double_backward`). Every
Function's jvp refuses (a forward-mode kernel slots in there: `_refuse_forward_mode`).

Why not torch.library.register_autograd, as before: the Function it generates takes ctx in
forward and has no setup_context, so every torch.func transform refuses it (pytorch#168393,
#179652); it has no jvp, and an input carrying only a tangent does not require grad, so it
skipped autograd altogether and forward mode got a zero tangent, silently; and nothing covered
the backward ops, so a backward through a gradient only warned and left the gradient None.

How torch.func gets through: like a C++ autograd kernel, not like an autograd.Function called
from Python. The kernel runs once per grad level, on that level's wrapped tensors, so it applies a
*single-level* Function (what functorch itself generates for each level of an autograd.Function);
its forward goes below autograd and the dispatcher carries the call on to the next level down.
(A plain autograd.Function cannot be applied from inside a dispatcher kernel under torch.func: it
re-enters functorch through the custom_function_call operator, which finds no kernel there.)
Its forward takes ctx, the classic form: a setup_context Function binds its arguments with
inspect.signature on every call (~28 µs here; pytorch#189573). vmap never reaches the Function:
each op's batching rule (below) runs before autograd and folds the vmapped dim into the batch dim
(the varlen ops, whose packed layout has no batch dim, take one op call per sample).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.autograd.function import _SingleLevelFunction

from . import _checks

_attention_fwd = torch.ops.selfattn.attention_fwd.default
_attention_bwd = torch.ops.selfattn.attention_bwd.default
_self_attention_fwd = torch.ops.selfattn.self_attention_fwd.default
_self_attention_bwd = torch.ops.selfattn.self_attention_bwd.default
_varlen_attention_fwd = torch.ops.selfattn.varlen_attention_fwd.default
_varlen_attention_bwd = torch.ops.selfattn.varlen_attention_bwd.default

_BelowAutograd = torch._C._AutoDispatchBelowAutograd
_lib = torch.library.Library("selfattn", "IMPL")

_SDPA_MATH = "F.scaled_dot_product_attention under torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"
_LAYER_ALTERNATIVE = f"F.linear followed by {_SDPA_MATH}"
_VARLEN_ALTERNATIVE = f"{_SDPA_MATH} on each sequence"


# ---------------------------------------------------------------------------------------------
# The refusals


def _refuse_forward_mode(op: str, public: str, alternative: str) -> Callable:
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"{public} (torch.ops.selfattn.{op}): forward-mode AD (torch.func.jvp, jacfwd, hessian, "
            f"torch.autograd.forward_ad dual tensors) is not supported yet; for forward-mode "
            f"derivatives use {alternative}")
    return jvp


def _refuse_double_backward(op: str, public: str, alternative: str) -> Callable:
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{public} (torch.ops.selfattn.{op}): double backward, a derivative of its gradient "
            f"(backward through a create_graph=True gradient, gradgradcheck, torch.func.grad of grad, "
            f"jacrev of jacrev) is not supported yet; for second-order derivatives use {alternative}")
    return backward


# ---------------------------------------------------------------------------------------------
# When autograd is involved


_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_any_autocast_enabled = torch._C._is_any_autocast_enabled


def _differentiating(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether a call must go through the op's autograd Function: a gradient is wanted of one of
    its tensors, or forward-mode AD is on (an input carrying only a tangent does not require grad,
    so requires_grad alone would miss it). A loop, not torch._C._any_requires_grad: ~5x faster."""
    if _forward_ad._current_level >= 0:
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
        return op._op(*args)  # the C++ entry point: OpOverload.__call__ costs ~0.5 µs more


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, attn_mask: Optional[Tensor] = None,
                  window_left: int = -1, window_right: int = -1, diagonal_offset: int = 0, dropout_p: float = 0.0,
                  rng_state: Optional[Tensor] = None):
    if rng_state is None and dropout_p == 0.0:
        if attn_mask is None and window_left == -1 and window_right == -1 and diagonal_offset == 0:
            return call(_attention_fwd, attention_fwd_function, (q, k, v, causal, scale), (q, k, v))
        return call(_attention_fwd, attention_fwd_function,
                    (q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset),
                    (q, k, v, attn_mask))
    return call(_attention_fwd, attention_fwd_function,
                (q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset, dropout_p, rng_state),
                (q, k, v, attn_mask))


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
    name = op._opname
    tensor_positions = [i for i, arg in enumerate(op._schema.arguments)
                        if arg.type in (torch._C.TensorType.get(), torch._C.OptionalType(torch._C.TensorType.get()))]

    def forward(ctx, *args):
        if _functorch_active():
            # Function.apply turned both gradient modes off; the torch.func levels below this one
            # (the outer grad of grad(grad(f)), the jvp of jacfwd(jacrev(f))) must still record
            # this call. functorch's own single-level Functions do the same.
            with torch.enable_grad(), _set_fwd_grad_enabled(True), _BelowAutograd():
                output = op(*args)
        else:
            with _BelowAutograd():
                output = op._op(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{name}_function", (_SingleLevelFunction,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward), "jvp": staticmethod(jvp)})

    def autograd_kernel(keyset, *args):
        # (The dispatcher leaves out trailing arguments at their defaults, such as attn_mask=None.)
        if not _differentiating([args[i] for i in tensor_positions if i < len(args)]):
            with _BelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
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


# ---------------------------------------------------------------------------------------------
# The forward ops. lse (and the fused op's qkv buffer) are kept for backward and are not
# differentiable.


def _refuse_mask_grad(attn_mask: Optional[Tensor], public: str) -> None:
    if attn_mask is not None and attn_mask.requires_grad:
        # The kernels do not compute a mask's gradient; refuse rather than hand back None.
        raise NotImplementedError(
            f"{public}: attn_mask requires grad, but selfattn does not compute the gradient "
            "of a mask; detach it, or use F.scaled_dot_product_attention for a learned additive mask")


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


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *args = inputs
    rng_state = args[9] if len(args) > 9 else None
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero tensor for lse's (absent) gradient
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state)
    # max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, bottom_right, dropout_p
    ctx.args = tuple(args[:9])
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
    _attention_fwd, _attention_setup_context, _attention_backward,
    _refuse_forward_mode("attention_fwd", "selfattn.attention", _SDPA_MATH))

self_attention_fwd_function = _register(
    _self_attention_fwd, _self_attention_setup_context, _self_attention_backward,
    _refuse_forward_mode("self_attention_fwd", "selfattn.self_attention", _LAYER_ALTERNATIVE))

varlen_attention_fwd_function = _register(
    _varlen_attention_fwd, _varlen_setup_context, _varlen_backward,
    _refuse_forward_mode("varlen_attention_fwd", "selfattn.attention_varlen", _VARLEN_ALTERNATIVE))


# ---------------------------------------------------------------------------------------------
# Batching rules (torch.vmap), run before autograd at each vmap level. Each rule first checks the
# arguments as the op sees them, on meta tensors without the vmapped dim, so that a bad argument
# is reported in the op's own words and sizes rather than those of the folded batch.


def _unbatched_meta(t, bdim: Optional[int]):
    if not isinstance(t, Tensor):
        return t
    shape = list(t.shape)
    if bdim is not None:
        del shape[bdim]
    return torch.empty(shape, dtype=t.dtype, device="meta")


def _vmapped_first(t: Tensor, bdim: Optional[int], size: int) -> Tensor:
    """t with the vmapped dim first; an unbatched t expanded to it (stride 0, no copy)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def _fold(tensors: Sequence[Tensor], bdims: Sequence[Optional[int]], size: int):
    """Each (V, B, ...) tensor as (V·B, ...): the samples become batch entries. A view when the
    strides allow; a copy otherwise (e.g. an unbatched tensor expanded over V, with B > 1)."""
    leading = [_vmapped_first(t, d, size) for t, d in zip(tensors, bdims)]
    return [t.flatten(0, 1) for t in leading], leading[0].shape[1]


def _vmap_by_loop(op, info, in_dims, args):
    """One op call per sample, outputs stacked: for what cannot be folded into the batch."""
    # in_dims holds None for a non-tensor argument, or a list of Nones for a list (output_mask).
    batched = [isinstance(a, Tensor) and d is not None for a, d in zip(args, in_dims)]
    if info.batch_size == 0:
        # No sample to run: one of zeros gives the outputs' shapes.
        zeros = [a.new_zeros(_unbatched_meta(a, d).shape) if b else a for a, d, b in zip(args, in_dims, batched)]
        outputs = tuple(o.new_empty((0, *o.shape)) for o in op(*zeros))
    else:
        per_sample = [op(*(a.select(d, i) if b else a for a, d, b in zip(args, in_dims, batched)))
                      for i in range(info.batch_size)]
        outputs = tuple(torch.stack(parts) for parts in zip(*per_sample))
    return outputs, (0,) * len(outputs)


def _padded(in_dims, num_args: int) -> tuple:
    """in_dims for all the op's arguments: the dispatcher leaves out trailing ones at their
    defaults (an attn_mask of None and the rest), and so does in_dims."""
    return tuple(in_dims) + (None,) * (num_args - len(in_dims))


def _fold_mask(attn_mask: Optional[Tensor], bdim: Optional[int], size: int, batch: int) -> Optional[Tensor]:
    """The op's attn_mask (B or 1, H or 1, Nq or 1, Nk or 1) for the folded (V·B, ...) batch.

    Unvmapped with a batch dim of 1, it broadcasts over V·B as it is (no copy). Otherwise it
    becomes (V, B, ...) — the vmapped dim first, or stride 0 when it has none; its batch dim
    expanded to B when it is 1 — then (V·B, ...): a view when the strides allow (a vmapped mask
    with B entries, contiguous), else a copy of V·B·(its other dims) elements, the price of one
    op call for every sample."""
    if attn_mask is None or (bdim is None and attn_mask.shape[0] == 1):
        return attn_mask
    leading = _vmapped_first(attn_mask, bdim, size)
    if leading.dim() != 5:
        return leading  # not 4-D per sample: the checks before the fold have refused it already
    return leading.expand(size, batch, *leading.shape[2:]).flatten(0, 1)


@torch.library.register_vmap("selfattn::attention_fwd", lib=_lib)
def _attention_fwd_vmap(info, in_dims, q, k, v, causal, scale, attn_mask=None, window_left=-1, window_right=-1,
                        diagonal_offset=0, dropout_p=0.0, rng_state=None):
    in_dims = _padded(in_dims, 11)
    m_q, m_k, m_v, m_mask = (_unbatched_meta(t, d) for t, d in zip((q, k, v, attn_mask), in_dims[:3] + in_dims[5:6]))
    shape = _checks.check_attention_inputs(m_q, m_k, m_v, scale)
    _checks.check_mask_inputs(shape, m_q, m_mask, window_left, window_right)
    if dropout_p != 0.0 or rng_state is not None:
        # Folding the samples into the batch would change each sample's b, so its keep mask: one
        # call per sample keeps every sample's mask that of its own (B, Hq, Nq, Nk).
        return _vmap_by_loop(_attention_fwd, info, in_dims, (q, k, v, causal, scale, attn_mask, window_left,
                                                             window_right, diagonal_offset, dropout_p, rng_state))
    (q, k, v), batch = _fold((q, k, v), in_dims[:3], info.batch_size)
    attn_mask = _fold_mask(attn_mask, in_dims[5], info.batch_size, batch)
    out, lse = _attention_fwd(q, k, v, causal, scale, attn_mask, window_left, window_right, diagonal_offset)
    return (out.unflatten(0, (info.batch_size, batch)), lse.unflatten(0, (info.batch_size, batch))), (0, 0)


@torch.library.register_vmap("selfattn::attention_bwd", lib=_lib)
def _attention_bwd_vmap(info, in_dims, grad_out, q, k, v, out, lse, causal, scale, attn_mask=None, window_left=-1,
                        window_right=-1, diagonal_offset=0, dropout_p=0.0, rng_state=None):
    tensors = (grad_out, q, k, v, out, lse)
    in_dims = _padded(in_dims, 14)
    m_grad_out, m_q, m_k, m_v, m_out, m_lse = (_unbatched_meta(t, d) for t, d in zip(tensors, in_dims))
    mask_dim = in_dims[8]
    shape = _checks.check_attention_inputs(m_q, m_k, m_v, scale)
    _checks.check_mask_inputs(shape, m_q, _unbatched_meta(attn_mask, mask_dim), window_left, window_right)
    _checks.check_attention_grad_inputs(shape, m_q, m_grad_out, m_out, m_lse)
    if dropout_p != 0.0 or rng_state is not None:  # as in the forward: one call per sample
        return _vmap_by_loop(_attention_bwd, info, in_dims, (*tensors, causal, scale, attn_mask, window_left,
                                                             window_right, diagonal_offset, dropout_p, rng_state))
    folded, batch = _fold(tensors, in_dims[:6], info.batch_size)
    # _fold takes the batch size from its first tensor, grad_out: (B, H, Nq, Dv), checked above.
    attn_mask = _fold_mask(attn_mask, mask_dim, info.batch_size, batch)
    grads = _attention_bwd(*folded, causal, scale, attn_mask, window_left, window_right, diagonal_offset)
    return tuple(g.unflatten(0, (info.batch_size, batch)) for g in grads), (0, 0, 0)


@torch.library.register_vmap("selfattn::self_attention_fwd", lib=_lib)
def _self_attention_fwd_vmap(info, in_dims, x, w_qkv, b_qkv, num_heads, causal, scale, num_kv_heads=0,
                             attn_mask=None, window_left=-1, window_right=-1, dropout_p=0.0, rng_state=None):
    args = (x, w_qkv, b_qkv, num_heads, causal, scale, num_kv_heads, attn_mask, window_left, window_right,
            dropout_p, rng_state)
    in_dims = _padded(in_dims, len(args))
    m_x, m_w, m_b = (_unbatched_meta(t, d) for t, d in zip((x, w_qkv, b_qkv), in_dims))
    shape = _checks.check_layer_inputs(m_x, m_w, m_b, num_heads, num_kv_heads, scale)
    _checks.check_layer_mask_inputs(shape, m_x, _unbatched_meta(attn_mask, in_dims[7]), window_left, window_right)
    if in_dims[1] is not None or in_dims[2] is not None or dropout_p != 0.0 or rng_state is not None:
        # A weight per sample: the op takes one weight for its whole batch. Dropout: a fold would
        # change each sample's b, so its keep mask.
        return _vmap_by_loop(_self_attention_fwd, info, in_dims, args)
    (x,), batch = _fold((x,), in_dims[:1], info.batch_size)
    attn_mask = _fold_mask(attn_mask, in_dims[7], info.batch_size, batch)
    outputs = _self_attention_fwd(x, w_qkv, b_qkv, num_heads, causal, scale, num_kv_heads, attn_mask, window_left,
                                  window_right)
    return tuple(t.unflatten(0, (info.batch_size, batch)) for t in outputs), (0, 0, 0)


@torch.library.register_vmap("selfattn::self_attention_bwd", lib=_lib)
def _self_attention_bwd_vmap(info, in_dims, grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale,
                             output_mask, num_kv_heads=0, attn_mask=None, window_left=-1, window_right=-1,
                             dropout_p=0.0, rng_state=None):
    args = (grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale, output_mask, num_kv_heads, attn_mask,
            window_left, window_right, dropout_p, rng_state)
    in_dims = _padded(in_dims, len(args))
    m_grad_out, m_x, m_w, m_qkv, m_out, m_lse = (_unbatched_meta(t, d) for t, d in zip(args[:6], in_dims))
    shape = _checks.check_layer_inputs(m_x, m_w, None, num_heads, num_kv_heads, scale)
    _checks.check_layer_mask_inputs(shape, m_x, _unbatched_meta(attn_mask, in_dims[11]), window_left, window_right)
    _checks.check_layer_grad_inputs(shape, m_x, m_grad_out, m_qkv, m_out, m_lse, output_mask)
    if in_dims[2] is not None or output_mask[1] or output_mask[2] or dropout_p != 0.0 or rng_state is not None:
        # A weight per sample, or a weight gradient per sample (vmap(grad(f)) with respect to the
        # weights): the op's grad_w and grad_b sum over its batch, which would mix the samples.
        return _vmap_by_loop(_self_attention_bwd, info, in_dims, args)
    per_sample = (grad_out, x, qkv, out, lse)
    (grad_out, x, qkv, out, lse), batch = _fold(per_sample, [in_dims[i] for i in (0, 1, 3, 4, 5)], info.batch_size)
    attn_mask = _fold_mask(attn_mask, in_dims[11], info.batch_size, batch)
    grad_x, grad_w, grad_b = _self_attention_bwd(grad_out, x, w_qkv, qkv, out, lse, num_heads, causal, scale,
                                                 output_mask, num_kv_heads, attn_mask, window_left, window_right)
    # grad_w and grad_b are not wanted here (empty, the same for every sample); grad_x may not be.
    if output_mask[0]:
        return (grad_x.unflatten(0, (info.batch_size, batch)), grad_w, grad_b), (0, None, None)
    return (grad_x, grad_w, grad_b), (None, None, None)


# The varlen ops: the packed layout has no batch dim to fold into (a fold would shift every
# sample's cu_seqlens, whose values only the host sees), so one op call per sample.


@torch.library.register_vmap("selfattn::varlen_attention_fwd", lib=_lib)
def _varlen_attention_fwd_vmap(info, in_dims, *args):
    return _vmap_by_loop(_varlen_attention_fwd, info, in_dims, args)


@torch.library.register_vmap("selfattn::varlen_attention_bwd", lib=_lib)
def _varlen_attention_bwd_vmap(info, in_dims, *args):
    return _vmap_by_loop(_varlen_attention_bwd, info, in_dims, args)
