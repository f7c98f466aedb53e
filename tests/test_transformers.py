"""The Hugging Face transformers backend (selfattn/integrations/transformers.py).

Small random-init models built from configs (no downloads): each runs with
attn_implementation="selfattn" against the same weights under "sdpa", and the expected values
come from the sdpa model in float64 (FlashAttention's rule, tests/common.py: selfattn's error at
most twice sdpa's at the same dtype). The attention function itself is checked against an explicit
float64 softmax with a dense mask built here. Skipped without transformers; scripts/
test_transformers.sh runs this file against 4.57.x and the newest 5.x.
"""

import copy
import inspect
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import selfattn  # noqa: E402
from selfattn.integrations import transformers as selfattn_hf  # noqa: E402

from .common import assert_close  # noqa: E402

selfattn_hf.register()

VOCAB = 96


class SelfattnCalls(TorchDispatchMode):
    """Records every torch.ops.selfattn.* call (name, args) made inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "selfattn":
            self.calls.append((func.name(), args))
        return func(*args, **(kwargs or {}))

    def count(self, name):
        return sum(1 for n, _ in self.calls if n == f"selfattn::{name}")


# ---------------------------------------------------------------------------------------------
# The models: a config with every dropout 0, the model class, and a padded batch.


def _llama_config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                    num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                                    max_position_embeddings=64, attention_dropout=0.0)


def _mistral_config():
    return transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=1, num_hidden_layers=2, vocab_size=VOCAB,
                                      max_position_embeddings=64, sliding_window=4, attention_dropout=0.0)


def _gpt2_config():
    return transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=64,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _bart_config():
    return transformers.BartConfig(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                                   encoder_layers=2, decoder_layers=2, encoder_ffn_dim=96, decoder_ffn_dim=96,
                                   vocab_size=VOCAB, max_position_embeddings=64, dropout=0.0,
                                   attention_dropout=0.0, activation_dropout=0.0)


MODELS = {  # name: (config, Auto class, attention layers per forward)
    "llama": (_llama_config, "AutoModelForCausalLM", 2),
    "mistral": (_mistral_config, "AutoModelForCausalLM", 2),
    "gpt2": (_gpt2_config, "AutoModelForCausalLM", 2),
    "bart": (_bart_config, "AutoModelForSeq2SeqLM", 2 + 2 * 2),  # encoder; decoder self + cross
}


def build(name, attn_implementation, dtype=torch.float32, state_dict=None):
    """The model, from a config of its own (models built from one config object share it, and
    from_config(attn_implementation=...) would switch them all)."""
    config_fn, cls_name, _ = MODELS[name]
    model = getattr(transformers, cls_name).from_config(copy.deepcopy(config_fn()),
                                                        attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.to(dtype)


def padding_mask(batch, seq, side):
    """(batch, seq) long, 1 = a real token; row 0 unpadded, the others padded by 1..seq//2."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        pad = int(torch.randint(1, seq // 2 + 1, ()))
        if side == "left":
            mask[b, :pad] = 0
        else:
            mask[b, seq - pad:] = 0
    return mask


def batch_for(name, side, batch=3, seq=10):
    """The model's inputs, and the mask of the output positions that hold real tokens."""
    ids = torch.randint(3, VOCAB, (batch, seq))
    mask = padding_mask(batch, seq, side)
    if name != "bart":
        return {"input_ids": ids, "attention_mask": mask}, mask.bool()
    dec_ids = torch.randint(3, VOCAB, (batch, seq - 3))  # Nq != Nk in cross-attention
    dec_mask = padding_mask(batch, seq - 3, side)
    return ({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_ids,
             "decoder_attention_mask": dec_mask}, dec_mask.bool())


def logits_and_grads(model, inputs, real, loss_weights):
    """Logits at the real positions and every parameter's gradient of a loss over them only
    (padded positions' outputs differ between backends — e.g. a fully masked row — and feed
    nothing real)."""
    model.zero_grad()
    logits = model(**inputs).logits
    loss = (logits[real].double() * loss_weights).sum()
    loss.backward()
    return logits[real].detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# Whole models against sdpa.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_grads_match_sdpa(name, side, dtype):
    reference = build(name, "sdpa", torch.float64)
    state = reference.state_dict()
    inputs, real = batch_for(name, side)
    weights = torch.randn(int(real.sum()), VOCAB, dtype=torch.float64)
    expected, expected_grads = logits_and_grads(reference, inputs, real, weights)
    eager, eager_grads = logits_and_grads(build(name, "sdpa", dtype, state), inputs, real, weights)
    with SelfattnCalls() as calls:
        actual, grads = logits_and_grads(build(name, "selfattn", dtype, state), inputs, real, weights)
    layers = MODELS[name][2]
    assert calls.count("attention_fwd") == layers and calls.count("attention_bwd") == layers
    assert_close(actual, expected, eager, f"{name} logits")
    assert grads.keys() == expected_grads.keys()
    for param in expected_grads:
        assert_close(grads[param], expected_grads[param], eager_grads[param], f"{name} grad {param}")


