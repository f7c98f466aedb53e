"""The decoding benchmark: one query against a long key/value cache, GQA.

``python -m selfattn.bench --sweep decode [--rounds 7] [--dtype float32,bfloat16] [--threads N] [--device cuda]``

Cases (issue 10, part 4): B = 1, Hq = 32, Hk = 8, D = 128, Nq = 1, Nk ∈ {1024, 8192, 32768}, and
B = 8 at Nk = 4096. Contestants on the same un-repeated cache:

* ``selfattn``: ``selfattn.attention(..., enable_gqa=True)`` (the decode path);
* ``sdpa_gqa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)``;
* ``hf_repeat``: Hugging Face's way, ``repeat_kv`` (expand + reshape) then SDPA, the repeat timed
  with it;
* ``copy``: ``dst.copy_(src)`` of as many bytes as k and v hold, the memory's own speed;
* on CUDA also ``selfattn_tiled``: selfattn with ``SELFATTN_DECODE_SPLITS=0`` (the ordinary kernels),
  so the split-K kernel's gain shows.

Memory, not cache: each contestant cycles through a set of caches totalling more than 4× the L3
size (the L2 size on CUDA), so every call reads k and v from DRAM. On CUDA a sample ends with a
synchronize. Rounds are interleaved (every contestant once per
round, in rotating order); reported: the median of ≥ 7 rounds with min–max, the per-round ratio
selfattn / baseline, and k + v bytes read per second against copy's (read + write) bytes per second.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import selfattn
from selfattn._system import cpu_model

from .contest import with_settings

CASES = [(1, 1024), (1, 8192), (1, 32768), (8, 4096)]  # (B, Nk)
HQ, HK, D = 32, 8, 128


def l3_bytes() -> int:
    """The L3 size lscpu reports (all instances), or 32 MiB when it cannot be read."""
    import subprocess
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("L3 cache:"):
                return int(line.split(":", 1)[1].split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    return 32 << 20


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """transformers' repeat_kv: (B, Hk, N, D) -> (B, Hk·groups, N, D), a copy."""
    b, hk, n, d = x.shape
    return x[:, :, None].expand(b, hk, groups, n, d).reshape(b, hk * groups, n, d)


