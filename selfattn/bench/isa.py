"""``python -m selfattn.bench --sweep isa``: the benchmark once per instruction-set copy this CPU can
run, with both sides capped alike.

Each cap runs in processes of its own (ATen, oneDNN and MKL read their caps once, at start):
selfattn forced to a copy of its kernels (``SELFATTN_CPU_CAPABILITY``) against PyTorch with ATen's
kernels (``ATEN_CPU_CAPABILITY``), oneDNN (``ONEDNN_MAX_CPU_ISA``) and MKL
(``MKL_ENABLE_INSTRUCTIONS``) capped to the same instruction set. ``amx`` is uncapped (oneDNN may
use AMX there) and runs only on a CPU with AMX-BF16. Per cap, first a probe process says what each
side runs — ATen's capability, selfattn's copy and bf16 tile GEMMs, what MKL and oneDNN print with
``MKL_VERBOSE=1`` / ``ONEDNN_VERBOSE=1`` for a float32 and a bfloat16 matmul (MKL may avoid
AVX-512 on an AMD CPU even uncapped) — and times a 2048³ sgemm and bf16 matmul (median of 7; the
bf16 one at 512³ where it runs below 10 GFLOP/s, as it does without bf16 arithmetic);
then the benchmark runs on the ``targets`` sweep (or the cases the other options give), against
SDPA (core) and ``F.linear`` + SDPA (layer). A capped copy on a newer CPU is not the older CPU
(caches, memory and datapaths differ): each table says which machine and caps produced it.

    python -m selfattn.bench --sweep isa [--caps avx2,avx512] [the benchmark's options]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# name -> the environment that caps both sides to it ({} = uncapped).
CAPS: Dict[str, Dict[str, str]] = {
    "default": {"SELFATTN_CPU_CAPABILITY": "default", "ATEN_CPU_CAPABILITY": "default",
                "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"SELFATTN_CPU_CAPABILITY": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"SELFATTN_CPU_CAPABILITY": "avx512", "ATEN_CPU_CAPABILITY": "avx512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "amx": {},
}
# The CPU flags (/proc/cpuinfo) each cap needs.
CAP_FLAGS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
             "amx": {"amx_bf16", "amx_tile"}}
DEFAULT_CAPS = ("avx2", "avx512", "amx")  # each that this CPU can run; --caps default adds the baseline
PROBE_SIZE = 2048
PROBE_ROUNDS = 7


def cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable(cap: str, flags: set) -> bool:
    return CAP_FLAGS[cap] <= flags


def matmul_size(size: int, dtype) -> int:
    """size, or 512 where a square matmul of dtype runs below 10 GFLOP/s (bf16 without bf16
    arithmetic: ~1 GFLOP/s, where a 2048³ call takes a minute)."""
    import torch
    small = torch.randn(min(size, 512), min(size, 512), dtype=dtype)
    start = time.perf_counter()
    torch.mm(small, small)
    return size if 2 * small.shape[0]**3 / (time.perf_counter() - start) > 10e9 else small.shape[0]


def probe_main(size: int) -> None:
    """In a capped process: what each side runs, and the GEMM rates; one JSON line on stdout."""
    import torch

    import selfattn
    torch.manual_seed(0)
    info = selfattn.build_info()
    rates = {}
    for name, dtype in (("sgemm", torch.float32), ("bf16 matmul", torch.bfloat16)):
        n = matmul_size(size, dtype)
        a, b = (torch.randn(n, n, dtype=dtype) for _ in range(2))
        torch.mm(a, b)
        times = []
        for _ in range(PROBE_ROUNDS):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        rates[name] = {"size": n, "gflops": 2.0 * n**3 / statistics.median(times) / 1e9}
    print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(), "selfattn": info.cpu_capability,
                      "bf16_tile_gemm": info.bf16_gemm, "threads": torch.get_num_threads(),
                      "rates": rates}))


def verbose_main() -> None:
    """Under MKL_VERBOSE=1 and ONEDNN_VERBOSE=1: one float32 and one bfloat16 matmul and linear."""
    import torch
    import torch.nn.functional as F
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256, dtype=dtype)
        torch.mm(a, a)
        F.linear(a, a)


def _libraries_said(output: str) -> Dict[str, List[str]]:
    """MKL's banner and the oneDNN primitives (implementation names) that ran, from their verbose output."""
    mkl = [line for line in output.splitlines() if line.startswith("MKL_VERBOSE") and "oneMKL" in line]
    onednn = []
    for line in output.splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in fields:
            at = fields.index("exec")
            impl = fields[at + 3] if len(fields) > at + 3 else "?"  # exec, engine, primitive, implementation
            entry = f"{fields[at + 2]}:{impl}" if len(fields) > at + 2 else impl
            if entry not in onednn:
                onednn.append(entry)
        elif line.startswith("onednn_verbose") and ("cpu,runtime" in line or "isa:" in line):
            onednn.append(line.split(",", 2)[-1].strip())
    return {"mkl": mkl[:1] or ["(no MKL call)"], "onednn": onednn or ["(no oneDNN call)"]}


def _run(args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable] + args, env=env, capture_output=True, text=True)


def _cap_env(cap: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SELFATTN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                        "MKL_ENABLE_INSTRUCTIONS", "MKL_VERBOSE", "ONEDNN_VERBOSE", "DNNL_VERBOSE")}
    env.update(CAPS[cap])
    return env


