"""selfattn.MultiheadAttention against torch.nn.MultiheadAttention (swap_attention and nn.Transformer*:
test_swap_attention.py).

The oracle is nn.MultiheadAttention itself, in float64, with the same weights (its slow path:
inputs that require grad keep it off its native fast path), and for what it cannot give (dropout's
keep mask, rows that see no key) an explicit softmax written here. Configurations are a seeded
random sample of every constructor option × every forward option, not the full product.
"""

from __future__ import annotations

import collections
import random
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import selfattn
from tests.common import FACTOR, FLOOR, max_error

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor

F64 = torch.float64


class CountOps(TorchDispatchMode):
    """Counts the ops that reach the dispatcher, by name ('selfattn::self_attention_fwd', ...)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.name()] += 1
        return func(*args, **(kwargs or {}))

    def selfattn_calls(self) -> int:
        return sum(n for name, n in self.calls.items() if name.startswith("selfattn::"))

    def native_calls(self) -> int:
        return sum(n for name, n in self.calls.items()
                   if name in ("aten::_transformer_encoder_layer_fwd", "aten::_native_multi_head_attention"))


def randomize(module: nn.Module, scale: float = 0.5) -> None:
    """Fresh random values in every parameter (nn.MultiheadAttention starts its biases at 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)


def pair(dtype=F64, **kwargs):
    """(nn.MultiheadAttention with random parameters, selfattn.MultiheadAttention loaded from it)."""
    ref = nn.MultiheadAttention(dtype=dtype, **kwargs)
    randomize(ref)
    ours = selfattn.MultiheadAttention(dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


# ---------------------------------------------------------------------------------------------
# Random configurations


def random_config(rng: random.Random) -> dict:
    heads = rng.randint(1, 4)
    embed = heads * rng.randint(1, 6)
    ctor = dict(embed_dim=embed, num_heads=heads, bias=rng.random() < 0.7, add_bias_kv=rng.random() < 0.2,
                add_zero_attn=rng.random() < 0.2, batch_first=rng.random() < 0.5)
    if rng.random() < 0.2:
        ctor["kdim"], ctor["vdim"] = rng.randint(1, 9), rng.choice([None, rng.randint(1, 9)])
    same_dims = ctor.get("kdim") in (None, embed) and ctor.get("vdim") in (None, embed)
    length = rng.randint(1, 6)
    inputs = rng.choice(["self", "self", "self", "shared_kv", "separate"])
    fwd = dict(batched=rng.random() < 0.75, batch=rng.randint(1, 3), tgt=length,
               src=length if inputs == "self" or rng.random() < 0.3 else rng.randint(1, 7), inputs=inputs,
               key_padding_mask=rng.choice([None, None, "bool", "float"]),
               attn_mask=rng.choice([None, "bool2", "bool3", "float2", "float3", "causal"]),
               is_causal=rng.random() < 0.4, need_weights=rng.random() < 0.5,
               average_attn_weights=rng.random() < 0.5, training=rng.random() < 0.5)
    if fwd["inputs"] == "self" and not (same_dims and fwd["tgt"] == fwd["src"]):
        fwd["inputs"] = "separate"
    if fwd["inputs"] == "shared_kv" and ctor.get("kdim") != ctor.get("vdim"):
        fwd["inputs"] = "separate"
    if fwd["is_causal"] and fwd["attn_mask"] is None:
        fwd["attn_mask"] = "causal"
    return ctor, fwd


def make_mask(kind, shape, rng_gen):
    """A mask in nn.MultiheadAttention's convention, every row with key 0 allowed (so no row is
    fully masked: torch gives NaN there). bool: True = not allowed; float: added, some -inf."""
    if kind is None:
        return None
    if kind == "causal":
        return torch.ones(shape[-2:], dtype=torch.bool).triu(1)
    hidden = torch.rand(shape, generator=rng_gen) < 0.3
    hidden[..., 0] = False
    if kind.startswith("bool"):
        return hidden
    return torch.randn(shape, generator=rng_gen, dtype=F64).masked_fill(hidden, float("-inf"))


def make_inputs(ctor, fwd, gen):
    embed = ctor["embed_dim"]
    kdim, vdim = ctor.get("kdim") or embed, ctor.get("vdim") or embed

    def shaped(n, e):
        if not fwd["batched"]:
            return (n, e)
        return (fwd["batch"], n, e) if ctor["batch_first"] else (n, fwd["batch"], e)

    query = torch.randn(shaped(fwd["tgt"], embed), generator=gen, dtype=F64)
    key = torch.randn(shaped(fwd["src"], kdim), generator=gen, dtype=F64)
    value = torch.randn(shaped(fwd["src"], vdim), generator=gen, dtype=F64)
    if fwd["inputs"] == "self":
        return (query,), (0, 0, 0)
    if fwd["inputs"] == "shared_kv":
        return (query, key), (0, 1, 1)
    return (query, key, value), (0, 1, 2)


def run(module, leaves, which, masks, fwd, grad_out):
    """Output, weights and the gradients of every input and parameter, for fixed output grads
    (the weights' grads drawn from a fixed seed, so both modules get the same)."""
    module.train(fwd["training"])
    args = [leaves[i] for i in which]
    out, weights = module(*args, **masks, need_weights=fwd["need_weights"],
                          average_attn_weights=fwd["average_attn_weights"], is_causal=fwd["is_causal"])
    loss = (out * grad_out).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=torch.Generator().manual_seed(5),
                                             dtype=F64)).sum()
    params = dict(module.named_parameters())
    got = torch.autograd.grad(loss, list(leaves) + list(params.values()))
    return out, weights, dict(zip([f"input{i}" for i in range(len(leaves))] + list(params), got))


