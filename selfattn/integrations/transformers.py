"""Hugging Face transformers backend: every attention layer of a model through selfattn.

    import selfattn.integrations.transformers as selfattn_hf
    selfattn_hf.register()                                   # once, names the backend "selfattn"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="selfattn")
    # or, on a model already built: model.set_attn_implementation("selfattn")

``register`` adds two entries to transformers' registries: ``attention_forward`` (the layers'
attention function, ``AttentionInterface``) and transformers' own ``sdpa_mask`` as its mask
function (``AttentionMaskInterface``). Without the second, transformers gives a registered
backend ``attention_mask=None`` and padding, sliding windows and cache offsets are lost. With it
the masks are exactly the ones the "sdpa" backend gets: a bool (B, 1, Nq, Nk) mask, True = take
part — or None where SDPA's ``is_causal`` suffices — or, from models that build their own, an
additive float mask. The mask is passed to the op as it comes (a view, never expanded to the
heads; the kernels read it through its strides).

Works with transformers 4.57.x and 5.x; the differences between their ``sdpa_attention_forward``
that matter here are handled in ``attention_forward`` (the causal rule, ``position_bias``);
score modifications come as keywords (``softcap``, ``s_aux`` sinks) and are selfattn's own; every
other keyword a model passes is either bookkeeping (HARMLESS_KEYWORDS) or refused. This module
imports transformers only inside ``register``; ``import selfattn`` never imports it.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

import selfattn

# Every keyword a model's layer passes to its attention function falls in one of three groups
# (read from the modeling files of transformers 4.57.6 and 5.25; tests/test_transformers.py checks
# the installed release's call sites against them). A keyword in none of them is refused, so a
# release that adds one that changes the result fails loudly instead of being silently wrong.
#
# Honoured: the named parameters of attention_forward (attention_mask, dropout, scaling, is_causal,
# sliding_window, position_bias, output_attentions, softcap, s_aux).
#
# Harmless: bookkeeping that does not change the attention's result here.
HARMLESS_KEYWORDS = frozenset({
    "position_ids",  # positions (RoPE is applied before); packed sequences reach us in the mask
    "cache_position", "past_key_value", "past_key_values", "cache", "use_cache",  # k, v already hold the past
    "position_embeddings", "layer_idx",  # applied to q and k before the call
    "output_hidden_states", "output_router_logits", "return_dict", "num_items_in_batch",  # outputs, loss
    "deterministic",  # flash-attn's determinism switch; selfattn is deterministic by default
    "seq_idx",  # packed-sequence index of the Mamba kernels; attention's packing is in the mask
    "logits_indices", "logits_processor_args", "logits_to_keep",  # which logits the model keeps
    # flash-attn's packed-sequence lengths: transformers builds the same packing into the mask from
    # position_ids, so they are redundant here, as for sdpa, whenever a mask comes along (checked)
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "max_seqlen_q", "max_seqlen_k",
})
# Refused when not None: they change the result and selfattn does not implement them (yet).
UNSUPPORTED_KEYWORDS = {
    # 5.x inkling2's sinks, one per query token (projected from the hidden states, (B, H, N, 1)):
    # selfattn's sinks are one per head (the families that pass those as s_aux= are served)
    "sinks": "per-token attention-sink logits",
    "head_mask": "a per-head mask of the attention weights (sdpa ignores it with a warning)",
    "indices": "sparse key selection",
    "block_indices": "block-sparse key selection",
    "read_index": "continuous batching's paged KV cache",
    "write_index": "continuous batching's paged KV cache",
    "block_table": "continuous batching's paged KV cache",
    "k_cache": "continuous batching's paged KV cache",
    "v_cache": "continuous batching's paged KV cache",
}


def _check_keywords(module: torch.nn.Module, attention_mask: Optional[Tensor], kwargs: dict) -> None:
    """Refuses, in one sentence naming the keyword and the layer's class, a keyword that would change
    the result and is not implemented, and any keyword this backend does not know."""
    layer = type(module).__name__
    for name, value in kwargs.items():
        if name in UNSUPPORTED_KEYWORDS:
            if value is not None:
                raise ValueError(f"selfattn: {layer} passes {name}= ({UNSUPPORTED_KEYWORDS[name]}), which the "
                                 "selfattn backend does not implement; use attn_implementation='eager'")
        elif name not in HARMLESS_KEYWORDS:
            raise ValueError(f"selfattn: {layer} passes the keyword {name}=, which the selfattn backend does not "
                             "know and so cannot honour (it may change the result); use "
                             "attn_implementation='eager'")
    packed = kwargs.get("cu_seq_lens_q")
    if packed is not None and attention_mask is None and packed.numel() > 2:
        raise ValueError(f"selfattn: {layer} passes cu_seq_lens_q= for {packed.numel() - 1} packed sequences but "
                         "no attention_mask to keep them apart (pass position_ids to the model, from which "
                         "transformers builds the packed mask), or use attn_implementation='eager'")


def _layer_scaling(module: torch.nn.Module, head_dim: int) -> float:
    """The softmax scale when the layer passes none: 1/sqrt(D), or what 4.57's GPT-2-style layers
    (gpt2, decision_transformer) apply from their own attributes in their eager function (5.x's
    pass this product as scaling=)."""
    scale = head_dim ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


def _check_layer(module: torch.nn.Module) -> None:
    """Refuses a layer whose eager attention reads a score modification from its own attributes
    rather than from a keyword (4.57's ESM relative position embeddings)."""
    kind = getattr(module, "position_embedding_type", None)
    if kind in ("relative_key", "relative_key_query"):
        raise ValueError(f"selfattn: {type(module).__name__} adds {kind} position embeddings to the scores, which "
                         "the selfattn backend does not implement; use attn_implementation='eager'")


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor] = None, dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      sliding_window: Optional[int] = None, position_bias: Optional[Tensor] = None,
                      output_attentions: bool = False, softcap: Optional[float] = None,
                      s_aux: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, None]:
    """transformers' attention-function signature, with the meaning of its ``sdpa_attention_forward``.

    query (B, Hq, Nq, D); key, value (B, Hkv, Nk, D) with Hkv dividing Hq — never repeated
    (``repeat_kv``): the kernels read kv head h // (Hq // Hkv). Returns ((B, Nq, Hq, D)
    contiguous — the op's own memory layout, so no copy — , None).

    * ``attention_mask``: None, bool (True = take part) or float (added to the scores), 4-D and
      broadcastable to (B, Hq, Nq, Nk); sliced to its first Nk keys as 4.57 does.
    * ``is_causal``: the argument, else ``module.is_causal`` (default True); it applies only when
      Nq > 1 and there is no mask (both versions' rule: with a mask, the mask says it all), and it
      is SDPA's top-left causal — also right for 5.x's empty static cache, whose extra keys lie past
      every query.
    * ``sliding_window=W``: W keys including the query's own, a band (W − 1, 0). transformers builds
      it into the mask whenever it cuts anything, so the band is a way for the kernel to skip
      tiles: it is passed where it is aligned for certain, Nq = Nk (prefill, training), where
      bottom-right and top-left agree. With a KV cache (Nq ≠ Nk) the mask carries the window: a
      static cache's keys are not the last Nk positions, so a bottom-right band would be wrong there.
    * ``dropout``: the models pass 0 outside training (``0.0 if not self.training else p``), as
      to SDPA; it is selfattn's ``dropout_p``.
    * ``scaling``: the softmax scale; None is 1/sqrt(D), or 4.57 GPT-2's scale from its layer's
      ``scale_attn_weights`` / ``scale_attn_by_inverse_layer_idx``.
    * ``position_bias`` (5.x, T5-like models): folded into a float mask, as 5.x's sdpa does.
    * ``softcap`` (Gemma 2's ``attn_logit_softcapping``; also T5Gemma, VaultGemma, 5.x VideoPrism):
      the scaled score s becomes softcap · tanh(s / softcap) before the mask, as their eager
      functions do — selfattn's ``softcap``. None or 0 is off (flash-attn's meaning of 0).
    * ``s_aux`` (GPT-OSS's ``sinks`` parameter; 5.x has more families that pass it): one logit per
      query head, shape (Hq,), added to every row's softmax with no value — selfattn's ``sinks``,
      differentiable. Eager's concatenated column, max subtraction and dropped column compute the
      same softmax; 5.x granite_swa's sigmoid(lse − sink) output scaling is the same quantity too.
    * any other keyword: bookkeeping in HARMLESS_KEYWORDS passes; one in UNSUPPORTED_KEYWORDS
      (head_mask, sparse indices, a paged cache, a sink under another keyword) is refused unless
      None, and so is every keyword in neither list.
    """
    _check_keywords(module, attention_mask, kwargs)
    _check_layer(module)
    if scaling is None:
        scaling = _layer_scaling(module, query.shape[-1])
    if output_attentions:
        warnings.warn("selfattn does not return attention weights (output_attentions=True): "
                      "they are None, as with sdpa", stacklevel=2)
    nq, nk = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, :nk]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # Shape first: under torch.compile with dynamic shapes nq > 1 is a SymBool (as in HF's code).
    causal = nq > 1 and attention_mask is None and bool(is_causal)

    if position_bias is not None:
        attention_mask = _fold_position_bias(position_bias[..., :nk], attention_mask, key.dtype)

    # SDPA broadcasts the batch dim (5.x: learned queries of batch 1); the op wants it equal.
    if query.shape[0] != key.shape[0] and 1 in (query.shape[0], key.shape[0]):
        batch = max(query.shape[0], key.shape[0])
        query = query.expand(batch, -1, -1, -1)
        key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)

    window = None
    if sliding_window is not None and nq == nk:
        window = (int(sliding_window) - 1, 0)

    out = selfattn.attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                             scale=scaling, enable_gqa=query.shape[1] != key.shape[1], causal=causal,
                             window=window, softcap=float(softcap or 0.0), sinks=_sinks(module, s_aux, query))
    # The op lays its output out as (B, Nq, Hq, D): this transpose is already contiguous.
    return out.transpose(1, 2).contiguous(), None


