"""Every autodiff mode on the ops: what works matches a plain PyTorch computation in float64, and
what is not supported yet fails at once with an error naming the op and the alternative — never a
silently wrong derivative.

Works: reverse mode, torch.func.grad / vjp / jacrev / vmap and their compositions (vmap(grad(f)):
per-sample gradients), also with tensor masks, grouped-query heads and packed (varlen) sequences,
against an explicit float64 softmax with the dense mask built in the test; forward mode (jvp,
jacfwd, forward_ad dual tensors) of every op (tests/test_jvp.py has its variant grid). Refused for
now: second derivatives (double backward, hessian, a derivative of a jvp). The double-backward
tests accept either outcome — a result that matches the float64 computation, or the clear error —
so that they hold once it is implemented.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import selfattn
from selfattn import _vmap
from tests.common import assert_close, eager_attention, sample_inputs

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

f64 = torch.float64
ops = torch.ops.selfattn


def eager_layer(x, w_qkv, b_qkv, num_heads, causal):
    """The fused layer in plain PyTorch: F.linear, then matmul-softmax-matmul attention per head."""
    q, k, v = F.linear(x, w_qkv, b_qkv).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(-3, -2) for t in (q, k, v))
    return eager_attention(q, k, v, causal=causal).transpose(-3, -2).flatten(-2)


@dataclass
class Case:
    fn: Callable          # selfattn, a function of the inputs
    eager: Callable       # the same computation in plain PyTorch
    inputs: tuple         # fresh float64 tensors
    forward_op: str       # the raw ops behind fn
    backward_op: str


def attention_case(causal: bool, nq: int, nk: int) -> Case:
    # B = 2 so that vmap's folding of samples into the batch can mix them up; Dv != D.
    return Case(lambda q, k, v: selfattn.attention(q, k, v, causal=causal),
                lambda q, k, v: eager_attention(q, k, v, causal=causal),
                sample_inputs(2, 2, nq, nk, 8, 6, dtype=f64), "attention_fwd", "attention_bwd")


def layer_case(causal: bool) -> Case:
    x = torch.randn(2, 7, 6, dtype=f64)
    w_qkv = torch.randn(24, 6, dtype=f64) / 6**0.5  # 2 heads of 4
    b_qkv = torch.randn(24, dtype=f64)
    return Case(lambda x, w, b: selfattn.self_attention(x, w, b, num_heads=2, causal=causal),
                lambda x, w, b: eager_layer(x, w, b, 2, causal),
                (x, w_qkv, b_qkv), "self_attention_fwd", "self_attention_bwd")


def masked_softmax_attention(q, k, v, visible, scale=None):
    """The oracle for masked, grouped-query attention: q (..., Hq, Nq, D), k (..., Hk, Nk, D),
    v (..., Hk, Nk, Dv); query head h reads kv head h // (Hq / Hk); ``visible`` bool, broadcast
    to (..., Hq, Nq, Nk), True = the key takes part (every row must see one)."""
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else scale
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v


def random_visible(shape):
    """A random bool mask (True = take part) in which key 0 is always visible, so that no row is
    empty, also under a causal band."""
    mask = torch.rand(shape) < 0.6
    mask[..., 0] = True
    return mask


def attention_mask_gqa_case() -> Case:
    """A bool mask per batch entry, shared by the heads ((B, 1, Nq, Nk): stride-0 broadcasting),
    Hq = 4 over Hk = 2, top-left causal on top of it."""
    nq, nk = 9, 13
    q = torch.randn(2, 4, nq, 8, dtype=f64)
    k, v = torch.randn(2, 2, nk, 8, dtype=f64), torch.randn(2, 2, nk, 6, dtype=f64)
    mask = random_visible((2, 1, nq, nk))
    visible = mask & torch.ones(nq, nk, dtype=torch.bool).tril()  # the dense mask: both apply
    return Case(lambda q, k, v: selfattn.attention(q, k, v, mask, is_causal=True, enable_gqa=True),
                lambda q, k, v: masked_softmax_attention(q, k, v, visible),
                (q, k, v), "attention_fwd", "attention_bwd")


def split_layer_heads(x, w_qkv, b_qkv, num_heads, num_kv_heads):
    """q (..., H, N, D), k and v (..., Hkv, N, D) of the fused layer's projection."""
    head_dim = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v = F.linear(x, w_qkv, b_qkv).split([num_heads * head_dim, num_kv_heads * head_dim,
                                               num_kv_heads * head_dim], dim=-1)
    return [t.unflatten(-1, (-1, head_dim)).transpose(-3, -2) for t in (q, k, v)]