@pytest.mark.parametrize("case", range(40))
def test_matches_torch_on_random_configurations(case):
    rng = random.Random(1000 + case)
    gen = torch.Generator().manual_seed(case)
    ctor, fwd = random_config(rng)
    ref, ours = pair(**ctor)
    inputs, which = make_inputs(ctor, fwd, gen)
    heads, n, l, s = ctor["num_heads"], fwd["batch"], fwd["tgt"], fwd["src"]
    masks = {}
    if fwd["key_padding_mask"]:
        masks["key_padding_mask"] = make_mask(fwd["key_padding_mask"], (n, s) if fwd["batched"] else (s,), gen)
    kind = fwd["attn_mask"]
    if kind:
        rows = (n * heads if fwd["batched"] else heads,) if kind.endswith("3") else ()
        masks["attn_mask"] = make_mask(kind, rows + (l, s), gen)
    out_shape = ((n, l) if ctor["batch_first"] else (l, n)) if fwd["batched"] else (l,)
    grad_out = torch.randn(out_shape + (ctor["embed_dim"],), generator=gen, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warning for mixed mask dtypes
        expected = run(ref, [t.clone().requires_grad_() for t in inputs], which, masks, fwd, grad_out)
        actual = run(ours, [t.clone().requires_grad_() for t in inputs], which, masks, fwd, grad_out)
    where = f"{ctor} {fwd}"
    assert actual[0].shape == expected[0].shape and torch.allclose(actual[0], expected[0], atol=1e-11), where
    assert (actual[1] is None) == (expected[1] is None), where
    if expected[1] is not None:
        assert actual[1].shape == expected[1].shape and torch.allclose(actual[1], expected[1], atol=1e-11), where
    assert actual[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        assert torch.allclose(actual[2][name], grad, atol=1e-10), f"grad of {name}: {where}"


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("hint", ["true", "wrong"])
@pytest.mark.parametrize("inputs", ["self", "cross"])
def test_is_causal_hint_as_torch(need_weights, padded, hint, inputs):
    """torch drops attn_mask for a causal band only without key padding and weights, and uses the
    mask otherwise: with a wrong hint too, the same result as torch in each case."""
    ref, ours = pair(embed_dim=8, num_heads=2)
    x = torch.randn(5, 2, 8, dtype=F64)
    kv = x if inputs == "self" else torch.randn(7, 2, 8, dtype=F64)
    causal = torch.ones(5, kv.shape[0], dtype=torch.bool).triu(1)
    mask = causal if hint == "true" else torch.rand(5, kv.shape[0]) < 0.4
    mask[:, 0] = False
    kwargs = dict(attn_mask=mask, is_causal=True, need_weights=need_weights)
    if padded:
        kwargs["key_padding_mask"] = torch.arange(kv.shape[0]) >= torch.tensor([[9], [4]])
    results = []
    for module in (ref, ours):
        leaf = x.clone().requires_grad_()
        out, weights = module(leaf, *([leaf, leaf] if inputs == "self" else [kv, kv]), **kwargs)
        results.append((out, weights, torch.autograd.grad(out.sum(), leaf)[0]))
    for expected, actual in zip(*results):
        assert (expected is None) == (actual is None)
        if expected is not None:
            assert torch.allclose(actual, expected, atol=1e-12)


def test_self_attention_takes_the_fused_op():
    ours = selfattn.MultiheadAttention(8, 2, dtype=F64)
    x, y = torch.randn(4, 3, 8, dtype=F64), torch.randn(6, 3, 8, dtype=F64)
    for args, need_weights, op in (((x, x, x), False, "selfattn::self_attention_fwd"),
                                   ((x, x, x), True, "selfattn::attention_fwd"),
                                   ((x, y, y), False, "selfattn::attention_fwd")):
        with CountOps() as counter:
            ours(*args, need_weights=need_weights)
        assert counter.selfattn_calls() == 1 and counter.calls[op] == 1, counter.calls


class _ThreeAliases(torch.autograd.Function):
    """x three times, as three outputs of one node: what FSDP2's pre-forward hook makes of (h, h, h)."""

    @staticmethod
    def forward(ctx, a, b, c):
        return a.view_as(a), b.view_as(b), c.view_as(c)

    @staticmethod
    def backward(ctx, ga, gb, gc):
        return ga, gb, gc


def test_aliases_from_one_node_take_the_fused_op_and_keep_the_gradient():
    ours = selfattn.MultiheadAttention(8, 2, dtype=F64)
    x = torch.randn(4, 3, 8, dtype=F64, requires_grad=True)
    expected = torch.autograd.grad(ours(x, x, x, need_weights=False)[0].sum(), x)[0]
    q, k, v = _ThreeAliases.apply(x, x, x)
    with CountOps() as counter:
        out = ours(q, k, v, need_weights=False)[0]
    assert counter.calls["selfattn::self_attention_fwd"] == 1, counter.calls
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], expected)
    # A detached alias is another input: the separate projections, and no gradient through it.
    with CountOps() as counter:
        ours(x, x.detach(), x.detach(), need_weights=False)
    assert counter.calls["selfattn::attention_fwd"] == 1, counter.calls


