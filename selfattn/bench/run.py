"""The run: for each case and level, skips planned from the memory estimates, each mode's timing
group, then the case's memory measurements; a Record per (case, level, implementation)."""

from __future__ import annotations

import datetime
import gc
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import selfattn

from .cases import GIB, MEMORY_MODES, MIB, Case, case_flops, output_shape, set_bytes
from .impls import Impl, implementations, make_inputs, make_step
from .measure import (
    Contestant,
    MemoryItem,
    MemoryReading,
    first_line,
    pair_ratios,
    summarize,
    time_interleaved,
    warm_up,
)
from .records import Failed, Group, Measured, MemoryOutcome, Meta, Record, Result, Skipped, Timed, Unavailable
from .report import fmt_memory, num


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    cases: List[Case]
    levels: Tuple[str, ...]
    modes: Tuple[str, ...]
    repeats: int
    memory: bool
    budget: float
    n_sets_max: int = 8
    impl_names: Optional[Tuple[str, ...]] = None
    target_s: Optional[float] = None
    warmup_s: Optional[float] = None
    reference_max_seq: Optional[int] = None  # --quick: the tutorial's module (seconds a call) only up to this N


ROTATE_BYTES = 256 * MIB  # input sets cycled per contestant: enough to spill the caches, at most 8


def n_input_sets(case: Case, level: str, n_max: int) -> int:
    return max(2, min(n_max, math.ceil(ROTATE_BYTES / set_bytes(case, level))))


def plan_skips(impls: List[Impl], case: Case, level: str, modes: Sequence[str], n_sets: int,
               budget: float, reference_max_seq: Optional[int] = None) -> Dict[Tuple[str, str], Skipped]:
    """(impl, mode) -> the skip verdict for those whose estimated peak would not fit the budget, and
    for the tutorial's module past reference_max_seq."""
    inputs = n_sets * set_bytes(case, level)
    skips = {}
    for impl in impls:
        for mode in modes:
            estimate = impl.estimate(case, mode) * (n_sets if mode == "bwd" else 1) + inputs
            if impl.name == "reference" and reference_max_seq is not None and case.shape.seq > reference_max_seq:
                skips[(impl.name, mode)] = Skipped(
                    estimate, f"--quick times the tutorial's module only at N <= {reference_max_seq}")
            elif estimate > budget:
                skips[(impl.name, mode)] = Skipped(
                    estimate, f"est. {estimate / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB")
    return skips


def _warnings_text(caught: List[warnings.WarningMessage]) -> str:
    """The first lines of the distinct warnings (SDPA says there why a backend refused)."""
    lines = dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip())
    return "; ".join(list(lines)[:2])


def ready_contestant(impl: Impl, case: Case, level: str, mode: str, dev, inputs: tuple, timing: Tuple[float, float]):
    """(the implementation built, warmed up and calibrated, its backend) — or raises with the reason
    it cannot run, SDPA's warnings included."""
    input_sets, grad_outs = inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            built = impl.build(case, dev.device, input_sets[0])
            contestant = Contestant(impl.name, make_step(built, input_sets, grad_outs, mode))
            warm_up(contestant, dev, *timing)
        except Exception as exc:
            why = _warnings_text(caught)
            raise RuntimeError(f"{why} ({first_line(exc)})" if why else first_line(exc)) from exc
    return contestant, built.backend


def _timed(case: Case, level: str, mode: str, impl: Impl, contestant: Contestant, backend: str,
           samples: Dict[str, List[float]], gemm_rate: float) -> Timed:
    problem = impl.flops(case, mode) if impl.flops else case_flops(case, level, mode)  # its own, or the level's
    flops = problem + impl.extra_flops(case.shape, mode)
    summary = summarize(samples[impl.name])
    rate = flops / (summary.median_ms / 1e3)
    theirs = impl.name != "selfattn" and "selfattn" in samples
    return Timed(**vars(summary), calls_per_sample=contestant.number, flops=flops, flop_rate=rate,
                 pct_gemm=100.0 * rate / gemm_rate, backend=backend,
                 speedup=pair_ratios(samples[impl.name], samples["selfattn"]) if theirs else None)


def run_timing_group(dev, case: Case, level: str, mode: str, impls: List[Impl], records: Dict[str, Record],
                     skips: Dict[Tuple[str, str], Skipped], opts: Options) -> Group:
    """Times every implementation of a (case, level, mode) and the GEMM, interleaved; fills records."""
    n_sets = n_input_sets(case, level, opts.n_sets_max)
    inputs = ([make_inputs(case, level, dev.device, mode != "fwd") for _ in range(n_sets)],
              [torch.randn(output_shape(case, level), device=dev.device, dtype=case.torch_dtype)
               for _ in range(n_sets)])
    timing = (opts.target_s or dev.target_s, opts.warmup_s or dev.warmup_s)
    gemm_name, gemm_flops, gemm_fn = dev.gemm(case.dtype)
    gemm = Contestant(gemm_name, gemm_fn)
    warm_up(gemm, dev, *timing)
    ready: Dict[str, Tuple[Impl, Contestant, str]] = {}
    for impl in impls:
        if (impl.name, mode) in skips:
            records[impl.name].modes[mode] = skips[(impl.name, mode)]
            continue
        try:
            contestant, backend = ready_contestant(impl, case, level, mode, dev, inputs, timing)
        except Exception as exc:  # noqa: BLE001 - e.g. a forced SDPA backend that refuses the inputs
            records[impl.name].modes[mode] = Unavailable(str(exc))
            continue
        ready[impl.name] = (impl, contestant, backend)
    samples = time_interleaved([gemm] + [c for _, c, _ in ready.values()], dev, opts.repeats)
    gemm_rate = gemm_flops / statistics.median(samples[gemm_name])
    for name, (impl, contestant, backend) in ready.items():
        records[name].modes[mode] = _timed(case, level, mode, impl, contestant, backend, samples, gemm_rate)
    return Group(case, level, mode, gemm_name, gemm_rate, opts.repeats, n_sets)


