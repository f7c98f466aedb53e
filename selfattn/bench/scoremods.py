"""``python -m selfattn.bench --sweep scoremods``: issue 27's speed targets for the score
modifications (``softcap``, ``alibi_slopes``, ``sinks``) on the CPU.

One interleaved contest per (shape, dtype, causal, mode), mode fwd (under torch.no_grad) or fwd+bwd
(forward, then autograd.grad of q, k, v and, for the sinks rows, sinks), with a square sgemm probe
in the same rounds (the run's GEMM rate, against which selfattn's FLOPs are counted). Every call
returns its output as (B, N, H, D), the layout a model reads next (a free view for selfattn and
SDPA; Hugging Face's eager functions make it contiguous themselves). The rows and their targets:

* selfattn with each modification against selfattn's own time without it: softcap ≤ 1.3×,
  ALiBi ≤ 1.15×, sinks ≤ 1.05× (t_modified / t_plain per round).
* softcap against Gemma 2's eager attention function and sinks against GPT-OSS's (what users of
  those models run today), ≥ 3× (t_eager / t_selfattn per round). Under causal they get the
  additive float mask (1, 1, N, N) with the dtype's minimum above the diagonal, as transformers'
  mask functions give eager attention; not causal, no mask.
* ALiBi against SDPA given the ALiBi bias as a materialized float mask (1, H, N, N) in q's dtype
  (under causal the upper triangle -inf in the same mask), ≥ 1.5×. The mask is built once per case
  before timing: its construction time is not counted.
* softcap forward against ``torch.compile(flex_attention, dynamic=False)`` with the same
  ``score_mod`` (causal: a ``create_block_mask`` block mask, built before timing and not counted),
  ≥ 1.0×; its compile time (the first call, after ``torch.compiler.reset()``) is reported apart.
  FlexAttention's CPU backward raises, so that row has no fwd+bwd comparison (the fwd+bwd
  contest times selfattn alone). If flex_attention cannot be imported or compiled here, the row
  says so with the reason.
* D = 256 dense (no modification) against SDPA at the same shape, fwd and fwd+bwd, ≥ 1.0×.

A row passes when its median ratio meets the target; the min–max is printed beside it. FLOPs are
the package's count (4·B·H·N²·D forward, halved under causal; backward 2.5× the forward) whatever
the modification: the tanh, the bias and the sink are not credited.

The Hugging Face baselines are copies written for this module, so the sweep runs without
transformers: ``gemma2_eager_attention`` copies ``eager_attention_forward`` of
transformers/models/gemma2/modeling_gemma2.py and ``gpt_oss_eager_attention`` that of
transformers/models/gpt_oss/modeling_gpt_oss.py, both as in transformers 4.57.6 (with
``repeat_kv`` of the same files), line for line up to names; the ``module`` they read is a
stand-in holding what they read from it (head_dim, num_key_value_groups, training, sinks). Gemma 2's
attn_logit_softcapping, 50.0, is the softcap; the scale is 1/sqrt(D) for every call.

    python -m selfattn.bench --sweep scoremods [--shapes 8x8x512x64,2x8x2048x128]
        [--dense-shapes 2x8x1024x256] [--dtypes float32,bfloat16] [--causal both] [--repeats 7]
        [--no-flex]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import selfattn

from .cases import Shape, attention_flops
from .contest import (
    Outcome,
    bf16_arithmetic,
    contest,
    machine,
    markdown,
    no_bf16_note,
    parse_bhnd,
    parser,
    start,
    write_json,
)
from .run import log

SHAPES, QUICK_SHAPES = "8x8x512x64,2x8x2048x128", "1x2x32x16"
DENSE_SHAPES, QUICK_DENSE_SHAPES = "2x8x1024x256", "1x2x32x256"
GEMM_SIZE, QUICK_GEMM_SIZE = 2048, 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping

PLAIN, SOFTCAPPED, ALIBI, SINKS = "selfattn", "selfattn softcap", "selfattn alibi", "selfattn sinks"
GEMMA2, GPT_OSS = "gemma2 eager (softcap)", "gpt-oss eager (sinks)"
SDPA_ALIBI, FLEX, SDPA = "sdpa (alibi mask)", "flex_attention compiled (softcap)", "sdpa"


@dataclass(frozen=True)
class Target:
    """A ratio t_over / t_under per round, and the bound its median must meet: at most (a
    modification's cost) or at least (a speedup)."""

    label: str
    over: str
    under: str
    bound: float
    at_most: bool

    def passes(self, median: float) -> bool:
        return median <= self.bound if self.at_most else median >= self.bound

    def says(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}×"


MOD_TARGETS = (
    Target("softcap cost, t(softcap) / t(plain)", SOFTCAPPED, PLAIN, 1.3, True),
    Target("ALiBi cost, t(alibi) / t(plain)", ALIBI, PLAIN, 1.15, True),
    Target("sinks cost, t(sinks) / t(plain)", SINKS, PLAIN, 1.05, True),
    Target("softcap speedup over Gemma 2 eager", GEMMA2, SOFTCAPPED, 3.0, False),
    Target("sinks speedup over GPT-OSS eager", GPT_OSS, SINKS, 3.0, False),
    Target("ALiBi speedup over SDPA with the bias as a float mask", SDPA_ALIBI, ALIBI, 1.5, False),
)
FLEX_TARGET = Target("softcap speedup over compiled flex_attention", FLEX, SOFTCAPPED, 1.0, False)
DENSE_TARGET = Target("D = 256 speedup over SDPA", SDPA, PLAIN, 1.0, False)


# ---------------------------------------------------------------------------------------------
# Hugging Face's eager attention functions, copied (see the module docstring).


def repeat_kv(hidden_states: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, N, D) -> (B, Hkv * n_rep, N, D), as torch.repeat_interleave(x, n_rep, dim=1)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def gemma2_eager_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                           dropout: float = 0.0, scaling: Optional[float] = None, softcap: Optional[float] = None,
                           **kwargs) -> Tuple[Tensor, Tensor]:
    """transformers 4.57.6, models/gemma2/modeling_gemma2.py, eager_attention_forward."""
    if scaling is None:
        scaling = module.head_dim**-0.5

    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling

    if softcap is not None:
        attn_weights = attn_weights / softcap
        attn_weights = torch.tanh(attn_weights)
        attn_weights = attn_weights * softcap
    if attention_mask is not None:  # no matter the length, it is sliced
        causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal_mask

    # the softmax in float32
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def gpt_oss_eager_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                            scaling: float, dropout: float = 0.0, **kwargs) -> Tuple[Tensor, Tensor]:
    """transformers 4.57.6, models/gpt_oss/modeling_gpt_oss.py, eager_attention_forward."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal_mask

    sinks = module.sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
    combined_logits = torch.cat([attn_weights, sinks], dim=-1)

    # the row maximum taken out first (transformers: it prevents overflow in bf16/fp16)
    combined_logits = combined_logits - combined_logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined_logits, dim=-1, dtype=combined_logits.dtype)
    scores = probs[..., :-1]  # the sink's column dropped
    attn_weights = nn.functional.dropout(scores, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


# ---------------------------------------------------------------------------------------------
# The inputs and calls of a case


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's geometric slopes 2^(-8 (h + 1) / H) (Press et al.), float32."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


def causal_float_mask(n: int, dtype: torch.dtype) -> Tensor:
    """(1, 1, N, N): 0 where query i sees key j <= i, the dtype's minimum elsewhere (what
    transformers gives eager attention)."""
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def alibi_float_mask(slopes: Tensor, n: int, causal: bool, dtype: torch.dtype) -> Tensor:
    """(1, H, N, N): -slope · |i - j|, and -inf above the diagonal under causal, in dtype."""
    pos = torch.arange(n, dtype=torch.float32)
    bias = -slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()
    if causal:
        bias = bias.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return bias.to(dtype)[None]


def softcap_score_mod(softcap: float) -> Callable:
    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)
    return score_mod


def causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_forward(q: Tensor, causal: bool, softcap: float, compiled: bool = True) -> Callable[..., Tensor]:
    """flex_attention with the softcap score_mod (and a causal block mask), compiled or eager;
    (B, N, H, D) out. Raises what the import raises."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    n = q.shape[-2]
    block_mask = create_block_mask(causal_mask_mod, None, None, n, n, device=q.device.type) if causal else None
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    score_mod = softcap_score_mod(softcap)

    def forward(q, k, v):
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask).transpose(1, 2)
    return forward


