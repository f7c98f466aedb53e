"""How selfattn's C++ library is built: sources, flags, CPU instruction set, CUDA toolkit.

Shared by setup.py (the compiled build) and selfattn/_load.py (the JIT build). setup.py
executes this file on its own, as the package is not importable before it is built, so it
imports nothing from selfattn and does not import ``torch.utils.cpp_extension``, which reads
``CUDA_HOME`` once, on import: ``extension_config()`` settles that variable first.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent  # the checkout, when running from one
CSRC = SOURCE_ROOT / "csrc"

CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
# Flags under which at::vec uses the instruction set's own code; without them it runs its
# scalar fallback (measured ~10x slower for exp). Same sets as PyTorch's own kernels use.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}


# ---------------------------------------------------------------------------------------------
# Settings


def host_cpu_capability() -> str:
    """The best vector instruction set of this CPU that the kernels have code for."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "DEFAULT"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return "DEFAULT"


def build_cpu_capability() -> str:
    """The instruction set to compile for: this machine's, unless SELFATTN_CPU_CAPABILITY says."""
    wanted = os.environ.get("SELFATTN_CPU_CAPABILITY", "").strip().upper()
    if not wanted:
        return host_cpu_capability()
    if wanted not in CAPABILITIES:
        raise ValueError(f"SELFATTN_CPU_CAPABILITY must be one of {', '.join(CAPABILITIES)}, got {wanted!r}")
    return wanted


def cuda_toolkit_root() -> str | None:
    """The CUDA toolkit folder (the one whose lib64/ holds libcudart), or None.

    torch guesses CUDA_HOME from the nvcc on PATH; where that nvcc is a wrapper script
    (as in /usr/local/bin here) the guess lands on the wrong folder, so look properly.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:  # a wrapper script that execs the real nvcc: follow the path it names
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for match in re.findall(r"(/\S+)/bin/nvcc", text):
                candidates.append(match)
        except OSError:
            pass
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").exists() and glob.glob(f"{root}/lib*/libcudart.so*"):
            return root
    return None


def want_cuda() -> bool:
    """Build the CUDA sources when torch is a CUDA build and a CUDA toolkit is present
    (no GPU needed); SELFATTN_CUDA=0 or 1 forces the choice."""
    forced = os.environ.get("SELFATTN_CUDA")
    has_sources = bool(glob.glob(str(CSRC / "cuda" / "*.cu")))
    if forced == "0":
        return False
    possible = torch.version.cuda is not None and cuda_toolkit_root() is not None and has_sources
    if forced == "1" and not possible:
        raise RuntimeError(
            "SELFATTN_CUDA=1, but a CUDA build needs a CUDA build of torch "
            f"(this one: {torch.__version__}), nvcc with its toolkit, and csrc/cuda/*.cu")
    return possible


def _cuda_include_dirs() -> list[str]:
    # ATen/cuda/CUDAContext.h includes cusparse.h; some toolkits lack it, while the pip CUDA
    # packages that come with the CUDA build of torch carry it.
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cusparse/include", "nvidia/cuda_runtime/include"):
            path = Path(base) / sub
            if (path / "cusparse.h").exists():
                dirs.append(str(path))
    return dirs[:1]


def torch_version_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.__version__)


@dataclass
class ExtensionConfig:
    sources: list[str]
    cxx_flags: list[str]
    nvcc_flags: list[str]
    link_flags: list[str]
    include_dirs: list[str]
    with_cuda: bool
    cpu_capability: str
    build_info: str = field(default="")


def extension_config() -> ExtensionConfig:
    """Sources and flags of the C++ library, for setup.py and the JIT build alike."""
    with_cuda = want_cuda()
    if with_cuda and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_toolkit_root()  # before torch.utils.cpp_extension reads it
    capability = build_cpu_capability()
    # Passed unquoted through the shell and stringized in selfattn.cpp: no quotes, spaces or ';'.
    info = (f"torch:{torch.__version__},cpu:{capability},"
            f"cuda:{torch.version.cuda if with_cuda else 'none'}")
    sources = sorted(glob.glob(str(CSRC / "*.cpp"))) + sorted(glob.glob(str(CSRC / "cpu" / "*.cpp")))
    if with_cuda:  # the kernels (.cu) and their host side (.cpp: tensors, dispatch)
        sources += sorted(glob.glob(str(CSRC / "cuda" / "*.cu"))) + sorted(glob.glob(str(CSRC / "cuda" / "*.cpp")))
    cuda_define = ["-DSELFATTN_WITH_CUDA"] if with_cuda else []
    cxx = ["-O3", "-fopenmp"] + CAPABILITY_FLAGS[capability] + [f"-DSELFATTN_BUILD_INFO={info}"] + cuda_define
    # No -std here: torch's cpp_extension adds the standard its headers need (C++20 from torch
    # 2.10 on), and only when no -std is given; a fixed -std=c++17 breaks those headers.
    # No SELFATTN_BUILD_INFO either (only selfattn.cpp reads it): nvcc splits -D values at
    # commas, and its "cuda:13.0" piece would define a macro `cuda` that breaks thrust's headers.
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + cuda_define
    return ExtensionConfig(
        sources=sources,
        cxx_flags=cxx,
        nvcc_flags=nvcc,
        # at::parallel_for runs on one thread, silently, without OpenMP.
        link_flags=["-fopenmp"],
        include_dirs=_cuda_include_dirs() if with_cuda else [],
        with_cuda=with_cuda,
        cpu_capability=capability,
        build_info=info,
    )