def eager_layer_masked(x, w_qkv, b_qkv, num_heads, num_kv_heads, visible):
    q, k, v = split_layer_heads(x, w_qkv, b_qkv, num_heads, num_kv_heads)
    return masked_softmax_attention(q, k, v, visible).transpose(-3, -2).flatten(-2)


def layer_gqa_padding_case() -> Case:
    """H = 4 query heads over Hkv = 2 (w_qkv (4 + 2·2)·3 rows) and a key-padding mask: the second
    sequence's last three keys are padding."""
    x = torch.randn(2, 7, 6, dtype=f64)
    w_qkv = torch.randn(24, 6, dtype=f64) / 6**0.5
    b_qkv = torch.randn(24, dtype=f64)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[1, 4:] = False
    visible = real[:, None, None, :]  # (B, 1, 1, N): the keys each query sees
    return Case(lambda x, w, b: selfattn.self_attention(x, w, b, num_heads=4, num_kv_heads=2,
                                                        key_padding_mask=real),
                lambda x, w, b: eager_layer_masked(x, w, b, 4, 2, visible),
                (x, w_qkv, b_qkv), "self_attention_fwd", "self_attention_bwd")


VARLEN_Q, VARLEN_K = [3, 5], [4, 6]  # two packed sequences, nq != nk


def varlen_cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def eager_varlen(q, k, v):
    """Per sequence: top-left causal, grouped-query (Hq = 2, Hk = 1) attention, (T, H, D) layout."""
    outs, cq, ck = [], 0, 0
    for nq, nk in zip(VARLEN_Q, VARLEN_K):
        qs, ks, vs = (t.transpose(0, 1) for t in (q[..., cq:cq + nq, :, :], k[..., ck:ck + nk, :, :],
                                                  v[..., ck:ck + nk, :, :]))
        visible = torch.ones(nq, nk, dtype=torch.bool).tril()
        outs.append(masked_softmax_attention(qs, ks, vs, visible).transpose(0, 1))
        cq, ck = cq + nq, ck + nk
    return torch.cat(outs, -3)


def varlen_case() -> Case:
    cu_q, cu_k = varlen_cu(VARLEN_Q), varlen_cu(VARLEN_K)
    inputs = (torch.randn(sum(VARLEN_Q), 2, 8, dtype=f64), torch.randn(sum(VARLEN_K), 1, 8, dtype=f64),
              torch.randn(sum(VARLEN_K), 1, 6, dtype=f64))
    return Case(lambda q, k, v: selfattn.attention_varlen(q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K),
                                                          causal=True, enable_gqa=True),
                eager_varlen, inputs, "varlen_attention_fwd", "varlen_attention_bwd")


# Built inside each test, so that each test draws its own inputs (conftest seeds per test).
CASES = {
    "attention": lambda: attention_case(False, 9, 13),
    "attention-causal": lambda: attention_case(True, 9, 13),
    "attention-causal-Nq>Nk": lambda: attention_case(True, 13, 9),
    "attention-mask-gqa-causal": attention_mask_gqa_case,
    "layer": lambda: layer_case(False),
    "layer-causal": lambda: layer_case(True),
    "layer-gqa-key_padding": layer_gqa_padding_case,
    "varlen-gqa-causal": varlen_case,
}
case_names = pytest.mark.parametrize("case_name", list(CASES))


def assert_close64(actual, expected, name=""):
    """float64 against float64: the floor of tests/common.py's rule (eager's error is 0 here)."""
    assert_close(actual, expected, expected, name)


def assert_all_close64(actual, expected, name=""):
    assert len(actual) == len(expected), name
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close64(a, e, f"{name}[{i}]")


def square_loss(fn):
    return lambda *inputs: fn(*inputs).square().sum()


def assert_clear_refusal(error: BaseException, what: str, op: str):
    """The error says what is not supported, names the op, and names the alternative."""
    message = str(error)
    assert isinstance(error, NotImplementedError), f"{type(error).__name__}: {message}"
    assert what in message and "not supported yet" in message, message
    assert f"torch.ops.selfattn.{op}" in message, message
    assert "F.scaled_dot_product_attention" in message and "SDPBackend.MATH" in message, message