def _selfattn(q, k, v, sinks=None, *, causal, **mods):
    return selfattn.attention(q, k, v, causal=causal, sinks=sinks, **mods).transpose(1, 2)


def _sdpa(q, k, v, *, causal, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None
                                          ).transpose(1, 2)


def _gemma2(q, k, v, *, mask, softcap):
    module = SimpleNamespace(head_dim=q.shape[-1], num_key_value_groups=1, training=False)
    return gemma2_eager_attention(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, softcap=softcap)[0]


def _gpt_oss(q, k, v, sinks, *, mask):
    module = SimpleNamespace(head_dim=q.shape[-1], num_key_value_groups=1, training=False, sinks=sinks)
    return gpt_oss_eager_attention(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]


def _timed(forward: Callable[..., Tensor], leaves: Sequence[Tensor], grad_out: Tensor, mode: str) -> Callable:
    if mode == "fwd":
        return partial(forward, *leaves)
    return lambda: torch.autograd.grad(forward(*leaves), leaves, grad_out)


def inputs(shape: Tuple[int, int, int, int], dtype: torch.dtype, mode: str):
    """q, k, v, the grad of a (B, N, H, D) output, the ALiBi slopes and the sinks (in q's dtype, as
    GPT-OSS's parameter is), all seeded."""
    torch.manual_seed(0)
    b, h, n, d = shape
    grad = mode != "fwd"
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=grad) for _ in range(3))
    grad_out = torch.randn(b, n, h, d, dtype=dtype)
    sinks = torch.randn(h, dtype=dtype).requires_grad_(grad)
    return q, k, v, grad_out, alibi_slopes(h), sinks


