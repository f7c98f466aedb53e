"""``python -m selfattn.bench --sweep transformers``: a Hugging Face Llama with
attn_implementation="selfattn" against the same model under "sdpa" (needs transformers).

A small random-init LlamaModel (no LM head): hidden 512, 8 heads, 2 kv heads, 4 layers,
intermediate 1376, batch 4, sequence 512 (--quick: 2 layers, batch 2, sequence 128) — causal,
once unpadded (transformers then gives no mask: is_causal) and once left-padded (a bool
(B, 1, N, N) mask). Forward (eval, no grad) and forward+backward (train, the sum of the last
hidden state). One call of each model per sample, interleaved. Reported: the median (min–max) ms
per call and selfattn's speedup, t_sdpa / t_selfattn per round (> 1: selfattn faster).

    python -m selfattn.bench --sweep transformers [--dtype float32|bfloat16] [--repeats 7]
"""

from __future__ import annotations

import copy
import importlib
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .contest import Outcome, bf16_arithmetic, contest, machine, markdown, no_bf16_note, parser, start, write_json

FULL = {"batch": 4, "seq": 512, "layers": 4}
QUICK = {"batch": 2, "seq": 128, "layers": 2}


def require_transformers():
    """transformers, imported here only (``import selfattn`` never imports it), or a clear exit."""
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise SystemExit("selfattn.bench --sweep transformers needs Hugging Face transformers, which is not "
                         f"installed here ({exc}); pip install transformers (4.57 or newer), then run it again") from None


def models(size: Dict[str, int], dtype: torch.dtype):
    """(the "sdpa" model, the "selfattn" model): the same random weights."""
    transformers = require_transformers()
    from selfattn.integrations import transformers as selfattn_hf
    selfattn_hf.register()
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                                      num_key_value_heads=2, num_hidden_layers=size["layers"], vocab_size=1000,
                                      max_position_embeddings=size["seq"], attention_dropout=0.0)
    torch.manual_seed(0)
    sdpa = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="sdpa").to(dtype)
    ours = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="selfattn").to(dtype)
    ours.load_state_dict(sdpa.state_dict())
    return sdpa, ours


def inputs(size: Dict[str, int], padded: bool) -> Dict[str, torch.Tensor]:
    batch, seq = size["batch"], size["seq"]
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        for b in range(1, batch):
            mask[b, : seq // 8 * b] = 0  # left padding: seq, 7/8 of it, 6/8, ...
    return {"input_ids": ids, "attention_mask": mask}


def step(model, batch: Dict[str, torch.Tensor], mode: str) -> Callable[[], torch.Tensor]:
    """One call: the last hidden state (forward), or after backward of its sum."""
    def forward():
        return model(**batch).last_hidden_state

    def forward_backward():
        model.zero_grad(set_to_none=True)
        out = forward()
        out.float().sum().backward()
        return out
    return forward if mode == "forward" else forward_backward


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser("transformers", __doc__)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    require_transformers()
    dev = start(args)
    header = machine(dev)
    size = QUICK if args.quick else FULL
    notes = [f"{args.repeats} interleaved rounds, one call per sample; LlamaModel, {size['layers']} layers, "
             f"batch {size['batch']}, sequence {size['seq']}, {args.dtype}; transformers "
             f"{require_transformers().__version__}"]
    if args.dtype == "bfloat16" and not bf16_arithmetic():
        notes.append(f"note: {no_bf16_note()}: both models' projections and MLPs are bf16 GEMMs")
    sdpa, ours = models(size, getattr(torch, args.dtype))
    outcomes: List[Outcome] = []
    for padded in (False, True):
        batch = inputs(size, padded)
        for mode in ("forward", "forward+backward"):
            for model in (sdpa, ours):
                model.train(mode != "forward")
            calls = {"sdpa": step(sdpa, batch, mode), "selfattn": step(ours, batch, mode)}
            case = f"{'left-padded (mask)' if padded else 'unpadded (is_causal)'} {mode}"
            outcomes.append(contest(dev, calls, [("selfattn speedup over sdpa", "sdpa", "selfattn")], args.repeats,
                                    args.quick, case, grad=mode != "forward", one_call=True))
    write_json(args, "transformers", header, outcomes, dtype=args.dtype, size=size)
    print(markdown('Hugging Face Llama: attn_implementation "selfattn" vs "sdpa"', header, outcomes, notes))
    return 0