def test_float32_within_twice_torchs_error():
    """float32 against float64 nn.MultiheadAttention: at most FACTOR × float32 torch's error."""
    ref64 = nn.MultiheadAttention(64, 4, batch_first=True, dtype=F64)
    randomize(ref64, 0.15)  # outputs O(1)
    ref32 = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    ref32.load_state_dict({k: v.float() for k, v in ref64.state_dict().items()})
    ours32 = selfattn.MultiheadAttention(64, 4, batch_first=True).eval()
    ours32.load_state_dict(ref32.state_dict())
    ref64.eval()
    x = torch.randn(2, 40, 64, dtype=F64)
    padding = torch.arange(40) >= torch.tensor([[40], [23]])
    for kwargs in ({}, {"key_padding_mask": padding}):
        expected, expected_w = ref64(x, x, x, **kwargs)
        eager, eager_w = ref32(x.float(), x.float(), x.float(), **kwargs)
        for need_weights in (True, False):
            out, w = ours32(x.float(), x.float(), x.float(), need_weights=need_weights, **kwargs)
            for a, e, b in ((out, expected, eager), (w, expected_w, eager_w)) if need_weights else ((out, expected, eager),):
                bound = FACTOR * max_error(b, e) + FLOOR[torch.float32] * max(1.0, e.abs().max().item())
                assert max_error(a, e) <= bound


# ---------------------------------------------------------------------------------------------
# Where selfattn differs, and dropout


