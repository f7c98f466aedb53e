"""A Hugging Face Llama with attn_implementation="selfattn" against the same model under "sdpa":

    python scripts/bench_transformers.py                      # float32, 7 rounds
    python scripts/bench_transformers.py --rounds 9 --dtype bfloat16

A small random-init LlamaModel (no LM head): hidden 512, 8 heads, 2 kv heads, 4 layers,
intermediate 1376, batch 4, sequence 512 — causal, once unpadded (transformers then gives no mask:
is_causal) and once left-padded (a bool (B, 1, N, N) mask). Forward (eval, no grad) and
forward+backward (train, the sum of the last hidden state). Each round times one call of each
model, back to back in alternating order (selfattn/bench/measure.py's interleaving); prints a
markdown table of the median ms (min–max) and the median (min–max) of the per-round ratios
t_sdpa / t_selfattn. Needs transformers.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from selfattn._system import cpu_model  # noqa: E402
from selfattn.bench.measure import (Contestant, CpuDevice, pair_ratios, summarize,  # noqa: E402
                                    time_interleaved, warm_up)
from selfattn.integrations import transformers as selfattn_hf  # noqa: E402

BATCH, SEQ = 4, 512


def config():
    return transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                                    num_key_value_heads=2, num_hidden_layers=4, vocab_size=1000,
                                    max_position_embeddings=SEQ, attention_dropout=0.0)


def inputs(padded: bool):
    ids = torch.randint(0, 1000, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        for b in range(1, BATCH):
            mask[b, : 64 * b] = 0  # left padding: 512, 448, 384, 320 real tokens
    return {"input_ids": ids, "attention_mask": mask}


def steps(model, batch, mode):
    if mode == "forward":
        def forward():
            with torch.no_grad():
                model(**batch)
        return forward

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(**batch).last_hidden_state.float().sum().backward()
    return forward_backward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    selfattn_hf.register()
    torch.manual_seed(0)
    sdpa = transformers.AutoModel.from_config(copy.deepcopy(config()), attn_implementation="sdpa").to(dtype)
    ours = transformers.AutoModel.from_config(copy.deepcopy(config()), attn_implementation="selfattn").to(dtype)
    ours.load_state_dict(sdpa.state_dict())
    dev = CpuDevice(torch.get_num_threads())
    print(f"{dev.describe()} ({cpu_model()}); torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.dtype}, {args.rounds} interleaved rounds\n")
    print("| batch | mode | selfattn ms | sdpa ms | t_sdpa / t_selfattn |")
    print("|---|---|---:|---:|---|")
    for padded in (False, True):
        batch = inputs(padded)
        for mode in ("forward", "forward+backward"):
            for model in (sdpa, ours):
                model.train(mode != "forward")
            contestants = [Contestant("sdpa", steps(sdpa, batch, mode)),
                           Contestant("selfattn", steps(ours, batch, mode))]
            for c in contestants:
                warm_up(c, dev, target_s=0.0, warmup_s=1.0)  # one call per sample: each is ≥ 0.1 s
            times = time_interleaved(contestants, dev, args.rounds)
            s, b = summarize(times["selfattn"]), summarize(times["sdpa"])
            r = pair_ratios(times["sdpa"], times["selfattn"])
            name = "left-padded (mask)" if padded else "unpadded (is_causal)"
            print(f"| {name} | {mode} | {s.median_ms:.0f} ({s.min_ms:.0f}–{s.max_ms:.0f}) | "
                  f"{b.median_ms:.0f} ({b.min_ms:.0f}–{b.max_ms:.0f}) | "
                  f"{r.median:.2f}× ({r.min:.2f}–{r.max:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