def _greedy(model, inputs, steps, cache):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, num_beams=1,
                          output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                          **({"cache_implementation": "static"} if cache == "static" else {}))


@pytest.mark.parametrize("name, cache", [(name, "dynamic") for name in MODELS]
                         + [("llama", "static"), ("mistral", "static")])
def test_generate_matches_sdpa(name, cache):
    """Greedy decoding with the KV cache (a static cache's keys include empty slots past the
    queries): the same tokens as sdpa. A random-init model may have a near-tie at some step;
    tokens must agree up to a step whose top two sdpa scores are within rounding, and the scores
    up to there must agree."""
    sdpa = build(name, "sdpa").eval()
    ours = build(name, "selfattn", state_dict=sdpa.state_dict()).eval()
    inputs, _ = batch_for(name, "left")
    if name == "mistral":  # a prompt longer than the window, then steps past it
        inputs, _ = batch_for(name, "left", seq=9)
    steps = 8
    with torch.no_grad():
        expected = _greedy(sdpa, inputs, steps, cache)
        with SelfattnCalls() as calls:
            actual = _greedy(ours, inputs, steps, cache)
    assert calls.count("attention_fwd") >= steps * MODELS[name][2] // (2 if name == "bart" else 1)
    start = 1 if name == "bart" else inputs["input_ids"].shape[1]  # BART's output starts with its start token
    new_expected, new_actual = expected.sequences[:, start:], actual.sequences[:, start:]
    if torch.equal(new_actual, new_expected):
        differs = steps
    else:
        differs = int((new_actual != new_expected).any(0).nonzero()[0])
        top2 = expected.scores[differs].topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() < 1e-4, f"{name}: tokens differ at step {differs}: " \
            f"{new_actual.tolist()} vs sdpa {new_expected.tolist()}"
    for step in range(differs):
        torch.testing.assert_close(actual.scores[step], expected.scores[step], rtol=1e-4, atol=1e-4)