def test_fully_masked_rows_give_zero_not_nan():
    ref, ours = pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    hidden = torch.zeros(5, 5, dtype=torch.bool)
    hidden[2] = True  # query 2 sees no key
    out, weights = ours(x, x, x, attn_mask=hidden, average_attn_weights=False)
    _, ref_weights = ref(x, x, x, attn_mask=hidden, average_attn_weights=False)
    assert torch.isnan(ref_weights[:, :, 2]).all()  # what torch gives: documented difference
    assert (weights[:, :, 2] == 0).all() and torch.isfinite(weights).all()
    # Attention output 0 there, so the output is the out-projection's bias.
    assert torch.allclose(out[:, 2], ours.out_proj.bias.expand(2, 8))
    others = [0, 1, 3, 4]
    ref_out, _ = ref(x, x, x, attn_mask=hidden)
    assert torch.allclose(out[:, others], ref_out[:, others], atol=1e-12)
    (grad,) = torch.autograd.grad((out.sum() + weights.sum()), x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("inputs", ["self", "separate"])
def test_dropout_in_training_uses_the_keep_mask_of_dropout_mask(need_weights, inputs):
    p = 0.3
    ref, ours = pair(embed_dim=12, num_heads=3, dropout=p, add_zero_attn=(inputs == "separate"), batch_first=True)
    ours.train()
    x = torch.randn(2, 7, 12, dtype=F64)
    kv = x if inputs == "self" else torch.randn(2, 5, 12, dtype=F64)
    torch.manual_seed(123)
    out, weights = ours(x, kv, kv, need_weights=need_weights, average_attn_weights=False)
    torch.manual_seed(123)  # the one draw the module makes
    rng_state = selfattn.rng.draw_rng_state(x.device)
    s = kv.shape[1] + (inputs == "separate")
    keep = selfattn.dropout_mask(rng_state, (2, 3, 7, s), p)
    # Eager float64 with the same keep mask.
    w_q, w_k, w_v = ref.in_proj_weight.chunk(3)
    b_q, b_k, b_v = ref.in_proj_bias.chunk(3)
    split = lambda t: t.unflatten(-1, (3, 4)).transpose(1, 2)  # noqa: E731
    q, k, v = split(x @ w_q.T + b_q), split(kv @ w_k.T + b_k), split(kv @ w_v.T + b_v)
    if inputs == "separate":
        k, v = (torch.cat([t, t.new_zeros(2, 3, 1, 4)], dim=2) for t in (k, v))
    probs = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) * keep / (1 - p)
    expected = (probs @ v).transpose(1, 2).flatten(2) @ ref.out_proj.weight.T + ref.out_proj.bias
    assert torch.allclose(out, expected, atol=1e-12)
    if need_weights:
        assert torch.allclose(weights, probs, atol=1e-12)
    ours.eval()  # eval: no dropout at all
    assert torch.allclose(ours(x, kv, kv)[0], ref.eval()(x, kv, kv)[0], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument (and torch refuses the same call)


def _bad_cases():
    x = torch.randn(4, 2, 8)
    return [
        ("query rank", (torch.randn(2, 4, 2, 8), x, x), {}, ValueError, "query must be 2-D"),
        ("key rank", (x, torch.randn(4, 8), x), {}, ValueError, "key and value must be 3-D"),
        ("query width", (torch.randn(4, 2, 7), x, x), {}, ValueError, "query's last dim must be embed_dim = 8"),
        ("key width", (x, torch.randn(4, 2, 7), x), {}, ValueError, "key's last dim must be kdim = 8"),
        ("value length", (x, x, torch.randn(5, 2, 8)), {}, ValueError, "key and value must have the same"),
        ("batch", (x, torch.randn(4, 3, 8), torch.randn(4, 3, 8)), {}, ValueError, "the same batch size"),
        ("kpm dtype", (x, x, x), {"key_padding_mask": torch.zeros(2, 4, dtype=torch.int64)}, TypeError,
         "key_padding_mask must be bool"),
        ("kpm shape", (x, x, x), {"key_padding_mask": torch.zeros(4, 2, dtype=torch.bool)}, ValueError,
         "key_padding_mask must have shape (N, S) = (2, 4)"),
        ("mask dtype", (x, x, x), {"attn_mask": torch.zeros(4, 4, dtype=torch.int32)}, TypeError,
         "attn_mask must be bool"),
        ("mask shape", (x, x, x), {"attn_mask": torch.zeros(3, 4, 4, dtype=torch.bool)}, ValueError,
         "attn_mask must have shape (L, S) = (4, 4) or (N·num_heads, L, S) = (4, 4, 4)"),
        ("hint alone", (x, x, x), {"is_causal": True}, ValueError, "is_causal=True needs attn_mask"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_give_clear_errors(case):
    _, args, kwargs, error, message = case
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2)
    ours = selfattn.MultiheadAttention.from_torch(ref)
    with pytest.raises(Exception):
        ref(*args, **kwargs)
    with pytest.raises(error) as raised:
        ours(*args, **kwargs)
    assert message in str(raised.value)


def test_nested_input_with_a_mask_is_refused():
    ours = selfattn.MultiheadAttention(8, 2, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    with pytest.raises(ValueError, match="nested tensor input needs self-attention"):
        ours(nested, nested, nested, attn_mask=torch.zeros(3, 3, dtype=torch.bool))


def test_compiles_fullgraph():
    ref, ours = pair(embed_dim=16, num_heads=4, batch_first=True, dtype=torch.float32)
    x = torch.randn(2, 9, 16)
    padding = torch.arange(9) >= torch.tensor([[9], [5]])
    compiled = torch.compile(lambda x: ours(x, x, x, key_padding_mask=padding, need_weights=False)[0], fullgraph=True,
                             backend="aot_eager")  # traced with the fake kernels; no code generation (CI time)
    expected = ref(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    assert torch.allclose(compiled(x), expected, atol=1e-5)


def test_gradcheck_output_and_weights():
    _, ours = pair(embed_dim=4, num_heads=2, add_bias_kv=True, batch_first=True)
    hidden = torch.rand(3, 3) < 0.3
    hidden[:, 0] = False

    def f(x):
        out, weights = ours(x, x, x, attn_mask=hidden, average_attn_weights=False)
        return out, weights

    assert torch.autograd.gradcheck(f, (torch.randn(2, 3, 4, dtype=F64, requires_grad=True),))
