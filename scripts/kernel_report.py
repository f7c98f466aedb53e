"""Resource usage and SASS of the tensor-core kernels, without a GPU:

    python scripts/kernel_report.py                 # every csrc/cuda/*_tc_*.cu, sm_80 and sm_90
    python scripts/kernel_report.py --arch 90 csrc/cuda/attention_fwd_tc_hd128_bf16.cu

Compiles each file with the extension's nvcc flags plus -Xptxas -v, then, per kernel and arch:
registers, spill stores/loads (bytes), and in the kernel's hottest loop (the backward branch
enclosing the most HMMA) the SASS instructions, HMMA, LDSM, LDGSTS, MUFU and BAR counts, and
LDL/STL (local memory: spills) in the whole kernel. Needs nvcc; cuobjdump from the toolkit, from
PATH or from triton's bundled copy. Compiles in parallel jobs (MAX_JOBS, default 2), niced.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: csrc/ and selfattn/_settings.py


def nvcc_command(source: Path, obj: Path, archs: list[str]) -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("selfattn_settings", ROOT / "selfattn" / "_settings.py")
    settings = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = settings
    spec.loader.exec_module(settings)
    config = settings.extension_config()
    from torch.utils import cpp_extension

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        includes = cpp_extension.include_paths(cuda=True)
    nvcc = str(Path(settings.cuda_toolkit_root()) / "bin" / "nvcc")
    # What torch's build adds to every .cu file of the extension.
    flags = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-std=c++20"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return ([nvcc, "-c", str(source), "-o", str(obj), "-Xptxas", "-v"] + flags + config.nvcc_flags
            + [f"-I{d}" for d in includes + config.include_dirs] + gencode)


def find_cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates.append(str(Path(cuda_home) / "bin" / "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise SystemExit("kernel_report: no cuobjdump found (CUDA toolkit, PATH or triton)")


def kernel_kind(name: str) -> str:
    """A mangled kernel name as its kind, with the instantiation's template flags (the forward's
    kTensorMask and kDropout, the backward's kDropout, as +mask, +dropout)."""
    flags = re.findall(r"Lb([01])E", name)
    for key, kind in (("forward_tc", "forward"), ("dq_tc", "dq"), ("dkdv_tc", "dk/dv")):
        if key in name:
            if kind == "forward" and len(flags) == 2:
                return kind + " +mask" * (flags[0] == "1") + " +dropout" * (flags[1] == "1")
            if len(flags) == 1:  # the backward kernels' kDropout
                return kind + " +dropout" * (flags[0] == "1")
            return kind + (f" [{''.join(flags)}]" if flags else "")
    return name[:40]


def ptxas_usage(text: str) -> dict:
    """(kernel kind, arch) -> registers, spill bytes, from ptxas -v output."""
    usage = {}
    for m in re.finditer(r"Compiling entry function '(\S+)' for '(sm_\d+)'\n.*?Function properties.*?\n\s*(\d+) bytes "
                         r"stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n.*?Used (\d+) registers",
                         text, re.S):
        usage[(kernel_kind(m.group(1)), m.group(2))] = {
            "regs": int(m.group(6)), "spill_st": int(m.group(4)), "spill_ld": int(m.group(5))}
    return usage


def opcode(instruction: str) -> str:
    words = instruction.split()
    op = words[1] if words[0].startswith("@") else words[0]
    return op.split(".")[0]


def sass_counts(cuobjdump: str, obj: Path, arch: str) -> dict:
    out = subprocess.run([cuobjdump, "-sass", "-arch", arch, str(obj)], capture_output=True, text=True,
                         check=True).stdout
    counts = {}
    for function in re.split(r"\n\s+Function : ", out)[1:]:
        name = function.split("\n", 1)[0]
        code = [(int(m.group(1), 16), m.group(2)) for m in
                re.finditer(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", function, re.M)]
        addresses = [a for a, _ in code]
        whole = collections.Counter(opcode(i) for _, i in code)
        best = None
        for end, (address, instruction) in enumerate(code):
            target = re.search(r"BRA.*?0x([0-9a-f]+)", instruction)
            if target and int(target.group(1), 16) < address and int(target.group(1), 16) in addresses:
                loop = collections.Counter(opcode(i) for _, i in code[addresses.index(int(target.group(1), 16)):end + 1])
                if loop["HMMA"] and (best is None or loop["HMMA"] > best["HMMA"]):
                    best = loop
        best = best or collections.Counter()
        counts[kernel_kind(name)] = {"loop": sum(best.values()), **{k: best[k] for k in ("HMMA", "LDSM", "LDGSTS", "MUFU", "BAR")},
                                     "local": whole["LDL"] + whole["STL"]}
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    args = p.parse_args()
    files = args.files or [Path(f) for f in sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*_tc_*.cu")))]
    archs = [a.strip().replace(".", "") for a in args.arch.split(",")]
    cuobjdump = find_cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        def compile_one(source: Path):
            obj = Path(tmp) / (source.stem + ".o")
            cmd = ["nice", "-n", "19"] + nvcc_command(source, obj, archs)
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"kernel_report: nvcc failed on {source}:\n{done.stderr[-4000:]}")
            return source, obj, done.stdout + done.stderr

        jobs = int(os.environ.get("MAX_JOBS", "2"))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(compile_one, files))
        print("| file | kernel | arch | regs | spill st/ld B | loop SASS | HMMA | LDSM | LDGSTS | MUFU | BAR | LDL+STL |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for source, obj, log in results:
            usage = ptxas_usage(log)
            for arch in archs:
                sass = sass_counts(cuobjdump, obj, f"sm_{arch}")
                for kind, c in sass.items():
                    u = usage.get((kind, f"sm_{arch}"), {})
                    print(f"| {source.stem} | {kind} | sm_{arch} | {u.get('regs', '?')} | {u.get('spill_st', '?')}/"
                          f"{u.get('spill_ld', '?')} | {c['loop']} | {c['HMMA']} | {c['LDSM']} | {c['LDGSTS']} | "
                          f"{c['MUFU']} | {c['BAR']} | {c['local']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
