"""How selfattn's C++ library is built: sources, flags, CPU instruction set, CUDA toolkit.

Shared by setup.py (the compiled build) and selfattn/_load.py (the JIT build). setup.py
executes this file on its own, as the package is not importable before it is built, so it
imports nothing from selfattn and does not import ``torch.utils.cpp_extension``, which reads
``CUDA_HOME`` once, on import: ``extension_config()`` settles that variable first.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
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

# SELFATTN_SANITIZE=1: AddressSanitizer and UndefinedBehaviorSanitizer, stopping at the first
# report. vptr is off because torch is not built with it (its type info would be reported).
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-sanitize=vptr",
                  "-fno-omit-frame-pointer", "-g"]

# The toolkit torch.utils.cpp_extension falls back on when neither CUDA_HOME nor nvcc says.
DEFAULT_CUDA_HOME = "/usr/local/cuda"
# What ATen/cuda/CUDAContextLight.h includes besides the CUDA runtime. Toolkits may ship these
# libraries' headers apart; the CUDA build of torch brings them in its nvidia-* pip packages.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")
# GPU architectures to compile for when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible:
# A100 and H100.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


# ---------------------------------------------------------------------------------------------
# CPU


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


def want_sanitize() -> bool:
    return os.environ.get("SELFATTN_SANITIZE") == "1"


# ---------------------------------------------------------------------------------------------
# CUDA


def toolkit_include_dirs(root: str | Path) -> list[Path]:
    """Where a toolkit keeps its headers: include/, or only targets/<platform>/include/ (conda)."""
    return [Path(root) / "include"] + sorted(Path(root).glob("targets/*/include"))


def is_cuda_toolkit(root: str | Path) -> bool:
    """Whether a folder is a CUDA toolkit's root: nvcc and the runtime's headers."""
    return (Path(root) / "bin" / "nvcc").is_file() and any(
        (d / "cuda_runtime.h").is_file() for d in toolkit_include_dirs(root))


def nvcc_toolkit_root(nvcc: str) -> str | None:
    """The toolkit an nvcc belongs to, as nvcc itself reports it: its dry run prints the TOP
    folder it takes its headers and tools from. Works for a wrapper script outside the toolkit."""
    try:
        result = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return str(Path(line[len("#$ TOP="):].strip()).resolve())
    return None


def cuda_toolkit_root() -> str | None:
    """The CUDA toolkit to build with, or None.

    Looked for where torch.utils.cpp_extension looks, in its order: CUDA_HOME or CUDA_PATH (an
    explicit choice: used or nothing), the nvcc on PATH, /usr/local/cuda. torch takes the folder
    above nvcc's; here symlinks are resolved first, and an nvcc that is not inside a toolkit (a
    wrapper script, say) is asked where its toolkit is.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if is_cuda_toolkit(explicit) else None
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = str(Path(nvcc).resolve().parent.parent)
        if is_cuda_toolkit(root):
            return root
        root = nvcc_toolkit_root(nvcc)
        if root and is_cuda_toolkit(root):
            return root
    return DEFAULT_CUDA_HOME if is_cuda_toolkit(DEFAULT_CUDA_HOME) else None


def cuda_library_include_dirs(toolkit: str) -> list[str]:
    """Folders with the CUDA library headers torch's CUDA headers need and the toolkit lacks,
    found in the file lists of the installed NVIDIA pip packages."""
    own = toolkit_include_dirs(toolkit)
    missing = {h for h in CUDA_LIBRARY_HEADERS if not any((d / h).is_file() for d in own)}
    dirs: list[str] = []
    for dist in importlib.metadata.distributions():
        if not missing:
            break
        if not (dist.metadata["Name"] or "").lower().startswith("nvidia"):
            continue
        for file in dist.files or ():
            if file.name in missing and file.parent.name == "include":
                missing.discard(file.name)
                folder = str(Path(dist.locate_file(file)).parent)
                if folder not in dirs:
                    dirs.append(folder)
    return sorted(dirs)