def test_set_attn_implementation_switches_a_built_model():
    model = build("llama", "sdpa")
    inputs, real = batch_for("llama", "left")
    with torch.no_grad():
        expected = model(**inputs).logits[real]
        model.set_attn_implementation("selfattn")
        assert model.config._attn_implementation == "selfattn"
        with SelfattnCalls() as calls:
            actual = model(**inputs).logits[real]
    assert calls.count("attention_fwd") == MODELS["llama"][2]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_gqa_and_masks_reach_the_op_unexpanded():
    """k and v keep their Hkv heads (no repeat_kv); the mask keeps its head dim of 1; Mistral's
    window reaches the kernel as the band (W - 1, 0) where Nq = Nk."""
    config = _mistral_config()
    model = build("mistral", "selfattn")
    inputs, _ = batch_for("mistral", "right")
    with torch.no_grad(), SelfattnCalls() as calls:
        model(**inputs)
    assert calls.calls
    for _, args in calls.calls:
        q, k, v, causal, scale, attn_mask, window_left, window_right = args[:8]
        assert q.shape[1] == config.num_attention_heads and k.shape[1] == v.shape[1] == config.num_key_value_heads
        assert attn_mask is not None and attn_mask.shape[1] == 1 and attn_mask.dtype == torch.bool
        assert (window_left, window_right) == (config.sliding_window - 1, 0)
        assert scale == pytest.approx(config.head_dim ** -0.5 if getattr(config, "head_dim", None)
                                      else (config.hidden_size // config.num_attention_heads) ** -0.5)


# ---------------------------------------------------------------------------------------------
# The attention function alone, against an explicit float64 softmax with a dense mask.


class _Module(torch.nn.Module):
    def __init__(self, is_causal=True):
        super().__init__()
        self.is_causal = is_causal


def explicit_attention(q, k, v, visible, bias=None, scale=None):
    """float64 softmax attention; visible (B, Hq, Nq, Nk) bool, dense; bias added to the scores."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)


def _qkv(batch, hq, hk, nq, nk, dim=16):
    return (torch.randn(batch, hq, nq, dim), torch.randn(batch, hk, nk, dim), torch.randn(batch, hk, nk, dim))


def _band(nq, nk, left=None, top_left=True):
    """Dense (Nq, Nk) causal mask (top-left or bottom-right), optionally limited to `left` keys back."""
    i = torch.arange(nq)[:, None] + (0 if top_left else nk - nq)
    j = torch.arange(nk)[None, :]
    visible = j <= i
    if left is not None:
        visible &= j >= i - left
    return visible


@pytest.mark.parametrize("case", ["causal_none_mask", "decode_one_query", "empty_static_prefill",
                                  "bool_mask_stride0", "float_mask", "not_causal_module",
                                  "sliding_prefill", "explicit_is_causal_false"])
def test_attention_forward_against_explicit_softmax(case):
    batch, hq, hk = 2, 4, 2
    nq, nk = {"decode_one_query": (1, 7), "empty_static_prefill": (5, 9)}.get(case, (6, 6))
    q, k, v = _qkv(batch, hq, hk, nq, nk)
    module, mask, kwargs, bias = _Module(), None, {}, None
    visible = torch.ones(nq, nk, dtype=torch.bool)
    if case in ("causal_none_mask", "empty_static_prefill"):
        visible = _band(nq, nk)  # SDPA's is_causal: top-left
    elif case == "bool_mask_stride0":
        dense = torch.rand(batch, 1, nq, nk + 3) < 0.7  # wider than Nk, as 4.57 may pass it
        dense[..., 0] = True
        mask = dense[:, :, :1].expand(batch, 1, nq, nk + 3)  # stride 0 along the queries
        visible = mask[..., :nk]
    elif case == "float_mask":
        mask = torch.randn(batch, 1, nq, nk)
        mask[..., 1::3] = torch.finfo(torch.float32).min
        bias = mask
    elif case == "not_causal_module":
        module = _Module(is_causal=False)
    elif case == "sliding_prefill":
        kwargs["sliding_window"] = 3
        visible = _band(nq, nk, left=2)
    elif case == "explicit_is_causal_false":
        kwargs["is_causal"] = False
    scale = 0.3
    out, weights = selfattn_hf.attention_forward(module, q, k, v, mask, scaling=scale, **kwargs)
    assert weights is None and out.is_contiguous() and out.shape == (batch, nq, hq, v.shape[-1])
    visible = visible.expand(batch, hq, nq, nk)
    expected = explicit_attention(q, k, v, visible, bias, scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_position_bias_is_folded_into_the_mask():
    """5.x's T5-style position_bias: added to the scores, -big where the bool mask hides a key."""
    batch, heads, nq, nk = 2, 4, 5, 5
    q, k, v = _qkv(batch, heads, heads, nq, nk)
    bias = torch.randn(1, heads, nq, nk)
    mask = torch.rand(batch, 1, nq, nk) < 0.6
    mask[..., 0] = True
    out, _ = selfattn_hf.attention_forward(_Module(False), q, k, v, mask, scaling=1.0, position_bias=bias)
    expected = explicit_attention(q, k, v, mask.expand(batch, heads, nq, nk), bias.expand(batch, -1, -1, -1), 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_unsupported_arguments_are_refused():
    q, k, v = _qkv(1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="softcap"):
        selfattn_hf.attention_forward(_Module(), q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="head_mask"):
        selfattn_hf.attention_forward(_Module(), q, k, v, None, head_mask=torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Dropout and imports.


def test_dropout_follows_training_mode(monkeypatch):
    """The layers' dropout reaches selfattn.attention as dropout_p in training, 0 in eval."""
    seen = []
    attention = selfattn.attention

    def recording(*args, dropout_p=0.0, **kwargs):
        seen.append(dropout_p)
        return attention(*args, dropout_p=0.0, **kwargs)

    monkeypatch.setattr(selfattn, "attention", recording)
    config = _llama_config()
    config.attention_dropout = 0.25
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="selfattn")
    inputs, _ = batch_for("llama", "right")
    model.train()
    model(**inputs)
    assert seen == [0.25] * config.num_hidden_layers
    seen.clear()
    model.eval()
    model(**inputs)
    assert seen == [0.0] * config.num_hidden_layers


@pytest.mark.skipif("rng_state" not in inspect.signature(selfattn.attention).parameters,
                    reason="selfattn.attention has no dropout yet")
def test_dropout_in_training_is_seeded():
    config = _llama_config()
    config.attention_dropout = 0.3
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="selfattn").train()
    inputs, real = batch_for("llama", "right")
    torch.manual_seed(1)
    first = model(**inputs).logits[real]
    torch.manual_seed(1)
    again = model(**inputs).logits[real]
    other = model(**inputs).logits[real]
    assert torch.equal(first, again) and not torch.equal(first, other)
    with torch.no_grad():
        assert not torch.equal(first, model.eval()(**inputs).logits[real])


def test_import_selfattn_does_not_import_transformers():
    code = ("import sys, selfattn, selfattn.integrations.transformers; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