# ---------------------------------------------------------------------------------------------
# Forward mode: right, never a zero tangent


def forward_mode_through(entry: str, fn: Callable, inputs: tuple, tangents: tuple):
    if entry == "func.jvp":
        return torch.func.jvp(fn, inputs, tangents)[1]
    if entry == "jacfwd":
        return torch.func.jacfwd(fn, argnums=0)(*inputs)
    if entry == "forward_ad-last-input":
        # Only the last input (v, b_qkv) carries a tangent: none of them requires grad.
        with fwAD.dual_level():
            duals = inputs[:-1] + (fwAD.make_dual(inputs[-1], tangents[-1]),)
            return fwAD.unpack_dual(fn(*duals)).tangent
    raise ValueError(entry)


@case_names
@pytest.mark.parametrize("entry", ["func.jvp", "jacfwd", "forward_ad-last-input"])
def test_forward_mode_matches_eager(case_name, entry):
    case = CASES[case_name]()
    tangents = tuple(torch.randn_like(t) for t in case.inputs)
    tangent = forward_mode_through(entry, case.fn, case.inputs, tangents)
    assert_close64(tangent, forward_mode_through(entry, case.eager, case.inputs, tangents), entry)
    assert tangent.abs().max() > 0.1  # not the zero tangent of old


def test_forward_mode_through_the_raw_ops():
    q, k, v = sample_inputs(1, 2, 5, 6, 8, dtype=f64)
    t = torch.randn_like(q)
    _, tangent = torch.func.jvp(lambda q: ops.attention_fwd(q, k, v, True, 0.3)[0], (q,), (t,))
    _, expected = torch.func.jvp(lambda q: eager_attention(q, k, v, causal=True, scale=0.3), (q,), (t,))
    assert_close64(tangent, expected, "attention_fwd")

    x, w = torch.randn(2, 5, 6, dtype=f64), torch.randn(12, 6, dtype=f64)
    tw = torch.randn_like(w)
    # 2 heads of D = 2; eager_layer's scale is 1/sqrt(D).
    _, tangent = torch.func.jvp(lambda w: ops.self_attention_fwd(x, w, None, 2, False, 2**-0.5)[0], (w,), (tw,))
    _, expected = torch.func.jvp(lambda w: eager_layer(x, w, None, 2, False), (w,), (tw,))
    assert_close64(tangent, expected, "self_attention_fwd")

    # The backward op: a tangent on the incoming gradient is forward mode of a gradient, refused.
    out, lse = ops.attention_fwd(q, k, v, True, 0.3)
    grad_out = torch.randn_like(out)
    with fwAD.dual_level(), pytest.raises(NotImplementedError) as error:
        ops.attention_bwd(fwAD.make_dual(grad_out, torch.randn_like(grad_out)), q, k, v, out, lse, True, 0.3)
    assert_clear_refusal(error.value, "forward-mode AD of its gradient", "attention_bwd")


def test_forward_mode_alternative_named_in_the_error_works():
    """The refusal sends the user to SDPA's math backend: it does give the right tangent."""
    case = attention_case(True, 9, 13)
    tangents = tuple(torch.randn_like(t) for t in case.inputs)
    with sdpa_kernel(SDPBackend.MATH):
        _, tangent = torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                    case.inputs, tangents)
    _, expected = torch.func.jvp(case.eager, case.inputs, tangents)
    assert_close64(tangent, expected, "SDPA math jvp")


# ---------------------------------------------------------------------------------------------
# Double backward: matches the float64 computation, or is refused clearly


