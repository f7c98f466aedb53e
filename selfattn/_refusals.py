"""The clear refusals of what selfattn's autograd does not implement: every second derivative, the
derivative along a mask, forward mode through dropout. Each names the op and the alternative. The op
table (_op_table.py) says which op and argument group refuses what."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

SDPA_MATH = "F.scaled_dot_product_attention under torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"
LAYER_ALTERNATIVE = f"F.linear followed by {SDPA_MATH}"
VARLEN_ALTERNATIVE = f"{SDPA_MATH} on each sequence"


def _refuse_second_derivative(op: str, public: str, alternative: str, what: str) -> Callable:
    """A backward or jvp that raises: ``what`` names the second derivative that was asked for."""
    def refuse(ctx, *grads_or_tangents):
        raise NotImplementedError(f"{public} (torch.ops.selfattn.{op}): {what} is not supported yet; for "
                                  f"second-order derivatives use {alternative}")
    return refuse


def _refuse_forward_mode(op: str, public: str, alternative: str) -> Callable:
    """The jvp of a backward op: forward mode of a gradient."""
    return _refuse_second_derivative(op, public, alternative, "forward-mode AD of its gradient (torch.func.hessian, "
                                     "jacfwd of grad or jacrev: a second derivative)")


def _refuse_double_backward(op: str, public: str, alternative: str) -> Callable:
    """The backward of a backward op."""
    return _refuse_second_derivative(op, public, alternative, "double backward, a derivative of its gradient "
                                     "(backward through a create_graph=True gradient, gradgradcheck, "
                                     "torch.func.grad of grad, jacrev of jacrev)")


def _refuse_derivative_of_jvp(op: str, public: str, alternative: str) -> Callable:
    """The backward and the jvp of attention_jvp."""
    return _refuse_second_derivative(op, public, alternative, "a derivative of its forward-mode derivative (a "
                                     "second derivative: jacrev or jacfwd of jacfwd, grad through a jvp)")


# Why each argument without a derivative has none, and what computes one (by argument name).
_NO_DERIVATIVE = {
    "attn_mask": ("selfattn does not compute the derivative along a mask",
                  "or use F.scaled_dot_product_attention for a learned additive mask"),
    "alibi_slopes": ("ALiBi's slopes are fixed: selfattn does not compute their derivative",
                     "or build the bias as a float attn_mask for F.scaled_dot_product_attention"),
}


def _refuse_mask_tangent(tangent: Optional[Tensor], public: str, name: str = "attn_mask") -> None:
    if tangent is not None:
        why, alternative = _NO_DERIVATIVE[name]
        raise NotImplementedError(
            f"{public}: {name} carries a forward-mode tangent, but {why}; pass it without a tangent, {alternative}")


def _refuse_mask_grad(value: Optional[Tensor], public: str, name: str = "attn_mask") -> None:
    if value is not None and value.requires_grad:
        # The kernels do not compute this gradient; refuse rather than hand back None.
        if name == "attn_mask":
            raise NotImplementedError(
                f"{public}: attn_mask requires grad, but selfattn does not compute the gradient "
                "of a mask; detach it, or use F.scaled_dot_product_attention for a learned additive mask")
        why, alternative = _NO_DERIVATIVE[name]
        raise NotImplementedError(f"{public}: {name} requires grad, but {why}; detach it, {alternative}")


def _refuse_dropout_tangent(values: dict, public: str) -> None:
    """Forward mode through dropout is not implemented (attention_jvp has no keep mask)."""
    if values["dropout_p"] != 0.0:
        raise NotImplementedError(
            f"{public}: forward-mode AD (jvp) with dropout_p > 0 is not supported; use dropout_p=0 "
            "(e.g. the module in eval mode), or F.scaled_dot_product_attention with the math backend")
