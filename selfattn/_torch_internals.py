"""Every private torch API selfattn uses, in this one module; the others import them from here.

Each is looked up by its dotted path in NAMES, with why it is used and the public API that would
replace it. A torch release that moves or drops one fails `import selfattn` with an error naming
it, and tests/test_torch_internals.py names every missing one at once. OpOverload's private
attributes (_op, _opname, _schema) live on each op, not on a module: read through op_entry,
op_name and op_schema here, checked by the same test on a real op.
"""

from __future__ import annotations

import importlib

import torch

# dotted path -> why selfattn uses it, and what public API would replace it.
NAMES = {
    "torch.autograd.function._SingleLevelFunction":
        "the per-grad-level autograd Function the ops' Autograd kernels apply under torch.func, as "
        "functorch does for an autograd.Function (_autograd.py); no public replacement: "
        "torch.library.register_autograd has no setup_context or jvp",
    "torch._functorch.utils.enable_single_level_autograd_function":
        "lets that Function be applied while a torch.func transform is active; no public replacement",
    "torch.autograd.forward_ad._set_fwd_grad_enabled":
        "keeps forward-mode AD recording inside a torch.func level's forward, as functorch's own "
        "Functions do; no public replacement",
    "torch.autograd.forward_ad._current_level":
        "whether a forward-mode AD level is open (a cheap check on every call); public would be "
        "torch.autograd.forward_ad's dual_level bookkeeping, which has no query",
    "torch._C._AutoDispatchBelowAutograd":
        "runs an op below the Autograd key once its Function has recorded it; public would be "
        "torch.library's custom ops, which route through their own autograd",
    "torch._C._after_autograd_keyset":
        "the keys below autograd, for redispatching from the Autograd kernel; public would be "
        "torch.library.register_autograd",
    "torch._C._are_functorch_transforms_active":
        "whether a torch.func transform is active, so the dispatcher must order things; no public query",
    "torch._C._is_any_autocast_enabled":
        "whether any autocast region is active, so autocast must cast before autograd records; public "
        "would be torch.is_autocast_enabled per device type (one call per device)",
    "torch._C.TensorType":
        "tells an op's Tensor arguments from its schema; public would be torch.library's "
        "infer_schema types, which describe Python signatures rather than registered schemas",
    "torch._C.OptionalType":
        "the same, for its Tensor? arguments",
    "torch._C.DispatchKeySet":
        "the Meta key alone, to run an op's Meta kernel (its argument checks) on the unbatched "
        "arguments of a batching rule (_vmap.py); public would be calling the op on meta tensors, "
        "which inside a batching rule re-enters vmap",
    "torch._C.DispatchKey":
        "the same",
    "torch._fused_sdp_choice":
        "which SDPA backend torch would pick, named in benchmark reports (selfattn/bench); public "
        "would be a query in torch.nn.attention, which has none",
}


def lookup(path: str):
    """torch's object at a dotted path, or an ImportError naming it and the installed torch."""
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"selfattn uses torch's private {path}, which torch {torch.__version__} does not have "
                          "(selfattn/_torch_internals.py says what it is for).") from error


SingleLevelFunction = lookup("torch.autograd.function._SingleLevelFunction")
enable_single_level_autograd_function = lookup("torch._functorch.utils.enable_single_level_autograd_function")
set_fwd_grad_enabled = lookup("torch.autograd.forward_ad._set_fwd_grad_enabled")
lookup("torch.autograd.forward_ad._current_level")  # read afresh on each call: forward_ad_level
AutoDispatchBelowAutograd = lookup("torch._C._AutoDispatchBelowAutograd")
after_autograd_keyset = lookup("torch._C._after_autograd_keyset")
are_functorch_transforms_active = lookup("torch._C._are_functorch_transforms_active")
is_any_autocast_enabled = lookup("torch._C._is_any_autocast_enabled")
TensorType = lookup("torch._C.TensorType")
OptionalType = lookup("torch._C.OptionalType")
META_KEYSET = lookup("torch._C.DispatchKeySet")(lookup("torch._C.DispatchKey").Meta)

_forward_ad = importlib.import_module("torch.autograd.forward_ad")


def forward_ad_level() -> int:
    """The innermost open forward-mode AD level, -1 when none is open."""
    return _forward_ad._current_level


def fused_sdp_choice(*args, **kwargs) -> int:
    """torch._fused_sdp_choice: looked up at the call, as only benchmark reports need it."""
    return lookup("torch._fused_sdp_choice")(*args, **kwargs)


# OpOverload's private attributes. _op: the overload's C++ entry point (its __call__ costs ~0.5 µs
# more); _opname: the op's name without namespace; _schema: its registered schema. Public
# replacements: OpOverload.__call__ and OpOverload.name(); none for the schema.
OP_ATTRIBUTES = ("_op", "_opname", "_schema")


def op_entry(op):
    return op._op


def op_name(op) -> str:
    return op._opname


def op_schema(op):
    return op._schema