def time_rounds(contestants: Dict[str, Callable[[int], object]], sets: int, rounds: int,
                sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Seconds per call of each contestant, one sample per round; each sample is a pass over
    every cache of the rotating set (so each call reads from memory), order rotated per round.
    sync() waits for queued device work (CUDA) before and after each sample."""
    names = list(contestants)
    for fn in contestants.values():  # warm-up: first touch of every page, JIT-free paths
        for i in range(sets):
            fn(i)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = contestants[name]
            sync()
            start = time.perf_counter()
            for i in range(sets):
                fn(i)
            sync()
            times[name].append((time.perf_counter() - start) / sets)
    return times


def without_decode_path(fn: Callable[[], object]) -> object:
    """fn() with SELFATTN_DECODE_SPLITS=0 (read per call): selfattn's ordinary kernels."""
    return with_settings(fn, SELFATTN_DECODE_SPLITS="0")()


def run_case(batch: int, nk: int, dtype: torch.dtype, rounds: int, l3: int, device: str = "cpu") -> List[dict]:
    groups = HQ // HK
    kv_bytes = 2 * batch * HK * nk * D * torch.finfo(dtype).bits // 8
    sets = max(2, math.ceil(4 * l3 / kv_bytes) + 1)
    qs = [torch.randn(batch, HQ, 1, D, dtype=dtype, device=device) for _ in range(sets)]
    ks = [torch.randn(batch, HK, nk, D, dtype=dtype, device=device) for _ in range(sets)]
    vs = [torch.randn(batch, HK, nk, D, dtype=dtype, device=device) for _ in range(sets)]
    # copy_: the same bytes as k + v, its own rotating set
    srcs = [torch.empty(kv_bytes // 4, dtype=torch.float32, device=device).normal_() for _ in range(sets)]
    dsts = [torch.empty_like(s) for s in srcs]
    contestants = {
        "selfattn": lambda i: selfattn.attention(qs[i], ks[i], vs[i], enable_gqa=True),
        "sdpa_gqa": lambda i: F.scaled_dot_product_attention(qs[i], ks[i], vs[i], enable_gqa=True),
        "hf_repeat": lambda i: F.scaled_dot_product_attention(qs[i], repeat_kv(ks[i], groups),
                                                              repeat_kv(vs[i], groups)),
        "copy": lambda i: dsts[i].copy_(srcs[i]),
    }
    sync = lambda: None  # noqa: E731
    if device != "cpu":
        contestants["selfattn_tiled"] = lambda i: without_decode_path(
            lambda: selfattn.attention(qs[i], ks[i], vs[i], enable_gqa=True))
        sync = torch.cuda.synchronize
    times = time_rounds(contestants, sets, rounds, sync)
    ours = times["selfattn"]
    rows = []
    copy_bw = [2 * kv_bytes / t for t in times["copy"]]  # read + write
    for name, ts in times.items():
        row = {"B": batch, "Nk": nk, "dtype": str(dtype).replace("torch.", ""), "impl": name,
               "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
               "set_bytes": sets * kv_bytes}
        if name in ("sdpa_gqa", "hf_repeat", "selfattn_tiled"):
            ratios = [b / a for a, b in zip(ours, ts)]
            row["speedup"] = (statistics.median(ratios), min(ratios), max(ratios))
        if name == "selfattn":
            bw = [kv_bytes / t for t in ts]
            fractions = [b / c for b, c in zip(bw, copy_bw)]
            row["kv_GBps"] = statistics.median(bw) / 1e9
            row["of_copy"] = (statistics.median(fractions), min(fractions), max(fractions))
        if name == "copy":
            row["copy_GBps"] = statistics.median(copy_bw) / 1e9
        rows.append(row)
    return rows


def markdown(rows: List[dict]) -> str:
    out = ["| B | Nk | dtype | impl | median ms (min–max) | selfattn speedup, median (min–max) | GB/s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "" if "speedup" not in r else "{:.2f}× ({:.2f}–{:.2f})".format(*r["speedup"])
        gbps = ""
        if "kv_GBps" in r:
            gbps = "{:.1f} k+v read = {:.0%} of copy ({:.0%}–{:.0%})".format(r["kv_GBps"], *r["of_copy"])
        elif "copy_GBps" in r:
            gbps = f"{r['copy_GBps']:.1f} read+write"
        out.append(f"| {r['B']} | {r['Nk']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.3f} "
                   f"({r['min_ms']:.3f}–{r['max_ms']:.3f}) | {speed} | {gbps} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m selfattn.bench --sweep decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 7 for a reported ratio)")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cases", default=None, help="BxNk[,...], e.g. 1x8192 (default: the issue's four)")
    p.add_argument("--l3-bytes", type=int, default=None, help="override lscpu's L3 size (tests)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the L2 size then stands for the L3's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = CASES if not args.cases else [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    if args.device == "cpu":
        l3 = args.l3_bytes or l3_bytes()
        where = f"{cpu_model()}, {torch.get_num_threads()} threads, L3 {l3 >> 20} MiB"
    else:
        props = torch.cuda.get_device_properties(args.device)
        l3 = args.l3_bytes or props.L2_cache_size
        where = f"{props.name}, {props.multi_processor_count} SMs, L2 {l3 >> 20} MiB"
    print(f"# decode: {where}; torch "
          f"{torch.__version__}; Hq={HQ}, Hk={HK}, D={D}, Nq=1; {args.rounds} interleaved rounds")
    rows: List[dict] = []
    for name in args.dtype.split(","):
        dtype = getattr(torch, name.strip())
        for batch, nk in cases:
            case_rows = run_case(batch, nk, dtype, args.rounds, l3, args.device)
            rows += case_rows
            print("\n".join(markdown(case_rows).splitlines()[2:]), flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
