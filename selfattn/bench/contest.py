"""What the small sweeps share (overhead, dropout, jvp, bf16, transformers): their common options,
a *contest* — named calls warmed up and timed in interleaved rounds by measure.py — its per-round
ratios, the machine line, a markdown table and the JSON file. Each sweep builds its calls and
says which ratios it reports; the conventions are the package docstring's (median of ≥ 7
interleaved rounds with min–max, ratios per round against the strongest fair baseline)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import selfattn
from selfattn import _system

from .blocking import parse_shape
from .isa import cpu_flags
from .measure import MIN_PAIRS, Contestant, CpuDevice, pair_ratios, summarize, time_interleaved, warm_up
from .records import Speedup, Summary
from .report import fmt_ms, fmt_ratio

# The CPU flags a reader of a table needs: the vector width and whether bf16 has arithmetic.
NOTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
BF16_ARITHMETIC_FLAGS = ("avx512_bf16", "amx_bf16")

# (label, over, under): the median (min–max) of the per-round ratios t_over / t_under. With a
# baseline as `over` and selfattn as `under` it is selfattn's speedup (> 1: selfattn faster).
Comparison = Tuple[str, str, str]


def bf16_arithmetic(flags: Optional[set] = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), as tests/test_bf16.py
    decides; without it ATen's bf16 GEMMs convert and run ~30x slower than float32."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_ARITHMETIC_FLAGS)


def no_bf16_note() -> str:
    return (f"this CPU ({_system.cpu_model()}) has no bf16 arithmetic (no {' or '.join(BF16_ARITHMETIC_FLAGS)} in "
            "/proc/cpuinfo): ATen's bf16 GEMMs run ~30x slower than float32 there")


@dataclass
class Outcome:
    """One case of a sweep: each call's time per call, the ratios, and what else the sweep checks."""

    case: str
    times: Dict[str, Summary] = field(default_factory=dict)
    calls_per_sample: Dict[str, int] = field(default_factory=dict)
    ratios: Dict[str, Speedup] = field(default_factory=dict)
    extra: Dict[str, object] = field(default_factory=dict)
    skipped: str = ""  # why the case was not timed


def parser(sweep: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m selfattn.bench --sweep {sweep}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=MIN_PAIRS, help="interleaved rounds (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="short samples and small problems (tests, a first look)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help=f"results file (default: bench_results/{sweep}-<time>.json)")
    return p


def start(args: argparse.Namespace) -> CpuDevice:
    from .run import log
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < MIN_PAIRS:
        log(f"warning: {args.repeats} rounds < {MIN_PAIRS}: the ratios are indicative only")
    return CpuDevice(torch.get_num_threads())


def machine(dev: CpuDevice) -> str:
    flags = cpu_flags()
    noted = " ".join(f for f in NOTED_FLAGS if f in flags) or "none of " + " ".join(NOTED_FLAGS)
    return f"{dev.describe()}; CPU flags: {noted}; torch {torch.__version__}; {selfattn.build_info()}"


def contest(dev: CpuDevice, calls: Dict[str, Callable[[], object]], comparisons: Sequence[Comparison],
            repeats: int, quick: bool, case: str, grad: bool = True,
            one_call: bool = False) -> Outcome:
    """Times the calls against each other (warm-up, then interleaved rounds; under torch.no_grad
    unless grad) and returns their summaries and ratios. one_call: one call per sample (calls that
    last long enough alone), else as many as fill the device's sample time (a fifth with quick)."""
    scale = 5 if quick else 1
    contestants = [Contestant(name, fn) for name, fn in calls.items()]
    with contextlib.nullcontext() if grad else torch.no_grad():
        for c in contestants:
            warm_up(c, dev, 0.0 if one_call else dev.target_s / scale, dev.warmup_s / scale)
        times = time_interleaved(contestants, dev, repeats)
    return Outcome(case, {name: summarize(t) for name, t in times.items()}, {c.name: c.number for c in contestants},
                   {label: pair_ratios(times[over], times[under]) for label, over, under in comparisons})


def markdown(title: str, header: str, outcomes: List[Outcome], notes: Sequence[str] = ()) -> str:
    """A table of times per (case, call) and one of the ratios; µs when every median is under 1 ms."""
    timed = [o for o in outcomes if not o.skipped]
    micro = all(s.median_ms < 1 for o in timed for s in o.times.values())
    unit, scale = ("µs", 1e3) if micro else ("ms", 1.0)
    out = [f"# {title}", "", header, ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    out += [f"| case | call | {unit} per call, median (min–max) | calls per sample |", "|---|---|---|---|"]
    for o in outcomes:
        if o.skipped:
            out.append(f"| {o.case} | — | skipped: {o.skipped} | |")
        for name, s in o.times.items():
            scaled = Summary(s.median_ms * scale, s.min_ms * scale, s.max_ms * scale, [])
            out.append(f"| {o.case} | {name} | {fmt_ms(scaled)} | {o.calls_per_sample.get(name, '')} |")
    out += ["", "| case | ratio | median (min–max) of the per-round ratios |", "|---|---|---|"]
    out += [f"| {o.case} | {label} | {fmt_ratio(r)} |" for o in timed for label, r in o.ratios.items()]
    return "\n".join(out)


def write_json(args: argparse.Namespace, sweep: str, header: str, outcomes: List[Outcome], **meta) -> Path:
    from .run import log
    path = args.json or Path("bench_results") / f"{sweep}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sweep": sweep, "machine": header, "cpu": _system.cpu_model(),
                                "flags": sorted(cpu_flags() & set(NOTED_FLAGS)), "repeats": args.repeats,
                                "quick": args.quick, **meta, "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    log(f"wrote {path}")
    return path


def parse_bhnd(text: str) -> List[Tuple[int, int, int, int]]:
    """'BxHxNxD[,...]' -> shapes of q, k and v (B, H, N, D)."""
    return [parse_shape(part.strip()) for part in text.split(",")]


def with_backward(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                  grad_out: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, ...]]:
    """forward(*inputs), then the gradients of the inputs (autograd.grad: nothing accumulates)."""
    return lambda: torch.autograd.grad(forward(*inputs), inputs, grad_out)


def with_settings(fn: Callable[[], object], **settings: str) -> Callable[[], object]:
    """fn run with these environment settings (read per call by the kernels), restored after."""
    def run():
        before = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            return fn()
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return run