def _sinks(module: torch.nn.Module, s_aux: Optional[Tensor], query: Tensor) -> Optional[Tensor]:
    """The layer's s_aux as selfattn's sinks: (Hq,), float32 or q's dtype (else cast to float32,
    which keeps its gradient); any other shape is refused in a sentence naming the layer."""
    if s_aux is None:
        return None
    if not isinstance(s_aux, Tensor) or s_aux.dim() != 1 or s_aux.shape[0] != query.shape[1]:
        shape = tuple(s_aux.shape) if isinstance(s_aux, Tensor) else type(s_aux).__name__
        raise ValueError(f"selfattn: {type(module).__name__} passes s_aux= of shape {shape}; the selfattn backend "
                         f"takes one sink logit per query head, shape ({query.shape[1]},); use "
                         "attn_implementation='eager'")
    return s_aux if s_aux.dtype in (torch.float32, query.dtype) else s_aux.float()


def _fold_position_bias(position_bias: Tensor, attention_mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """One additive mask from a position bias and the mask, as 5.x's create_position_bias_mask."""
    if position_bias.requires_grad:
        raise NotImplementedError("selfattn: a position_bias that requires grad (a learned relative bias "
                                  "in training) is not supported: the op does not compute a mask's gradient")
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, torch.finfo(dtype).min)
    return position_bias + attention_mask


def register(name: str = "selfattn") -> None:
    """Register selfattn with transformers as the attention implementation ``name``.

    Then ``from_config(config, attn_implementation=name)``, ``from_pretrained(...,
    attn_implementation=name)`` and ``model.set_attn_implementation(name)`` use it.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("selfattn.integrations.transformers.register needs transformers >= 4.57: "
                          "pip install 'selfattn[transformers]'") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
