"""The Hugging Face transformers backend (selfattn/integrations/transformers.py).

Small random-init models built from configs (no downloads): each runs with
attn_implementation="selfattn" against the same weights under "eager" (FlashAttention's rule,
tests/common.py: selfattn's error at most twice eager's at the same dtype). The exact values come
from the model in float64 under "sdpa" — eager rounds float64 scores to float32 before its softmax
in most families, so a left-padded row that sees no key is NaN there and spreads to real rows —
except where sdpa lacks the layer's math (ORACLE_EAGER: GPT-2's layer scaling in 4.57, Gemma 2's
softcap, GPT-OSS's sinks), where the oracle is the model in float64 under "eager" with its float32
softmax upcast lifted. Gemma 2 and GPT-OSS get weights that make their score modification matter
(large q/k projections against a small softcap; sinks from N(0, 1)). Every keyword the installed
release's layers pass must be one the backend knows. The attention function itself is checked against an explicit
float64 softmax with a dense mask built here. Skipped without transformers;
.ci/test_transformers.sh runs this file against 4.57.x and the newest 5.x.
"""

import contextlib
import copy
import inspect
import subprocess
import sys
import warnings

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
        self.named = []  # per call: {argument name: value}, from the op's schema

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "selfattn":
            self.calls.append((func.name(), args))
            names = [a.name for a in func._schema.arguments]
            self.named.append({"op": func.name(), **dict(zip(names, args)), **(kwargs or {})})
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


def _gpt2_layer_scaled_config():
    """GPT-2 scaling by 1/(layer + 1) on top of 1/sqrt(D): 4.57 reads it from the layer's attributes
    in its eager function only (it passes no scaling=), 5.x passes the product."""
    config = _gpt2_config()
    config.scale_attn_by_inverse_layer_idx = True
    return config


def _gemma3_config():
    """Gemma 3 text: a sliding and a global layer, the scale from query_pre_attn_scalar (not D),
    and Gemma 3's own head dim, 256."""
    return transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=256, num_hidden_layers=2, vocab_size=VOCAB,
                                         max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=40,
                                         layer_types=["sliding_attention", "full_attention"],
                                         attention_dropout=0.0)


def _gemma2_config():
    """Gemma 2: a sliding and a global layer, the scale from query_pre_attn_scalar, and a softcap
    small enough for the scores that SHARPEN's q/k projections give (|s| up to ~10s)."""
    return transformers.Gemma2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=VOCAB,
                                     max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=40,
                                     attn_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"],
                                     attention_dropout=0.0)


def _gpt_oss_config():
    """GPT-OSS: GQA, a sliding and a global layer, sinks (drawn from N(0, 1) by SHARPEN). Every
    token takes every expert (2 of 2): a top-k router that picks among them flips at a near-tie on
    rounding-level differences (seen in bfloat16: one token's expert changes, and its logits by
    ~0.1), which would test the router, not the attention. The MoE runs the experts' plain loop
    (5.x's default grouped_mm has no float64 for the oracle); the default YaRN RoPE keeps its own
    max_position_embeddings (a smaller one only draws a warning)."""
    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=VOCAB,
                                       num_local_experts=2, num_experts_per_tok=2, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"], attention_dropout=0.0)
    config._experts_implementation = "eager"
    return config


MODELS = {  # name: (config, Auto class, attention layers per forward); the families docs/integrations.md lists as covered
    "llama": (_llama_config, "AutoModelForCausalLM", 2),
    "mistral": (_mistral_config, "AutoModelForCausalLM", 2),
    "gpt2": (_gpt2_config, "AutoModelForCausalLM", 2),
    "gpt2_layer_scaled": (_gpt2_layer_scaled_config, "AutoModelForCausalLM", 2),
    "gemma3": (_gemma3_config, "AutoModelForCausalLM", 2),
    "gemma2": (_gemma2_config, "AutoModelForCausalLM", 2),
    "gpt_oss": (_gpt_oss_config, "AutoModelForCausalLM", 2),
    "bart": (_bart_config, "AutoModelForSeq2SeqLM", 2 + 2 * 2),  # encoder; decoder self + cross
}


# Families whose float64 oracle is eager: 4.57's sdpa ignores GPT-2's layer scaling attributes;
# sdpa has no softcap (4.57's Gemma 2 would run it without) and no sinks (GPT-OSS refuses sdpa).
ORACLE_EAGER = {"gpt2_layer_scaled", "gemma2", "gpt_oss"}


