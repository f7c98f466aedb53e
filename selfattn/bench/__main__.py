"""``python -m selfattn.bench``: the command line (``--help``), the run, and its JSON, plot and
markdown report."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

import selfattn

from .cases import DTYPE_ALIASES, DTYPES, GIB, LEVELS, MASKS_LEVEL, MODES, SWEEPS, Case, Sweep, parse_shapes
from .contest import bf16_arithmetic, no_bf16_note
from .impls import IMPLEMENTATIONS
from .measure import MIN_PAIRS, CpuDevice, CudaDevice
from .report import fmt_bytes, markdown_report, write_plot
from .run import Options, log, run_benchmark

# The sweeps with a runner of their own: --sweep NAME runs selfattn/bench/NAME.py's main with the
# other arguments (its own options: python -m selfattn.bench --sweep NAME --help).
RUNNERS = ("decode", "blocking", "isa", "overhead", "dropout", "jvp", "bf16", "transformers", "ring", "scoremods")

DESCRIPTION = """\
Times selfattn against PyTorch's attention: the attention core (selfattn.attention vs SDPA) and the
whole layer (the tutorial's module, eager, F.linear + SDPA, nn.MultiheadAttention, selfattn's
SelfAttention), forward and forward+backward, interleaved in rounds with a large GEMM. Reports
median (min-max) times, FLOP rates, % of the GEMM rate, selfattn's speedup over each (median of
per-round ratios) and peak memory; prints markdown tables, writes JSON and a PNG plot. --sweep decode
runs the KV-cache decoding benchmark (selfattn/bench/decode.py, its own options). --sweep isa runs
the targets sweep once per instruction-set cap this CPU can run, both sides capped alike
(selfattn/bench/isa.py: --caps, and the options below). --sweep blocking times the CPU forward at
each query block the cache model could choose (selfattn/bench/blocking.py). --sweep masks
times the masked variants (padding, varlen, GQA, sliding window, random mask), each against selfattn
without the variant and SDPA given the same inputs. Sweeps with options of their own (--sweep NAME
--help): --sweep overhead times the per-call cost on tiny inputs against SDPA; --sweep dropout
what dropout costs selfattn and SDPA; --sweep jvp forward mode (torch.func.jvp) against SDPA's
math backend; --sweep bf16 selfattn's bf16 kernels against SDPA-bf16 and its own other paths
(without bf16 arithmetic on the CPU: fewer rows, said in the output); --sweep transformers a Hugging
Face Llama under attn_implementation "selfattn" against "sdpa" (needs transformers); --sweep ring
the per-rank peak memory and time of ring attention at world sizes 1, 2, 4 (it starts the ranks);
--sweep scoremods the score modifications (softcap, ALiBi, sinks) against selfattn without them,
Hugging Face's eager Gemma 2 / GPT-OSS attention, SDPA with an ALiBi mask and compiled flex_attention,
and D = 256 against SDPA (issue 27's targets)."""


def _sweeps_help() -> str:
    lines = ["sweeps (shapes as B x N x E x H, M = E; each causal and not):"]
    for name, sweep in SWEEPS.items():
        shapes = ", ".join(f"{s.batch}x{s.seq}x{s.embed}x{s.heads}" + ("" if s.timed else " (memory only)")
                           for s in sweep.shapes)
        if sweep.cases:
            shapes = ", ".join(f"{c.variant} {c.shape.batch}x{c.shape.seq}x{c.shape.embed}x{c.shape.heads}"
                               + (" causal" if c.causal else "") for c in sweep.cases)
        lines.append(f"  {name}: {shapes}; {', '.join(sweep.dtypes)}; {', '.join(sweep.levels)}; {', '.join(sweep.modes)}")
    names = dict.fromkeys(f"{i.level}: {i.name}" for i in IMPLEMENTATIONS)
    cuda_only = [i.name for i in IMPLEMENTATIONS if "cpu" not in i.devices]
    lines.append("implementations (--impls): " + ", ".join(names) +
                 (f" (CUDA only: {', '.join(cuda_only)})" if cuda_only else ""))
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selfattn.bench", description=DESCRIPTION, epilog=_sweeps_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sweep", choices=sorted(SWEEPS) + sorted(RUNNERS), default=None, help="shape sweep (default: 'default'; "
                   "'quick' with --quick; 'fa': FlashAttention's shapes, bf16, core, fwd and bwd; 'masks': "
                   "the masked variants, each against selfattn without it and SDPA with it)")
    p.add_argument("--quick", action="store_true", help="small sweep, short samples (tests, GPU checks); the tutorial's "
                   "module at N <= 256 only; on a CPU without bf16 arithmetic, float32 only unless --dtype says otherwise")
    p.add_argument("--shapes", type=parse_shapes, default=None, help="BxNxExH[,...], e.g. 8x512x512x8 (overrides the sweep)")
    p.add_argument("--dtype", default=None, help="comma-separated: float32,bfloat16,float16 (default: the sweep's)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--level", choices=("both",) + tuple(LEVELS), default=None,
                   help="attention core, whole layer, or both (masks: the masks sweep's level)")
    p.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default: the sweep's)")
    p.add_argument("--impls", default=None, help="comma-separated implementation names to run (selfattn always runs)")
    p.add_argument("--repeats", type=int, default=None, help=f"interleaved rounds (default {MIN_PAIRS})")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--memory", action="store_true", help="measure memory where the sweep does not by default (masks)")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="skip implementations estimated above this (default: 60%% of available RAM; CUDA: 80%% of free)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="results file (default: bench_results/bench-<device>-<time>.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (default: next to the JSON)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _dtype_names(text: str) -> Tuple[str, ...]:
    names = tuple(DTYPE_ALIASES.get(d.strip(), d.strip()) for d in text.split(","))
    for name in names:
        if name not in DTYPES:
            raise SystemExit(f"selfattn.bench: unknown dtype {name!r} ({', '.join(DTYPES)})")
    return names


