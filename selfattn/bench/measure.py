"""How things are measured: the devices (clock, GEMM rate, memory budget, peak memory), the
interleaved timing with its summaries and ratios, and the CPU's memory child process."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

import selfattn
from selfattn import _system

from .cases import GIB, Case, Shape
from .impls import Impl, implementations_by_key, make_step, prepare
from .records import Speedup, Summary

MIN_PAIRS = 7  # the package docstring's rule: a ratio is the median of at least 7 interleaved pairs
CPU_GEMM_SIZE = 2048  # the GEMM rate: a square sgemm of this size (CPU), of the case's dtype (CUDA)
CUDA_GEMM_SIZE = 8192

MemoryItem = Tuple[str, str, str]  # (level, impl name, mode)


@dataclass
class MemoryReading:
    """One peak memory measurement, or the error that stopped it; the child's reply, as JSON."""

    peak_bytes: Optional[float] = None
    method: str = ""
    error: str = ""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------
# Devices: timing, the GEMM rate, the memory budget and memory measurements


class CpuDevice:
    type = "cpu"
    flop_unit, flop_scale = "GFLOP/s", 1e9
    target_s, warmup_s = 0.03, 0.3
    memory_method = "peak RSS growth in a child process per case: VmHWM − VmRSS after malloc_trim and clear_refs"
    gemm_note = "GEMM rate timed in the same rounds: a float32 sgemm for every dtype, so bfloat16 can pass 100 %"

    def __init__(self, threads: int):
        self.device = torch.device("cpu")
        self.threads = threads

    def describe(self) -> str:
        return f"CPU {_system.cpu_model()}, {self.threads} threads (of {os.cpu_count()} CPUs)"

    def measure(self, fn: Callable[[], object], number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number

    def gemm(self, dtype: str) -> Tuple[str, float, Callable[[], object]]:
        """A large square sgemm: the rate the kernels are compared with (float32 whatever the case)."""
        return _square_gemm(self.device, CPU_GEMM_SIZE, torch.float32)

    def memory_budget(self) -> float:
        available = _system.mem_available_bytes()
        return 0.6 * available if available else 8 * GIB

    def measure_memory(self, case: Case, todo: List[MemoryItem]) -> Dict[MemoryItem, MemoryReading]:
        return measure_memory_in_child(case, todo, self.threads)


class CudaDevice:
    type = "cuda"
    flop_unit, flop_scale = "TFLOP/s", 1e12
    target_s, warmup_s = 0.01, 0.2
    memory_method = "torch.cuda.max_memory_allocated − memory_allocated, reset between measurements"
    gemm_note = "GEMM rate timed in the same rounds, a matmul in the case's dtype"

    def __init__(self):
        self.device = torch.device("cuda", torch.cuda.current_device())

    def describe(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        return f"{props.name}, {props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda}"

    def measure(self, fn: Callable[[], object], number: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number

    def gemm(self, dtype: str) -> Tuple[str, float, Callable[[], object]]:
        """A large square matmul in the case's dtype (float32 without TF32, unless the user enabled it)."""
        return _square_gemm(self.device, CUDA_GEMM_SIZE, getattr(torch, dtype))

    def memory_budget(self) -> float:
        free, _total = torch.cuda.mem_get_info(self.device)
        return 0.8 * free

    def measure_memory(self, case: Case, todo: List[MemoryItem]) -> Dict[MemoryItem, MemoryReading]:
        impls = implementations_by_key("cuda")
        results = {}
        for level, name, mode in todo:
            try:
                built, input_sets, grad_outs = prepare(impls[(level, name)], case, level, self.device, mode, 1)
                step = make_step(built, input_sets, grad_outs, mode)
                step()  # warm-up: workspaces, cuDNN plans
                torch.cuda.synchronize()
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
                result = step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated(self.device) - base
                del result, step, built, input_sets, grad_outs
                results[(level, name, mode)] = MemoryReading(peak, "max_memory_allocated − memory_allocated")
            except Exception as exc:  # noqa: BLE001 - reported in the table
                results[(level, name, mode)] = MemoryReading(error=first_line(exc))
        return results


def _square_gemm(device: torch.device, n: int, dtype: torch.dtype) -> Tuple[str, float, Callable[[], object]]:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    name = {torch.float32: "sgemm", torch.bfloat16: "bf16 GEMM", torch.float16: "fp16 GEMM"}.get(dtype, f"{dtype} GEMM")
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        name += " (TF32 allowed)"
    return f"{name} {n}³", 2.0 * n**3, lambda: torch.mm(a, b, out=c)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Contestant:
    name: str
    step: Callable[[], object]
    number: int = 1  # calls per timed sample


def warm_up(contestant: Contestant, dev, target_s: float, warmup_s: float) -> None:
    """Runs a contestant for about warmup_s (at least twice, or once when slow) and sets how many
    calls one timed sample holds, so that a sample lasts about target_s."""
    spent, calls, last = 0.0, 0, 0.0
    while calls == 0 or (spent < warmup_s and calls < 1000) or (calls < 2 and last < warmup_s):
        last = dev.measure(contestant.step, 1)
        spent += last
        calls += 1
    contestant.number = max(1, min(10000, round(target_s / max(last, 1e-9))))


def time_interleaved(contestants: List[Contestant], dev, repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each contestant in each round; rounds rotate the order."""
    samples: Dict[str, List[float]] = {c.name: [] for c in contestants}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(contestants)
            for c in contestants[shift:] + contestants[:shift]:
                samples[c.name].append(dev.measure(c.step, c.number))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def summarize(times: List[float]) -> Summary:
    """Seconds per call, one per round -> milliseconds: median, min, max and every round's."""
    return Summary(statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3, [t * 1e3 for t in times])


def pair_ratios(baseline: List[float], ours: List[float]) -> Speedup:
    """selfattn's speedup over a baseline: the median (min-max) of the per-round ratios."""
    ratios = [b / s for b, s in zip(baseline, ours)]
    return Speedup(statistics.median(ratios), min(ratios), max(ratios))


# ---------------------------------------------------------------------------------------------
# CPU memory, measured in a child process


def _tiny(case: Case) -> Case:
    s = case.shape
    return replace(case, shape=Shape(1, min(s.seq, 32), s.embed, s.heads))


def _measure_rss_growth(impl: Impl, case: Case, level: str, mode: str, method: str) -> MemoryReading:
    """Peak resident growth of one call over a baseline that holds its inputs and parameters."""
    device = torch.device("cpu")
    if method == "hwm":  # load the code paths on a tiny input; ru_maxrss cannot forget its peak
        make_step(*prepare(impl, _tiny(case), level, device, mode, 1), mode)()
    built, input_sets, grad_outs = prepare(impl, case, level, device, mode, 1)
    step = make_step(built, input_sets, grad_outs, mode)
    gc.collect()
    _system.malloc_trim()
    if method == "hwm":
        _system.reset_peak_rss()
        base = _system.status_kib("VmRSS") * 1024
    else:
        base = _system.max_rss_bytes()
    result = step()
    peak = _system.status_kib("VmHWM") * 1024 if method == "hwm" else _system.max_rss_bytes()
    del result
    return MemoryReading(max(0, peak - base), "VmHWM − VmRSS after clear_refs" if method == "hwm"
                         else "ru_maxrss growth, fresh process")


def memory_child_main() -> None:
    """Entry of the child process: a JSON request on stdin, one JSON line per measurement on stdout."""
    request = json.loads(sys.stdin.read())
    torch.set_num_threads(request["threads"])
    case, method = Case.from_json(request["case"]), request["method"]
    impls = implementations_by_key("cpu")
    if method == "hwm" and not (_system.reset_peak_rss() and os.path.exists("/proc/self/status")):
        print(json.dumps({"unsupported": "cannot reset the peak RSS via /proc/self/clear_refs"}), flush=True)
        return
    for level, name, mode in request["todo"]:
        try:
            reading = _measure_rss_growth(impls[(level, name)], case, level, mode, method)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            reading = MemoryReading(error=first_line(exc))
        print(json.dumps({"item": [level, name, mode], **asdict(reading)}), flush=True)


def child_env(**settings: str) -> Dict[str, str]:
    """This process's environment for a child Python that imports the same selfattn as ours, plus settings."""
    package_root = str(Path(selfattn.__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
                **settings)


def _run_memory_child(request: dict) -> Tuple[List[dict], str]:
    env = child_env(OMP_NUM_THREADS=str(request["threads"]))
    code = "from selfattn.bench.measure import memory_child_main; memory_child_main()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(request), capture_output=True,
                          text=True, env=env)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    problem = "" if proc.returncode == 0 else f"memory child exited with code {proc.returncode}: " \
                                                  f"{proc.stderr.strip().splitlines()[-1:] or ''}"
    return lines, problem


def measure_memory_in_child(case: Case, todo: List[MemoryItem], threads: int) -> Dict[MemoryItem, MemoryReading]:
    """Every measurement of a case in one child (or, without clear_refs, one child each)."""
    request = {"case": case.to_json(), "threads": threads, "method": "hwm", "todo": todo}
    lines, problem = _run_memory_child(request)
    if lines and "unsupported" in lines[0]:
        lines, problems = [], []
        for item in todo:
            more, problem = _run_memory_child(dict(request, method="maxrss", todo=[item]))
            lines += more
            problems.append(problem)
        problem = next((p for p in problems if p), "")
    results = {tuple(line.pop("item")): MemoryReading(**line) for line in lines}
    for item in todo:  # those the child did not report, e.g. because it was killed
        results.setdefault(tuple(item), MemoryReading(error=problem or "no result from the memory child"))
    return results