def _sharpen_gemma2(model):
    """q and k projections of std 0.3: scores well past the softcap of 3, so it changes them."""
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.normal_(0.0, 0.3)
        layer.self_attn.k_proj.weight.normal_(0.0, 0.3)


def _sharpen_gpt_oss(model):
    """Sinks from N(0, 1) (the init draws them near 0), a weight comparable to a row's keys'."""
    for layer in model.model.layers:
        layer.self_attn.sinks.normal_(0.0, 1.0)


# Families compared in float32 only, and why.
FLOAT32_ONLY = {"gpt_oss": "the MoE router's gradient is a sum that cancels (a softmax over the experts' logits): in "
                           "bfloat16, rounding-level differences in the attention move it past 2x eager's error "
                           "(seen: 1 case in 30 with 2 experts of 2, 4 in 30 with 2 of 4)"}

# Weights that make a family's score modification matter, set on a freshly initialised model.
SHARPEN = {"gemma2": _sharpen_gemma2, "gpt_oss": _sharpen_gpt_oss}


def build(name, attn_implementation, dtype=torch.float32, state_dict=None):
    """The model, from a config of its own (models built from one config object share it, and
    from_config(attn_implementation=...) would switch them all); SHARPEN's weights unless
    state_dict is given."""
    config_fn, cls_name, _ = MODELS[name]
    model = getattr(transformers, cls_name).from_config(copy.deepcopy(config_fn()),
                                                        attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    elif name in SHARPEN:
        with torch.no_grad():
            SHARPEN[name](model)
    return model.to(dtype)


@contextlib.contextmanager
def float64_softmax():
    """F.softmax keeps float64 inputs in float64 (eager's dtype=torch.float32 upcast — Gemma 2's —
    would round the float64 oracle's scores to float32, and make a left-padded row that sees no
    key, finfo(float64).min -> -inf, NaN that spreads to the real rows)."""
    softmax = torch.nn.functional.softmax

    def upcast_only(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64:
            dtype = None
        return softmax(input, dim, _stacklevel, dtype)

    torch.nn.functional.softmax = upcast_only
    try:
        yield
    finally:
        torch.nn.functional.softmax = softmax


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
# Whole models against eager.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_grads_match_eager(name, side, dtype):
    if name in FLOAT32_ONLY and dtype != torch.float32:
        pytest.skip(FLOAT32_ONLY[name])
    reference = build(name, "eager" if name in ORACLE_EAGER else "sdpa", torch.float64)
    state = reference.state_dict()
    inputs, real = batch_for(name, side)
    weights = torch.randn(int(real.sum()), VOCAB, dtype=torch.float64)
    with float64_softmax():
        expected, expected_grads = logits_and_grads(reference, inputs, real, weights)
    eager, eager_grads = logits_and_grads(build(name, "eager", dtype, state), inputs, real, weights)
    ours = build(name, "selfattn", dtype, state)
    with SelfattnCalls() as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual, grads = logits_and_grads(ours, inputs, real, weights)
    assert not caught, [str(w.message) for w in caught]  # no fallback or other warning
    assert ours.config._attn_implementation == "selfattn"
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
                         + [("llama", "static"), ("mistral", "static"), ("gemma3", "static"),
                            ("gemma2", "static")])
def test_generate_matches_eager(name, cache):
    """Greedy decoding with the KV cache (a static cache's keys include empty slots past the
    queries): the same tokens as eager. A random-init model may have a near-tie at some step;
    tokens must agree up to a step whose top two eager scores are within rounding, and the scores
    up to there must agree. Prints how many (step, row) pairs of eager's had such a near-tie."""
    eager = build(name, "eager").eval()
    ours = build(name, "selfattn", state_dict=eager.state_dict()).eval()
    inputs, _ = batch_for(name, "left")
    if name in ("mistral", "gemma3", "gemma2", "gpt_oss"):  # a prompt longer than the window, then steps past it
        inputs, _ = batch_for(name, "left", seq=9)
    steps = 8
    with torch.no_grad():
        expected = _greedy(eager, inputs, steps, cache)
        with SelfattnCalls() as calls, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            actual = _greedy(ours, inputs, steps, cache)
    assert not [w for w in caught if "selfattn" in str(w.message) or "eager" in str(w.message)], \
        [str(w.message) for w in caught]  # no fallback
    assert calls.count("attention_fwd") >= steps * MODELS[name][2] // (2 if name == "bart" else 1)
    start = 1 if name == "bart" else inputs["input_ids"].shape[1]  # BART's output starts with its start token
    new_expected, new_actual = expected.sequences[:, start:], actual.sequences[:, start:]
    margins = torch.stack([s.topk(2, dim=-1).values.diff(dim=-1).neg().squeeze(-1) for s in expected.scores])
    print(f"generate {name} {cache}: {int((margins < 1e-4).sum())} of {margins.numel()} (step, row) pairs with "
          f"eager's top-2 margin < 1e-4; tokens {'equal' if torch.equal(new_actual, new_expected) else 'differ'}")
    if torch.equal(new_actual, new_expected):
        differs = steps
    else:
        differs = int((new_actual != new_expected).any(0).nonzero()[0])
        top2 = expected.scores[differs].topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() < 1e-4, f"{name}: tokens differ at step {differs}: " \
            f"{new_actual.tolist()} vs eager {new_expected.tolist()}"
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


def explicit_attention(q, k, v, visible, bias=None, scale=None, softcap=None, sinks=None):
    """float64 softmax attention; visible (B, Hq, Nq, Nk) bool, dense; bias added to the scores;
    softcap · tanh(s / softcap) before the mask; sinks (Hq,) one more logit per row, no value."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        column = sinks.double()[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
    else:
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
                                  "sliding_prefill", "explicit_is_causal_false", "softcap", "s_aux",
                                  "softcap_s_aux_sliding_decode"])
def test_attention_forward_against_explicit_softmax(case):
    batch, hq, hk = 2, 4, 2
    nq, nk = {"decode_one_query": (1, 7), "empty_static_prefill": (5, 9),
              "softcap_s_aux_sliding_decode": (1, 7)}.get(case, (6, 6))
    q, k, v = _qkv(batch, hq, hk, nq, nk)
    module, mask, kwargs, bias, mods = _Module(), None, {}, None, {}
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
    elif case in ("softcap", "s_aux"):  # Gemma 2, GPT-OSS (prefill: causal from is_causal, no mask)
        q = q * 4  # scores past the softcap
        visible = _band(nq, nk)
        mods = {"softcap": 2.0} if case == "softcap" else {"sinks": torch.randn(hq)}
        kwargs = {"softcap": 2.0} if case == "softcap" else {"s_aux": mods["sinks"]}
    elif case == "softcap_s_aux_sliding_decode":  # one query, the window in transformers' mask
        mask = _band(nq, nk, left=3, top_left=False)[None, None].expand(batch, 1, nq, nk)
        visible = mask
        mods = {"softcap": 2.0, "sinks": torch.randn(hq)}
        kwargs = {"softcap": 2.0, "s_aux": mods["sinks"], "sliding_window": 4}
    scale = 0.3
    out, weights = selfattn_hf.attention_forward(module, q, k, v, mask, scaling=scale, **kwargs)
    assert weights is None and out.is_contiguous() and out.shape == (batch, nq, hq, v.shape[-1])
    visible = visible.expand(batch, hq, nq, nk)
    expected = explicit_attention(q, k, v, visible, bias, scale, **mods)
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
    with pytest.raises(ValueError, match=r"^selfattn: _Module passes head_mask= .*attn_implementation='eager'$"):
        selfattn_hf.attention_forward(_Module(), q, k, v, None, head_mask=torch.ones(2))
    with pytest.raises(ValueError, match=r"sinks= \(per-token attention-sink logits\)"):
        selfattn_hf.attention_forward(_Module(), q, k, v, None, sinks=torch.zeros(2))  # 5.x inkling2's
    with pytest.raises(ValueError, match=r"^selfattn: _Module passes s_aux= of shape \(1, 2\); .* shape \(2,\)"):
        selfattn_hf.attention_forward(_Module(), q, k, v, None, s_aux=torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"the keyword frobnicate=, which the selfattn backend does not know"):
        selfattn_hf.attention_forward(_Module(), q, k, v, None, frobnicate=False)
    relative = _Module()
    relative.position_embedding_type = "relative_key"  # 4.57's ESM: read by its eager function, no keyword
    with pytest.raises(ValueError, match=r"_Module adds relative_key position embeddings to the scores"):
        selfattn_hf.attention_forward(relative, q, k, v, None)
    packed = torch.tensor([0, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seq_lens_q= for 2 packed sequences but no attention_mask"):
        selfattn_hf.attention_forward(_Module(), q, k, v, None, cu_seq_lens_q=packed, cu_seq_lens_k=packed)
    # None leaves them off; bookkeeping passes; a packed batch whose mask carries the packing passes
    visible = _band(3, 3) & (torch.tensor([0, 0, 1])[:, None] == torch.tensor([0, 0, 1])[None, :])
    out, _ = selfattn_hf.attention_forward(_Module(), q, k, v, visible[None, None], softcap=None, s_aux=None,
                                           sinks=None, head_mask=None, position_ids=torch.arange(3)[None], use_cache=True,
                                           cu_seq_lens_q=packed, cu_seq_lens_k=packed, max_length_q=2,
                                           max_length_k=2)
    torch.testing.assert_close(out.double(), explicit_attention(q, k, v, visible.expand(1, 2, 3, 3)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_softcap_and_sinks_reach_the_op(name):
    """Gemma 2's softcap and GPT-OSS's s_aux reach every attention_fwd as the op's softcap and sinks
    (the layer's own parameter, so its gradient flows), and they matter for these weights: eager
    without them differs from eager with them far beyond any tolerance."""
    model = build(name, "selfattn")
    inputs, real = batch_for(name, "left")
    with torch.no_grad(), SelfattnCalls() as calls:
        model(**inputs)
    layers = model.model.layers
    assert [c["op"] for c in calls.named] == ["selfattn::attention_fwd"] * len(layers)
    for call, layer in zip(calls.named, layers):
        if name == "gemma2":
            assert call.get("softcap", 0.0) == model.config.attn_logit_softcapping and call.get("sinks") is None
        else:
            assert call.get("softcap", 0.0) == 0.0 and call["sinks"].data_ptr() == layer.self_attn.sinks.data_ptr()
    eager = build(name, "eager", state_dict=model.state_dict())
    plain = build(name, "eager", state_dict=model.state_dict())
    if name == "gemma2":
        plain.config.attn_logit_softcapping = None
        for layer in plain.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    else:
        for layer in plain.model.layers:
            layer.self_attn.sinks.data.fill_(-float("inf"))  # weight e^-inf = 0: no sink
    with torch.no_grad():
        change = (eager(**inputs).logits[real] - plain(**inputs).logits[real]).abs().max()
    assert change > 0.1, f"{name}: the score modification changes the logits by only {float(change)}"


def _attention_call_keywords(root):
    """{keyword: sorted model families} passed by name at every call of a model's attention function
    (attention_interface(...), ALL_ATTENTION_FUNCTIONS[...](...), eager_attention_forward(...)) in
    the modeling files under root."""
    import ast
    found = {}
    for path in sorted(root.glob("models/*/modeling_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if isinstance(func, ast.Subscript):  # ALL_ATTENTION_FUNCTIONS[...](...)
                name = ast.unparse(func.value).rsplit(".", 1)[-1]
            elif isinstance(func, ast.Call):  # ALL_ATTENTION_FUNCTIONS.get_interface(...)(...)
                name = ast.unparse(func.func).split(".", 1)[0]
            if name in ("attention_interface", "ALL_ATTENTION_FUNCTIONS") or \
                    (name or "").endswith("eager_attention_forward"):
                for kw in node.keywords:
                    if kw.arg is not None:
                        found.setdefault(kw.arg, set()).add(path.parent.name)
    return {k: sorted(v) for k, v in found.items()}


def test_every_keyword_the_installed_models_pass_is_known():
    """Every keyword that a layer of the installed transformers passes to its attention function by
    name, and every key of its **kwargs TypedDicts, is honoured (a parameter of attention_forward),
    harmless, or refused: a release that adds one fails here before it is silently dropped."""
    from pathlib import Path

    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    from transformers.utils.generic import TransformersKwargs
    honoured = set(inspect.signature(selfattn_hf.attention_forward).parameters) - {"module", "kwargs"}
    known = honoured | selfattn_hf.HARMLESS_KEYWORDS | set(selfattn_hf.UNSUPPORTED_KEYWORDS)
    passed = _attention_call_keywords(Path(transformers.__file__).parent)
    assert {"scaling", "dropout", "sliding_window"} <= set(passed) and "gpt_oss" in passed["s_aux"]
    assert "gemma2" in passed["softcap"] and {"softcap", "s_aux"} <= honoured
    typed = set(TransformersKwargs.__annotations__) | set(FlashAttentionKwargs.__annotations__)
    unknown = {k: v[:5] for k, v in passed.items() if k not in known}
    unknown.update({k: ["TransformersKwargs"] for k in typed - known})
    assert not unknown, f"transformers {transformers.__version__}: keywords neither honoured, harmless nor " \
                        f"refused (keyword: families): {unknown}"
    assert not (selfattn_hf.HARMLESS_KEYWORDS & set(selfattn_hf.UNSUPPORTED_KEYWORDS))


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