def mod_calls(shape: Tuple[int, int, int, int], dtype: torch.dtype, causal: bool,
              mode: str) -> Dict[str, Callable[[], object]]:
    """The selfattn rows and their baselines (not flex, not the probe); fwd+bwd calls return the
    gradients of q, k, v (and sinks)."""
    q, k, v, grad_out, slopes, sinks = inputs(shape, dtype, mode)
    n = shape[2]
    hf_mask = causal_float_mask(n, dtype) if causal else None
    qkv, with_sinks = (q, k, v), (q, k, v, sinks)
    rows = {
        PLAIN: (partial(_selfattn, causal=causal), qkv),
        SOFTCAPPED: (partial(_selfattn, causal=causal, softcap=SOFTCAP), qkv),
        ALIBI: (partial(_selfattn, causal=causal, alibi_slopes=slopes), qkv),
        SINKS: (partial(_selfattn, causal=causal), with_sinks),
        GEMMA2: (partial(_gemma2, mask=hf_mask, softcap=SOFTCAP), qkv),
        GPT_OSS: (partial(_gpt_oss, mask=hf_mask), with_sinks),
        SDPA_ALIBI: (partial(_sdpa, causal=causal, attn_mask=alibi_float_mask(slopes, n, causal, dtype)), qkv),
    }
    return {name: _timed(fn, leaves, grad_out, mode) for name, (fn, leaves) in rows.items()}


def dense_calls(shape: Tuple[int, int, int, int], dtype: torch.dtype, causal: bool,
                mode: str) -> Dict[str, Callable[[], object]]:
    q, k, v, grad_out, _, _ = inputs(shape, dtype, mode)
    return {PLAIN: _timed(partial(_selfattn, causal=causal), (q, k, v), grad_out, mode),
            SDPA: _timed(partial(_sdpa, causal=causal), (q, k, v), grad_out, mode)}