def double_backward(fn, inputs, weights):
    """Gradients of (sum of weights · first gradients) — a gradient penalty — and the first
    gradients themselves, taken with create_graph=True."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
    penalty = sum((g * w).sum() for g, w in zip(grads, weights))
    return grads, torch.autograd.grad(penalty, leaves, allow_unused=True, materialize_grads=True)


@case_names
def test_backward_through_a_gradient_matches_or_is_refused(case_name):
    case = CASES[case_name]()
    weights = [torch.randn_like(t) for t in case.inputs]
    expected_grads, expected_second = double_backward(case.eager, case.inputs, weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _, second = double_backward(case.fn, case.inputs, weights)
        except NotImplementedError as error:
            assert_clear_refusal(error, "double backward", case.backward_op)
        else:
            assert_all_close64(second, expected_second, "second-order gradients")
    # The old path only warned that no autograd kernel was registered, and returned None.
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
    # A gradient taken with create_graph=True is itself still right.
    leaves = [t.clone().requires_grad_(True) for t in case.inputs]
    grads = torch.autograd.grad(case.fn(*leaves).square().sum(), leaves, create_graph=True)
    assert_all_close64(grads, expected_grads, "first gradients, create_graph=True")


@case_names
def test_gradgradcheck_passes_or_is_refused(case_name):
    case = CASES[case_name]()
    leaves = [t.clone().requires_grad_(True) for t in case.inputs]
    try:
        assert torch.autograd.gradgradcheck(case.fn, leaves, fast_mode=True)
    except NotImplementedError as error:
        assert_clear_refusal(error, "double backward", case.backward_op)


@case_names
@pytest.mark.parametrize("transform", ["hessian", "jacrev-of-jacrev", "grad-of-grad"])
def test_second_order_transforms_match_or_are_refused(case_name, transform):
    case = CASES[case_name]()
    rest = case.inputs[1:]

    def second_order(fn):
        loss = lambda first: square_loss(fn)(first, *rest)  # noqa: E731
        if transform == "hessian":
            return torch.func.hessian(loss)(case.inputs[0])
        if transform == "jacrev-of-jacrev":
            return torch.func.jacrev(torch.func.jacrev(loss))(case.inputs[0])
        return torch.func.grad(lambda first: torch.func.grad(loss)(first).square().sum())(case.inputs[0])

    try:
        result = second_order(case.fn)
    except NotImplementedError as error:
        # hessian is forward over reverse: the backward op's jvp refuses.
        what = "forward-mode AD of its gradient" if transform == "hessian" else "double backward"
        assert_clear_refusal(error, what, case.backward_op)
    else:
        assert_close64(result, second_order(case.eager), transform)


# ---------------------------------------------------------------------------------------------
# torch.func: grad, vjp, jacrev, vmap and compositions, against the float64 computation


@case_names
@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev"])
def test_func_transforms_match_eager(case_name, transform):
    case = CASES[case_name]()
    every_input = tuple(range(len(case.inputs)))
    if transform == "grad":
        run = lambda fn: torch.func.grad(square_loss(fn), argnums=every_input)(*case.inputs)  # noqa: E731
    elif transform == "vjp":
        cotangent = torch.randn_like(case.eager(*case.inputs))

        def run(fn):
            out, vjp_fn = torch.func.vjp(fn, *case.inputs)
            return (out, *vjp_fn(cotangent))
    else:
        run = lambda fn: torch.func.jacrev(fn, argnums=every_input)(*case.inputs)  # noqa: E731
    assert_all_close64(run(case.fn), run(case.eager), transform)


def batched_like(t, size: int, dim: int):
    """``size`` fresh samples shaped like t, stacked along ``dim``."""
    return torch.randn((size, *t.shape), dtype=t.dtype).movedim(0, dim)


# in_dims per case kind: everything batched; one input batched; batched along a non-leading dim;
# for the layer, weights per sample (which runs one op call per sample).
VMAP_IN_DIMS = {
    "attention": [(0, 0, 0), (0, None, None), (None, 2, 1)],
    "layer": [(0, None, None), (None, 0, 0), (1, 0, None)],
    "varlen": [(0, 0, 0), (0, None, None), (None, 2, 1)],
}


@case_names
@pytest.mark.parametrize("variant", range(3))
def test_vmap_matches_a_loop_of_eager(case_name, variant):
    case = CASES[case_name]()
    in_dims = VMAP_IN_DIMS[case_name.split("-")[0]][variant]
    size = 3
    inputs = [t if d is None else batched_like(t, size, d) for t, d in zip(case.inputs, in_dims)]
    result = torch.func.vmap(case.fn, in_dims=in_dims)(*inputs)
    samples = [[t if d is None else t.select(d, i) for t, d in zip(inputs, in_dims)] for i in range(size)]
    assert_close64(result, torch.stack([case.eager(*s) for s in samples]), f"vmap in_dims={in_dims}")


@case_names
def test_vmap_of_no_samples(case_name):
    case = CASES[case_name]()
    for in_dims in VMAP_IN_DIMS[case_name.split("-")[0]]:
        inputs = [t if d is None else batched_like(t, 0, d) for t, d in zip(case.inputs, in_dims)]
        result = torch.func.vmap(case.fn, in_dims=in_dims)(*inputs)
        assert result.shape == (0, *case.eager(*case.inputs).shape)


# Per-sample gradients: samples along dim 0 of the in_dims-0 inputs, the others shared (weights).
PER_SAMPLE = [(name, (0, 0, 0), (0, 1, 2)) for name in CASES if not name.startswith("layer")] + [
    variant for name in CASES if name.startswith("layer") for variant in [
        (name, (0, None, None), (0, 1, 2)),  # gradients of x and of the shared weights: a call per sample
        (name, (0, None, None), (0,)),       # of x only: folded into one op call
    ]]


@pytest.mark.parametrize("case_name,in_dims,argnums", PER_SAMPLE,
                         ids=[f"{name}-argnums{''.join(map(str, argnums))}" for name, _, argnums in PER_SAMPLE])
def test_per_sample_gradients_equal_a_loop(case_name, in_dims, argnums):
    case = CASES[case_name]()
    size = 4
    inputs = [t if d is None else batched_like(t, size, d) for t, d in zip(case.inputs, in_dims)]
    per_sample = torch.func.vmap(torch.func.grad(square_loss(case.fn), argnums=argnums), in_dims=in_dims)(*inputs)

    def loop(fn):
        samples = [[t if d is None else t[i] for t, d in zip(inputs, in_dims)] for i in range(size)]
        grads = [torch.func.grad(square_loss(fn), argnums=argnums)(*s) for s in samples]
        return [torch.stack(parts) for parts in zip(*grads)]

    assert_all_close64(per_sample, loop(case.fn), "vmap(grad) against a loop of grad")
    assert_all_close64(per_sample, loop(case.eager), "vmap(grad) against a loop of eager grad")


def test_per_sample_gradients_of_the_module():
    """The usual recipe: functional_call over the module's parameters, vmap(grad) over a batch."""
    layer = selfattn.SelfAttention(6, 8, num_heads=2, bias=True, causal=True, dtype=f64)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    batch = torch.randn(5, 7, 6, dtype=f64)  # five (N, E) sequences

    def loss(params, x):
        return torch.func.functional_call(layer, params, (x,)).square().sum()

    def eager_loss(params, x):
        return eager_layer(x, params["in_proj_weight"], params["in_proj_bias"], 2, True).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, batch)
    for name in params:
        expected = torch.stack([torch.func.grad(eager_loss)(params, x)[name] for x in batch])
        assert_close64(per_sample[name], expected, name)