def check_cap(cap: str, probe: dict) -> Optional[str]:
    """Why the capped run is not what it says (a side running another instruction set), or None."""
    if cap == "amx":
        return None
    expected = CAPS[cap]["ATEN_CPU_CAPABILITY"].upper()
    wrong = [f"{side} runs {probe[side]}" for side in ("aten", "selfattn") if str(probe[side]).upper() != expected]
    return f"capped to {cap}, but " + " and ".join(wrong) if wrong else None


def parse_args(argv: Sequence[str]):
    p = argparse.ArgumentParser(prog="python -m selfattn.bench --sweep isa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caps", default=None, help=f"comma-separated, of {', '.join(CAPS)} (default: each of "
                   f"{', '.join(DEFAULT_CAPS)} this CPU can run)")
    p.add_argument("--json", type=Path, default=None, help="results file (default: bench_results/isa-<time>.json)")
    p.add_argument("--probe-size", type=int, default=PROBE_SIZE, help="the probe's square GEMMs (default %(default)s)")
    return p.parse_known_args(argv)


def _benchmark_argv(rest: List[str], json_path: Path) -> List[str]:
    """The benchmark's options for one cap: the targets sweep against the strongest fair baselines
    unless the caller chose, never a plot or memory measurements."""
    argv = ["-m", "selfattn.bench"] + list(rest)
    if not any(a == "--sweep" or a.startswith("--sweep=") for a in rest) and "--quick" not in rest:
        argv += ["--sweep", "targets"]
    if not any(a == "--impls" or a.startswith("--impls=") for a in rest):
        argv += ["--impls", "sdpa,linear+sdpa"]
    return argv + ["--no-plot", "--no-memory", "--json", str(json_path)]


def main(argv: Sequence[str]) -> int:
    from .. import _system
    from .run import log
    args, rest = parse_args(argv)
    flags = cpu_flags()
    wanted = [c.strip() for c in args.caps.split(",")] if args.caps else [c for c in DEFAULT_CAPS if runnable(c, flags)]
    unknown = [c for c in wanted if c not in CAPS]
    if unknown:
        raise SystemExit(f"selfattn.bench --sweep isa: unknown cap(s) {unknown}; choose from {', '.join(CAPS)}")
    cannot = [c for c in wanted if not runnable(c, flags)]
    if cannot:
        raise SystemExit(f"selfattn.bench --sweep isa: this CPU ({_system.cpu_model()}) cannot run {', '.join(cannot)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.json or Path("bench_results") / f"isa-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for cap in wanted:
        env = _cap_env(cap)
        log(f"isa {cap}: {' '.join(f'{k}={v}' for k, v in CAPS[cap].items()) or 'uncapped'}")
        probe = _run(["-m", "selfattn.bench.isa", "--probe", str(args.probe_size)], env)
        if probe.returncode != 0:
            raise SystemExit(f"selfattn.bench --sweep isa: the {cap} probe failed:\n{probe.stderr}")
        said = _run(["-m", "selfattn.bench.isa", "--verbose-probe"],
                    dict(env, MKL_VERBOSE="1", ONEDNN_VERBOSE="1"))
        run = {"cap": cap, "env": CAPS[cap], "probe": json.loads(probe.stdout.strip().splitlines()[-1]),
               "libraries": _libraries_said(said.stdout + said.stderr)}
        problem = check_cap(cap, run["probe"])
        if problem:
            raise SystemExit(f"selfattn.bench --sweep isa: {problem}")
        cap_json = json_path.with_name(f"{json_path.stem}-{cap}.json")
        bench = subprocess.run([sys.executable] + _benchmark_argv(rest, cap_json), env=env, stdout=subprocess.PIPE,
                               text=True)
        if bench.returncode != 0:
            raise SystemExit(f"selfattn.bench --sweep isa: the {cap} benchmark failed (exit {bench.returncode})")
        run["result"] = json.loads(cap_json.read_text())
        run["report"] = bench.stdout
        runs.append(run)
    json_path.write_text(json.dumps({"cpu": _system.cpu_model(), "flags": sorted(flags & set().union(*CAP_FLAGS.values())),
                                     "runs": runs}, indent=1))
    log(f"wrote {json_path}")
    print(markdown(_system.cpu_model(), runs))
    return 0


def markdown(cpu: str, runs: List[dict]) -> str:
    out = []
    for run in runs:
        probe, libs = run["probe"], run["libraries"]
        caps = ", ".join(f"`{k}={v}`" for k, v in run["env"].items()) or "uncapped"
        out += [f"## {cpu}: cap {run['cap']} ({caps})", "",
                f"- ran: ATen {probe['aten']}, selfattn {probe['selfattn']} (bf16 tile GEMMs "
                f"{probe['bf16_tile_gemm']}), {probe['threads']} threads",
                f"- MKL: {libs['mkl'][0]}", f"- oneDNN: {'; '.join(libs['onednn'])}",
                "- same-cap rates (median of 7): " + ", ".join(
                    f"{name} {r['size']}³ {r['gflops']:.1f} GFLOP/s" for name, r in probe["rates"].items()),
                "", run["report"].strip(), ""]
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe_main(int(sys.argv[2]))
    elif sys.argv[1:] == ["--verbose-probe"]:
        verbose_main()
    else:
        sys.exit(main(sys.argv[1:]))