def flex_call(shape: Tuple[int, int, int, int], dtype: torch.dtype, causal: bool) -> Tuple[Optional[Callable], str]:
    """(the compiled flex forward, its compile time as text) or (None, why it is unavailable).
    The first call compiles (dynamo reset first, so each case compiles its own graph)."""
    q, k, v, _, _, _ = inputs(shape, dtype, "fwd")
    try:
        torch.compiler.reset()
        forward = flex_forward(q, causal, SOFTCAP)
        began = time.perf_counter()
        with torch.no_grad():
            out = forward(q, k, v)
        compile_s = time.perf_counter() - began
        expected = _selfattn(q, k, v, causal=causal, softcap=SOFTCAP)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        if not torch.allclose(out.float(), expected.float(), atol=tol, rtol=tol):
            return None, "unavailable: its output differs from selfattn's softcap output"
    except Exception as e:  # an import, a compile or a kernel that fails: the row says why
        return None, f"unavailable: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
    return partial(forward, q, k, v), f"compile and first call {compile_s:.1f} s"


# ---------------------------------------------------------------------------------------------
# The run


def _case(shape, dtype_name: str, causal: bool, mode: str) -> str:
    return f"{'x'.join(map(str, shape))} {dtype_name} {'causal' if causal else 'not causal'} {mode}"


def _rates(outcome: Outcome, shape, causal: bool, mode: str, probe: str, size: int) -> float:
    """selfattn rows' GFLOP/s and % of the probe into outcome.extra; returns the probe's GFLOP/s."""
    b, h, n, d = shape
    flops = attention_flops(Shape(b, n, h * d, h), causal, mode)
    gemm = 2.0 * size**3 / (outcome.times[probe].median_ms / 1e3) / 1e9
    outcome.extra["sgemm GFLOP/s"] = gemm
    for name in outcome.times:
        if name.startswith("selfattn"):
            rate = flops / (outcome.times[name].median_ms / 1e3) / 1e9
            outcome.extra[f"{name} GFLOP/s"] = rate
            outcome.extra[f"{name} % of sgemm"] = 100 * rate / gemm
    return gemm


def _verdicts(outcome: Outcome, targets: Sequence[Target]) -> List[dict]:
    rows = []
    for t in targets:
        r = outcome.ratios[t.label]
        rows.append({"case": outcome.case, "label": t.label, "median": r.median, "min": r.min, "max": r.max,
                     "target": t.says(), "pass": t.passes(r.median)})
    return rows


def targets_table(verdicts: List[dict]) -> str:
    out = ["| case | target row | median (min–max) | target | |", "|---|---|---|---|---|"]
    for v in verdicts:
        if "median" in v:
            cell, mark = f"{v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})", "pass" if v["pass"] else "FAIL"
        else:
            cell, mark = v["note"], "—"
        out.append(f"| {v['case']} | {v['label']} | {cell} | {v['target']} | {mark} |")
    return "\n".join(out)