QUICK_REFERENCE_MAX_SEQ = 256


def quick_skips_bf16(sweep: Sweep, args: argparse.Namespace) -> bool:
    """--quick without --dtype leaves bfloat16 out where the CPU has no bf16 arithmetic (a bf16 layer
    cell there takes minutes in ATen's GEMMs), unless bfloat16 is all the sweep runs."""
    return (args.quick and not args.dtype and "bfloat16" in sweep.dtypes and len(sweep.dtypes) > 1
            and args.device == "cpu" and not bf16_arithmetic())


def _cases(sweep: Sweep, args: argparse.Namespace) -> List[Case]:
    shapes = args.shapes or sweep.shapes
    dtypes = _dtype_names(args.dtype) if args.dtype else sweep.dtypes
    if quick_skips_bf16(sweep, args):
        dtypes = tuple(d for d in dtypes if d != "bfloat16")
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    if sweep.cases:  # its own cases: --shapes and --dtype replace theirs, --causal picks among them
        return [replace(case, shape=shape, dtype=dtype) for case in sweep.cases if case.causal in causals
                for shape in (args.shapes or (case.shape,)) for dtype in dtypes]
    return [Case(shape, causal, dtype) for shape in shapes for dtype in dtypes for causal in causals]


def _levels(sweep: Sweep, args: argparse.Namespace) -> Tuple[str, ...]:
    """The sweep's levels, or --level's; the masks level runs the cases with a variant, and only those."""
    if args.level is None:
        return sweep.levels
    levels = tuple(name for name in LEVELS if name != MASKS_LEVEL) if args.level == "both" else (args.level,)
    if (MASKS_LEVEL in levels) != bool(sweep.cases):
        raise SystemExit(f"selfattn.bench: --level {MASKS_LEVEL} goes with --sweep masks, and only it")
    return levels


def make_options(args: argparse.Namespace, dev) -> Tuple[Options, Sweep]:
    sweep = SWEEPS[args.sweep or ("quick" if args.quick else "default")]
    levels = _levels(sweep, args)
    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else sweep.modes
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"selfattn.bench: unknown mode(s) {bad}; choose from {MODES}")
    repeats = args.repeats or MIN_PAIRS
    if repeats < MIN_PAIRS:
        log(f"warning: {repeats} rounds < {MIN_PAIRS}: the ratios are indicative only")
    budget = args.memory_budget_gb * GIB if args.memory_budget_gb is not None else dev.memory_budget()
    # --quick: short samples, and the tutorial's module (seconds a call at N = 1024) on the small shape only.
    quick = {"target_s": dev.target_s / 5, "warmup_s": dev.warmup_s / 5, "reference_max_seq": QUICK_REFERENCE_MAX_SEQ} \
        if args.quick else {}
    impl_names = tuple(n.strip() for n in args.impls.split(",")) if args.impls else None
    memory = not args.no_memory and (sweep.memory or args.memory)
    return Options(_cases(sweep, args), levels, modes, repeats, memory, budget,
                   n_sets_max=2 if args.quick else 8, impl_names=impl_names, **quick), sweep


def _make_device(args: argparse.Namespace):
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("selfattn.bench: --device cuda, but torch.cuda.is_available() is False "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing was run")
        return CudaDevice()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return CpuDevice(threads)


def _runner_argv(argv: List[str], sweep: str) -> Optional[List[str]]:
    """The remaining arguments when the sweep is `sweep`, else None."""
    for i, arg in enumerate(argv):
        if arg == f"--sweep={sweep}" or (arg == "--sweep" and argv[i + 1:i + 2] == [sweep]):
            return argv[:i] + argv[i + (1 if "=" in arg else 2):]
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for sweep in RUNNERS:
        rest = _runner_argv(argv, sweep)
        if rest is not None:
            return importlib.import_module(f"selfattn.bench.{sweep}").main(rest)
    args = parse_args(argv)
    dev = _make_device(args)
    opts, sweep = make_options(args, dev)
    log(f"{dev.describe()}; torch {torch.__version__}; {selfattn.build_info()}; "
        f"{len(opts.cases)} cases × {len(opts.levels)} levels, modes {', '.join(opts.modes)}, "
        f"memory budget {fmt_bytes(opts.budget)}")
    note = sweep.note if not args.shapes else ""
    if quick_skips_bf16(sweep, args):
        skipped = f"--quick skips bfloat16: {no_bf16_note()} (--dtype bfloat16 runs it anyway)"
        log(skipped)
        note = f"{note}; {skipped}" if note else skipped
    result = run_benchmark(opts, dev, note)
    json_path = args.json or Path("bench_results") / f"bench-{dev.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result.to_json(), indent=1))
    log(f"wrote {json_path}")
    if not args.no_plot:
        plot_path = args.plot or json_path.with_suffix(".png")
        problem = write_plot(result, plot_path, opts.modes)
        log(problem or f"wrote {plot_path}")
    print(markdown_report(result, opts.modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