@case_names
def test_compositions(case_name):
    case = CASES[case_name]()
    size = 2
    batched = [batched_like(t, size, 0) for t in case.inputs]
    # vmap of jacrev, against a loop of eager jacrev
    result = torch.func.vmap(torch.func.jacrev(case.fn))(*batched)
    expected = torch.stack([torch.func.jacrev(case.eager)(*(t[i] for t in batched)) for i in range(size)])
    assert_close64(result, expected, "vmap(jacrev)")
    # grad of vmap
    every_input = tuple(range(len(batched)))

    def grad_of_vmap(fn):
        return torch.func.grad(lambda *a: torch.func.vmap(fn)(*a).square().sum(), argnums=every_input)(*batched)

    assert_all_close64(grad_of_vmap(case.fn), grad_of_vmap(case.eager), "grad(vmap)")


def test_vmap_folds_the_samples_into_the_batch_without_a_copy():
    batched = torch.randn(3, 2, 4, 5, 8)  # (V, B, H, N, D)
    (folded,), batch = _vmap._fold((batched,), (0,), 3)
    assert batch == 2 and folded.shape == (6, 4, 5, 8)
    assert folded.data_ptr() == batched.data_ptr() and folded._base is batched
    # The vmapped dim elsewhere (here dim 2) is moved first; V and B adjacent in memory still fold
    # into a view.
    samples_inside = torch.randn(4, 3, 2, 5, 8).permute(1, 2, 0, 3, 4).movedim(0, 2)
    (folded,), _ = _vmap._fold((samples_inside,), (2,), 3)
    assert folded.data_ptr() == samples_inside.data_ptr() and folded._base is not None
    torch.testing.assert_close(folded, samples_inside.movedim(2, 0).flatten(0, 1), rtol=0, atol=0)
    # An unbatched input with B > 1 is copied, once per sample.
    shared = torch.randn(2, 4, 5, 8)
    (folded,), _ = _vmap._fold((shared,), (None,), 3)
    torch.testing.assert_close(folded, shared.repeat(3, 1, 1, 1), rtol=0, atol=0)


