"""Tile GEMM rates on this CPU, one thread: the numbers behind the choice of the bf16 micro-kernel
(DESIGN.md, "Dtypes"). Interleaved rounds, median (min-max) GFLOP/s. A brgemm the CPU cannot run
(f16 with VNNI-packed B needs AMX-FP16) prints its error.

    python scripts/bench_tile_gemm.py [kinds, comma-separated]
"""

import statistics
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

HERE = Path(__file__).resolve().parent
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512",
         "-DCPU_CAPABILITY_AVX512"]
KINDS = ["fp32", "own", "brgemm_bf16", "brgemm_f16", "brgemm_f16_novnni", "brgemm_f32"]


def main():
    ext = load("selfattn_tile_gemm_bench", [str(HERE / "bench_tile_gemm.cpp")],
               extra_include_paths=[str(HERE.parent / "csrc")], extra_cflags=FLAGS)
    torch.set_num_threads(1)
    print("bf16 kernels usable:", ext.has_bf16(), "| brgemm packing (AMX) for bf16:", ext.could_pack("bf16"),
          "f16:", ext.could_pack("f16"))
    kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else KINDS
    for shape in [(64, 64, 64), (64, 128, 64), (64, 64, 128)]:
        rates, errors = {k: [] for k in kinds}, {}
        for _ in range(7):
            for kind in kinds:
                if kind in errors:
                    continue
                try:
                    rates[kind].append(ext.bench(kind, *shape, 3000))
                except RuntimeError as e:
                    errors[kind] = str(e).splitlines()[0]
        cells = [f"{k} {statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" for k, v in rates.items() if v]
        print(f"(m, n, k) = {shape}:", ", ".join(cells))
        for kind, error in errors.items():
            print(f"  {kind}: {error}")


if __name__ == "__main__":
    main()
