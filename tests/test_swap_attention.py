"""selfattn.MultiheadAttention's construction and state dict, from_torch, swap_attention, and
nn.Transformer* after the swap: the same outputs and gradients as before it, and selfattn's ops
running in every mode (counted with a TorchDispatchMode, torch's native attention ops too).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import selfattn
from tests.test_mha import F64, CountOps, pair, randomize


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"add_bias_kv": True, "add_zero_attn": True},
                                    {"kdim": 3, "vdim": 5}, {"kdim": 6, "vdim": 6, "batch_first": True}])
def test_same_parameters_initialisation_and_state_dict_both_ways(kwargs):
    torch.manual_seed(7)
    ref = nn.MultiheadAttention(6, 2, **kwargs)
    torch.manual_seed(7)
    ours = selfattn.MultiheadAttention(6, 2, **kwargs)
    assert isinstance(ours, nn.MultiheadAttention)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    assert all(torch.equal(our_state[k], ref_state[k]) for k in ref_state)  # same initialisation
    randomize(ref)
    ours.load_state_dict(ref.state_dict())  # strict, torch -> ours
    fresh = nn.MultiheadAttention(6, 2, **kwargs)
    randomize(ours)
    fresh.load_state_dict(ours.state_dict())  # strict, ours -> torch
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_from_torch_shares_parameters_and_keeps_mode_device_dtype():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True, kdim=4, vdim=4, dtype=F64).eval()
    ours = selfattn.MultiheadAttention.from_torch(mha)
    assert not ours.training and ours.k_proj_weight is mha.k_proj_weight and ours.bias_v is mha.bias_v
    assert ours.out_proj.weight is mha.out_proj.weight
    assert all(p.dtype == F64 and p.device.type == "cpu" for p in ours.parameters())
    assert selfattn.MultiheadAttention.from_torch(mha.train()).training


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_swap_attention_replaces_every_one_and_an_optimizer_keeps_training_them():
    torch.manual_seed(0)
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16,
                           dropout=0.0, dtype=F64)
    count = sum(type(m) is nn.MultiheadAttention for m in model.modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: p for name, p in model.named_parameters()}
    assert selfattn.swap_attention(model) is model
    assert sum(type(m) is selfattn.MultiheadAttention for m in model.modules()) == count == 4
    assert not any(type(m) is nn.MultiheadAttention for m in model.modules())
    assert all(p is before[name] for name, p in model.named_parameters())
    src, tgt = torch.randn(5, 2, 8, dtype=F64), torch.randn(3, 2, 8, dtype=F64)
    old = model.encoder.layers[0].self_attn.in_proj_weight.detach().clone()
    model(src, tgt).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.encoder.layers[0].self_attn.in_proj_weight, old)
    single = nn.MultiheadAttention(4, 1)
    assert type(selfattn.swap_attention(single)) is selfattn.MultiheadAttention


def test_swap_attention_carries_the_hooks_over():
    """Forward pre-hooks, forward hooks (with kwargs) and full backward hooks registered on an
    nn.MultiheadAttention run on its replacement, and a handle taken before the swap removes its hook."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8))
    model.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float32)
    seen = []
    pre = model.attn.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m))))
    model.attn.register_forward_hook(lambda m, args, kwargs, out: seen.append(("post", kwargs["need_weights"])),
                                     with_kwargs=True)
    model.attn.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(("backward", len(grad_out))))
    selfattn.swap_attention(model)
    assert type(model.attn) is selfattn.MultiheadAttention
    x = torch.randn(2, 5, 8, requires_grad=True)
    out, _ = model.attn(x, x, x, need_weights=False)
    out.sum().backward()
    assert seen == [("pre", selfattn.MultiheadAttention), ("post", False), ("backward", 2)]
    pre.remove()
    seen.clear()
    model.attn(x, x, x, need_weights=False)
    assert seen == [("post", False)]