def test_vmap_reports_a_bad_argument_in_the_ops_words():
    q, k, v = sample_inputs(2, 2, 5, 6, 8)
    bad_k = torch.randn(2, 2, 6, 7)
    with pytest.raises(ValueError) as unbatched:
        selfattn.attention(q, bad_k, v)
    with pytest.raises(ValueError) as batched:
        torch.func.vmap(selfattn.attention, in_dims=(0, None, None))(batched_like(q, 3, 0), bad_k, v)
    assert str(batched.value) == str(unbatched.value)
    assert re.search(r"k must have shape .*\[2, 2, 6, 8\], got \[2, 2, 6, 7\]", str(batched.value))


# ---------------------------------------------------------------------------------------------
# Masks: vmapped or shared, never differentiated


@pytest.mark.parametrize("mask_batch,mask_dim", [(2, 0), (1, 0), (2, 3), (None, None)],
                         ids=["per-sample-(V,B,..)", "per-sample-(V,1,..)", "per-sample-dim3", "shared-(B,..)"])
def test_vmap_with_a_mask_per_sample(mask_batch, mask_dim):
    """vmap over q and a bool mask (or a shared one) with GQA and causal: forward and vmap(grad)
    against a loop of the oracle, with each sample's dense mask."""
    size, nq, nk = 3, 5, 6
    q = torch.randn(size, 2, 4, nq, 8, dtype=f64)
    k, v = torch.randn(2, 2, nk, 8, dtype=f64), torch.randn(2, 2, nk, 4, dtype=f64)
    if mask_dim is None:
        masks, in_dims = random_visible((2, 1, nq, nk)), (0, None, None, None)
        sample_mask = lambda i: masks  # noqa: E731
    else:
        stacked = random_visible((size, mask_batch, 1, nq, nk))
        masks, in_dims = stacked.movedim(0, mask_dim), (0, None, None, mask_dim)
        sample_mask = lambda i: stacked[i]  # noqa: E731
    causal = torch.ones(nq, nk, dtype=torch.bool).tril()

    def fn(q, k, v, mask):
        return selfattn.attention(q, k, v, mask, is_causal=True, enable_gqa=True)

    out = torch.func.vmap(fn, in_dims=in_dims)(q, k, v, masks)
    expected = torch.stack([masked_softmax_attention(q[i], k, v, sample_mask(i) & causal) for i in range(size)])
    assert_close64(out, expected, "vmap with masks")

    grads = torch.func.vmap(torch.func.grad(square_loss(fn), argnums=(0, 1, 2)), in_dims=in_dims)(q, k, v, masks)
    oracle = lambda i: square_loss(lambda *t: masked_softmax_attention(*t, sample_mask(i) & causal))  # noqa: E731
    expected = [torch.stack(parts) for parts in zip(*(torch.func.grad(oracle(i), argnums=(0, 1, 2))(q[i], k, v)
                                                      for i in range(size)))]
    assert_all_close64(grads, expected, "vmap(grad) with masks")


@pytest.mark.parametrize("argnums", [(0,), (0, 1, 2)], ids=["x", "x-w-b"])
def test_vmap_of_the_layer_with_key_padding_per_sample(argnums):
    size, num_heads, num_kv_heads = 3, 4, 2
    case = layer_gqa_padding_case()
    x = batched_like(case.inputs[0], size, 0)
    w, b = case.inputs[1:]
    real = torch.ones(size, 2, 7, dtype=torch.bool)
    real[0, 1, 5:] = False
    real[2, 0, 2:] = False

    def fn(x, w, b, real):
        return selfattn.self_attention(x, w, b, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                       key_padding_mask=real)

    def eager(i):
        return lambda x, w, b: eager_layer_masked(x, w, b, num_heads, num_kv_heads, real[i][:, None, None, :])

    out = torch.func.vmap(fn, in_dims=(0, None, None, 0))(x, w, b, real)
    assert_close64(out, torch.stack([eager(i)(x[i], w, b) for i in range(size)]), "vmap with key padding")
    grads = torch.func.vmap(torch.func.grad(square_loss(fn), argnums=argnums), in_dims=(0, None, None, 0))(x, w, b, real)
    expected = [torch.stack(parts) for parts in zip(*(torch.func.grad(square_loss(eager(i)), argnums=argnums)(x[i], w, b)
                                                      for i in range(size)))]
    assert_all_close64(grads, expected, "vmap(grad) with key padding")