def rates_table(outcomes: List[Outcome]) -> str:
    out = ["| case | row | GFLOP/s | % of the sgemm in its rounds |", "|---|---|---|---|"]
    for o in outcomes:
        for name in o.times:
            if f"{name} GFLOP/s" in o.extra:
                out.append(f"| {o.case} | {name} | {o.extra[f'{name} GFLOP/s']:.3g} | "
                           f"{o.extra[f'{name} % of sgemm']:.3g} % |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser("scoremods", __doc__)
    p.add_argument("--shapes", type=parse_bhnd, default=None,
                   help=f"BxHxNxD[,...] of the modification rows (default {SHAPES}; --quick {QUICK_SHAPES})")
    p.add_argument("--dense-shapes", type=parse_bhnd, default=None,
                   help=f"BxHxNxD[,...] of the dense rows (default {DENSE_SHAPES}; --quick {QUICK_DENSE_SHAPES})")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, of float32, bfloat16 "
                   "(default %(default)s)")
    p.add_argument("--gemm-size", type=int, default=None,
                   help=f"the sgemm probe's square size (default {GEMM_SIZE}; --quick {QUICK_GEMM_SIZE})")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--no-flex", action="store_true", help="leave the compiled flex_attention row out (its compile "
                   "takes seconds per case)")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"selfattn.bench --sweep scoremods: unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    dev = start(args)
    size = args.gemm_size or (QUICK_GEMM_SIZE if args.quick else GEMM_SIZE)
    probe = f"sgemm {size}³"
    a, b = torch.randn(size, size), torch.randn(size, size)
    probe_call = partial(torch.mm, a, b)
    shapes = args.shapes or parse_bhnd(QUICK_SHAPES if args.quick else SHAPES)
    dense_shapes = args.dense_shapes or parse_bhnd(QUICK_DENSE_SHAPES if args.quick else DENSE_SHAPES)
    outcomes: List[Outcome] = []
    verdicts: List[dict] = []
    gemm_rates: List[float] = []
    flex: Dict[str, str] = {}
    for group, group_shapes in (("mods", shapes), ("dense", dense_shapes)):
        for shape in group_shapes:
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
                    flex_fn, flex_note = None, "not run: --no-flex"
                    if group == "mods" and not args.no_flex:
                        flex_fn, flex_note = flex_call(shape, dtype, causal)
                        log(f"flex_attention {_case(shape, dtype_name, causal, 'fwd')}: {flex_note}")
                    for mode in MODES:
                        case = _case(shape, dtype_name, causal, mode)
                        if group == "mods":
                            fns, targets = mod_calls(shape, dtype, causal, mode), list(MOD_TARGETS)
                            if mode == "fwd" and flex_fn is not None:
                                fns[FLEX] = flex_fn
                                targets.append(FLEX_TARGET)
                        else:
                            fns, targets = dense_calls(shape, dtype, causal, mode), [DENSE_TARGET]
                        log(f"timing {case}")
                        outcome = contest(dev, {**fns, probe: probe_call}, [(t.label, t.over, t.under) for t in targets],
                                          args.repeats, args.quick, case, grad=mode != "fwd")
                        gemm_rates.append(_rates(outcome, shape, causal, mode, probe, size))
                        verdicts += _verdicts(outcome, targets)
                        if group == "mods":
                            note = flex_note if mode == "fwd" else "FlexAttention's CPU backward raises: selfattn alone"
                            outcome.extra["flex_attention"] = note
                            if mode == "fwd":
                                flex[case] = flex_note
                            if mode != "fwd" or flex_fn is None:
                                verdicts.append({"case": case, "label": FLEX_TARGET.label, "note": note,
                                                 "target": FLEX_TARGET.says()})
                        outcomes.append(outcome)
    header = (f"{machine(dev)}; {probe} in the same rounds: median {statistics.median(gemm_rates):.4g} GFLOP/s "
              f"({min(gemm_rates):.4g}–{max(gemm_rates):.4g} across the contests)")
    passed = sum(v.get("pass", False) for v in verdicts)
    timed = sum("pass" in v for v in verdicts)
    notes = [f"{args.repeats} interleaved rounds per contest; shapes (B, H, N, D); softcap {SOFTCAP}; ALiBi slopes "
             "2^(-8(h+1)/H); sinks in q's dtype; fwd under torch.no_grad(), fwd+bwd: autograd.grad of q, k, v "
             "(and sinks)",
             "ratios t_over / t_under per round, median (min–max); a row passes when its median meets the target",
             "the SDPA ALiBi mask, the eager functions' causal mask and flex_attention's block mask are built before "
             "timing: their construction is not counted",
             f"{passed} of {timed} timed target rows pass"]
    if flex:
        notes.append("compiled flex_attention (not in its timed rows): " +
                     "; ".join(f"{case}: {note}" for case, note in flex.items()))
    if "bfloat16" in dtypes and not bf16_arithmetic():
        notes.append(f"bfloat16 here: {no_bf16_note()}")
    write_json(args, "scoremods", header, outcomes, gemm_size=size, softcap=SOFTCAP, dtypes=dtypes,
               shapes=[list(s) for s in shapes], dense_shapes=[list(s) for s in dense_shapes], flex=flex,
               targets=verdicts)
    print(markdown("Score modifications on the CPU: issue 27's targets", header, outcomes, notes))
    print()
    print("## Targets\n")
    print(targets_table(verdicts))
    print()
    print("## selfattn's FLOP rates (the package's count, the same for every modification)\n")
    print(rates_table(outcomes))
    return 0