def plan_memory(level: str, impls: List[Impl], records: Dict[str, Record],
                skips: Dict[Tuple[str, str], Skipped]) -> List[MemoryItem]:
    """Fills the memory entries that will not be measured (skipped, or the implementation refused
    to run when timed: no use trying again); returns those to measure."""
    todo = []
    for impl in impls:
        record = records[impl.name]
        refused = next((e for e in record.modes.values() if isinstance(e, Unavailable)), None)
        for mode in MEMORY_MODES:
            if (impl.name, mode) in skips:
                record.memory[mode] = skips[(impl.name, mode)]
            elif refused:
                record.memory[mode] = refused
            else:
                todo.append((level, impl.name, mode))
    return todo


def _memory_outcome(estimate: float, reading: MemoryReading) -> MemoryOutcome:
    if reading.error or reading.peak_bytes is None:
        return Failed(estimate, reading.error or "no peak reported")
    return Measured(estimate, reading.peak_bytes, reading.method)


def _level_impls(dev, case: Case, level: str, opts: Options) -> List[Impl]:
    return [impl for impl in implementations(dev.type) if impl.level == level and impl.applies(case)
            and (opts.impl_names is None or impl.name in opts.impl_names or impl.name == "selfattn")]


def _unavailable_case(case: Case, level: str, impls: List[Impl], modes: Sequence[str], reason: str,
                      progress: str) -> List[Record]:
    """A case this build cannot run (a variant's function missing): every row says why, nothing runs."""
    log(f"{progress} {level} {case.label()}: {reason}")
    records = [Record(case, level, impl.name, impl.note) for impl in impls]
    for record in records:
        record.modes = {mode: Unavailable(reason) for mode in modes}
    return records


def run_case(dev, case: Case, opts: Options, progress: str) -> Tuple[List[Record], List[Group]]:
    """Times every level and mode of a case, then measures its memory (one child process on CPU)."""
    records: Dict[str, Dict[str, Record]] = {}
    impls_by_key: Dict[Tuple[str, str], Impl] = {}
    groups, memory_todo = [], []
    reason = case.variant_spec.unavailable() if case.variant else ""
    if reason:
        return [r for level in opts.levels for r in _unavailable_case(
            case, level, _level_impls(dev, case, level, opts), opts.modes, reason, progress)], []
    for level in opts.levels:
        impls = _level_impls(dev, case, level, opts)
        impls_by_key.update({(level, impl.name): impl for impl in impls})
        n_sets = n_input_sets(case, level, opts.n_sets_max)
        modes = opts.modes if case.shape.timed else ()
        skips = plan_skips(impls, case, level, tuple(modes) + MEMORY_MODES, n_sets, opts.budget,
                           opts.reference_max_seq)
        records[level] = {impl.name: Record(case, level, impl.name, impl.note) for impl in impls}
        for mode in modes:
            started = time.perf_counter()
            groups.append(run_timing_group(dev, case, level, mode, impls, records[level], skips, opts))
            log(f"{progress} {level} {mode} {case.label()}: {_progress_line(records[level], mode)} "
                f"[{time.perf_counter() - started:.0f} s]")
            gc.collect()
        if opts.memory:
            memory_todo += plan_memory(level, impls, records[level], skips)
    if memory_todo:
        started = time.perf_counter()
        for (level, name, mode), reading in dev.measure_memory(case, memory_todo).items():
            estimate = impls_by_key[(level, name)].estimate(case, mode)
            records[level][name].memory[mode] = _memory_outcome(estimate, reading)
        for level in opts.levels:
            log(f"{progress} {level} memory {case.label()}: {_memory_line(records[level])}")
        log(f"{progress} memory measured in {time.perf_counter() - started:.0f} s")
    return [r for level in opts.levels for r in records[level].values()], groups


def _progress_line(records: Dict[str, Record], mode: str) -> str:
    parts = []
    for name, record in records.items():
        entry = record.modes.get(mode)
        if isinstance(entry, Timed):
            ratio = f" (selfattn {entry.speedup.median:.2f}×)" if entry.speedup else ""
            parts.append(f"{name} {num(entry.median_ms)} ms{ratio}")
        else:
            parts.append(f"{name} {entry.status if entry else '?'}")
    return ", ".join(parts)


def _memory_line(records: Dict[str, Record]) -> str:
    return ", ".join(f"{name} " + "/".join(fmt_memory(record.memory.get(m)) for m in MEMORY_MODES)
                     for name, record in records.items())


def run_benchmark(opts: Options, dev, sweep_note: str = "") -> Result:
    started = time.perf_counter()
    records, groups = [], []
    for i, case in enumerate(opts.cases):
        more_records, more_groups = run_case(dev, case, opts, f"[{i + 1}/{len(opts.cases)}]")
        records += more_records
        groups += more_groups
    meta = Meta(
        device=dev.describe(), device_type=dev.type, torch=torch.__version__,
        selfattn_build=str(selfattn.build_info()), python=platform.python_version(),
        date=datetime.datetime.now().isoformat(timespec="seconds"), argv=sys.argv[1:],
        levels=list(opts.levels), modes=list(opts.modes), repeats=opts.repeats,
        memory_budget_bytes=opts.budget, flop_unit=dev.flop_unit, flop_scale=dev.flop_scale,
        memory_method=dev.memory_method, gemm_note=dev.gemm_note,
        threads=getattr(dev, "threads", None), note=sweep_note,
        wall_s=time.perf_counter() - started)
    return Result(meta, records, groups)