ENCODER_MODES = [  # (training, grad enabled, key padding, enable_nested_tensor, causal mask, batch_first)
    (True, True, False, True, False, True), (True, True, True, False, True, False),
    (False, True, True, True, False, True), (False, False, False, True, False, True),
    (False, False, True, True, False, True), (False, False, True, False, True, True),
    (False, False, False, True, True, False)]


@pytest.mark.parametrize("mode", ENCODER_MODES)
def test_transformer_encoder_after_swap_runs_selfattn_in_every_mode(mode):
    training, grad, padded, nested, causal, batch_first = mode
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype; batch_first=False warns
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).train(training)
    randomize(encoder, 0.3)
    swapped = selfattn.swap_attention(copy.deepcopy(encoder))
    x = torch.randn(3, 6, 16) if batch_first else torch.randn(6, 3, 16)
    kwargs = {}
    if padded:  # left-aligned padding, as the nested conversion needs
        kwargs["src_key_padding_mask"] = torch.arange(6) >= torch.tensor([[6], [4], [2]])
    if causal:
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(6)
    results = []
    for model in (encoder, swapped):
        leaf = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), CountOps() as counter, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(leaf, **kwargs)
        grads = torch.autograd.grad(out.square().sum(), [leaf] + list(model.parameters())) if grad else ()
        results.append((out, grads, counter))
    (ref_out, ref_grads, ref_count), (out, grads, count) = results
    assert count.selfattn_calls() == 2 and count.native_calls() == 0, count.calls
    assert ref_count.selfattn_calls() == 0
    if not training and not grad and batch_first:  # torch's fast paths were taken
        assert ref_count.native_calls() > 0, ref_count.calls
    assert torch.allclose(out, ref_out, atol=2e-5), (out - ref_out).abs().max()
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=2e-4)


@pytest.mark.filterwarnings("ignore:Support for mismatched")
def test_transformer_decoder_after_swap_same_output_and_grads():
    torch.manual_seed(2)
    layer = nn.TransformerDecoderLayer(12, 3, 24, dropout=0.0, dtype=F64)
    decoder = nn.TransformerDecoder(layer, 2)
    randomize(decoder, 0.3)
    swapped = selfattn.swap_attention(copy.deepcopy(decoder))
    tgt, memory = torch.randn(5, 2, 12, dtype=F64), torch.randn(7, 2, 12, dtype=F64)
    kwargs = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=F64), tgt_is_causal=True,
                  memory_key_padding_mask=torch.arange(7) >= torch.tensor([[7], [3]]),
                  tgt_key_padding_mask=torch.arange(5) >= torch.tensor([[5], [4]]))
    results = []
    for model in (decoder, swapped):
        leaves = [tgt.clone().requires_grad_(), memory.clone().requires_grad_()]
        with CountOps() as counter:
            out = model(*leaves, **kwargs)
        results.append((out, torch.autograd.grad(out.square().sum(), leaves + list(model.parameters())), counter))
    (ref_out, ref_grads, _), (out, grads, count) = results
    assert count.selfattn_calls() == 4, count.calls  # self- and cross-attention, two layers
    assert torch.allclose(out, ref_out, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-11) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_input_matches_the_padded_batch(layout):
    ref, ours = pair(embed_dim=8, num_heads=2, batch_first=True)
    ours.eval()
    parts = [torch.randn(5, 8, dtype=F64), torch.randn(2, 8, dtype=F64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nested = torch.nested.nested_tensor(parts, layout=layout)
    with torch.no_grad():
        out, weights = ours(nested, nested, nested)
    for i, part in enumerate(parts):
        expected, expected_w = ref.eval()(part, part, part)
        assert torch.allclose(out.unbind()[i], expected, atol=1e-12)
        n = part.shape[0]
        assert torch.allclose(weights[i, :n, :n], expected_w, atol=1e-12)
        assert (weights[i, n:] == 0).all() and (weights[i, :, n:] == 0).all()