def want_cuda() -> bool:
    """Build the CUDA sources when torch is a CUDA build and a CUDA toolkit is present
    (no GPU needed); SELFATTN_CUDA=0 or 1 forces the choice. Sanitizer builds are CPU only."""
    forced = os.environ.get("SELFATTN_CUDA")
    if forced == "1" and want_sanitize():
        raise RuntimeError("SELFATTN_SANITIZE=1 builds the CPU library only; unset SELFATTN_CUDA=1")
    if forced == "0" or want_sanitize():
        return False
    has_sources = bool(glob.glob(str(CSRC / "cuda" / "*.cu")))
    possible = torch.version.cuda is not None and has_sources and cuda_toolkit_root() is not None
    if forced == "1" and not possible:
        explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        toolkit = (f"CUDA_HOME={explicit} lacks bin/nvcc or cuda_runtime.h" if explicit else
                   f"none on PATH or in {DEFAULT_CUDA_HOME}; set CUDA_HOME")
        raise RuntimeError(
            "SELFATTN_CUDA=1, but a CUDA build needs a CUDA build of torch "
            f"(this one: {torch.__version__}), a CUDA toolkit ({toolkit}), and csrc/cuda/*.cu")
    return possible


def cuda_arch_list() -> str:
    """The GPU architectures to compile for, spelled as TORCH_CUDA_ARCH_LIST: that variable, or
    the visible GPUs' (as torch would pick), or DEFAULT_CUDA_ARCHS on a machine without one."""
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if wanted and wanted != "native":
        return wanted
    visible = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(visible[:-1] + [visible[-1] + "+PTX"]) if visible else DEFAULT_CUDA_ARCHS


# ---------------------------------------------------------------------------------------------
# The library


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
    sanitize: bool
    cpu_capability: str
    build_info: str

    @property
    def variant(self) -> str:
        """What sets builds apart beyond the torch version: names their JIT build folders."""
        return self.cpu_capability.lower() + ("_cuda" if self.with_cuda else "") + ("_sanitize" if self.sanitize else "")


def extension_config() -> ExtensionConfig:
    """Sources and flags of the C++ library, for setup.py and the JIT build alike. Sets CUDA_HOME
    and TORCH_CUDA_ARCH_LIST for torch.utils.cpp_extension when they are unset."""
    with_cuda = want_cuda()
    sanitize = want_sanitize()
    capability = build_cpu_capability()
    include_dirs = []
    # Passed unquoted through the shell and stringized in selfattn.cpp: no quotes, spaces or ';'.
    info = f"torch:{torch.__version__},cpu:{capability},cuda:{torch.version.cuda if with_cuda else 'none'}"
    if with_cuda:
        toolkit = cuda_toolkit_root()
        os.environ.setdefault("CUDA_HOME", toolkit)
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        include_dirs = cuda_library_include_dirs(toolkit)
        info += ",archs:" + re.sub(r"[;\s]+", "/", os.environ["TORCH_CUDA_ARCH_LIST"])
    if sanitize:
        info += ",sanitize:address+undefined"
    sources = sorted(glob.glob(str(CSRC / "*.cpp"))) + sorted(glob.glob(str(CSRC / "cpu" / "*.cpp")))
    if with_cuda:  # the kernels (.cu) and their host side (.cpp: tensors, dispatch)
        sources += sorted(glob.glob(str(CSRC / "cuda" / "*.cu"))) + sorted(glob.glob(str(CSRC / "cuda" / "*.cpp")))
    cuda_define = ["-DSELFATTN_WITH_CUDA"] if with_cuda else []
    sanitize_flags = SANITIZE_FLAGS if sanitize else []
    cxx = (["-O3", "-fopenmp"] + CAPABILITY_FLAGS[capability] + [f"-DSELFATTN_BUILD_INFO={info}"]
           + cuda_define + sanitize_flags)
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
        link_flags=["-fopenmp"] + sanitize_flags,
        include_dirs=include_dirs,
        with_cuda=with_cuda,
        sanitize=sanitize,
        cpu_capability=capability,
        build_info=info,
    )