def test_fold_mask_views_and_copies():
    # Shared with a batch dim of 1: passed as it is.
    shared = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    assert _vmap._fold_mask(shared, None, 3, 2) is shared
    # Vmapped, B entries, contiguous: a view of (V·B, ...).
    per_sample = torch.rand(3, 2, 1, 5, 6) < 0.5
    folded = _vmap._fold_mask(per_sample, 0, 3, 2)
    assert folded.shape == (6, 1, 5, 6) and folded.data_ptr() == per_sample.data_ptr()
    # Shared with B entries, or vmapped with a batch dim of 1: laid out as (V·B, ...), sample-major.
    shared_b = torch.rand(2, 1, 5, 6) < 0.5
    torch.testing.assert_close(_vmap._fold_mask(shared_b, None, 3, 2), shared_b.repeat(3, 1, 1, 1))
    per_sample_1 = torch.rand(1, 1, 5, 3, 6) < 0.5  # vmapped along dim 3
    torch.testing.assert_close(_vmap._fold_mask(per_sample_1, 3, 3, 2),
                               per_sample_1.movedim(3, 0).repeat_interleave(2, 1).flatten(0, 1))


def test_a_mask_that_requires_grad_is_refused():
    q, k, v = sample_inputs(2, 2, 5, 6, 8, dtype=f64)
    bias = torch.randn(1, 1, 5, 6, dtype=f64, requires_grad=True)
    message = r"attn_mask requires grad, but selfattn does not compute the gradient of a mask"
    with pytest.raises(NotImplementedError, match=message):
        selfattn.attention(q, k, v, bias)
    with pytest.raises(NotImplementedError, match=message):
        torch.func.grad(lambda bias: selfattn.attention(q, k, v, bias).sum())(bias.detach())
    with pytest.raises(NotImplementedError, match=message):
        torch.func.grad(lambda q, bias: selfattn.attention(q, k, v, bias).sum(), argnums=(0, 1))(q, bias.detach())
    x, w = torch.randn(2, 5, 6, dtype=f64), torch.randn(12, 6, dtype=f64)
    layer_bias = torch.randn(5, 5, dtype=f64, requires_grad=True)
    with pytest.raises(NotImplementedError, match=message):
        selfattn.self_attention(x, w, num_heads=2, attn_mask=layer_bias)
    with pytest.raises(NotImplementedError, match=message):
        torch.func.grad(lambda m: selfattn.self_attention(x, w, num_heads=2, attn_mask=m).sum())(layer_bias.detach())
    # A detached mask is fine, and its float values do reach the scores.
    out = selfattn.attention(q.requires_grad_(True), k, v, bias.detach())
    assert_close64(out, torch.softmax(q @ k.transpose(-2, -1) / 8**0.5 + bias.detach(), -1) @ v, "float mask")


def test_forward_mode_through_the_raw_varlen_ops():
    """register_autograd gave varlen a zero tangent under forward mode; now it is right, and its
    backward op refuses forward mode (a second derivative)."""
    case = varlen_case()
    q, k, v = case.inputs
    cu_q, cu_k = varlen_cu(VARLEN_Q), varlen_cu(VARLEN_K)
    t = torch.randn_like(q)
    _, tangent = torch.func.jvp(lambda q: ops.varlen_attention_fwd(q, k, v, cu_q, cu_k, 5, 6, True, 8**-0.5)[0],
                                (q,), (t,))
    _, expected = torch.func.jvp(lambda q: case.eager(q, k, v), (q,), (t,))
    assert_close64(tangent, expected, "varlen_attention_fwd")
    out, lse = ops.varlen_attention_fwd(q, k, v, cu_q, cu_k, 5, 6, True, 0.3)
    grad_out = torch.randn_like(out)
    with fwAD.dual_level(), pytest.raises(NotImplementedError) as error:
        ops.varlen_attention_bwd(fwAD.make_dual(grad_out, torch.randn_like(grad_out)), q, k, v, out, lse, cu_q, cu_k,
                                 5, 6, True, 0.3)
    assert_clear_refusal(error.value, "forward-mode AD of its gradient", "varlen_attention_bwd")
