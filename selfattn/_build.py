"""The one loader of selfattn's C++ library, and the build settings setup.py shares.

The ops live in a C++ library that registers them with PyTorch's dispatcher
(``TORCH_LIBRARY(selfattn)``). It comes from one of two builds:

* ``compiled``: ``pip install --no-build-isolation .`` builds ``selfattn/_C*.so``
  against the installed torch;
* ``jit``: ``torch.utils.cpp_extension.load`` compiles ``csrc/`` with ninja on import
  (when no compiled library is present, or when ``SELFATTN_JIT=1``), cached between runs.

Only one may be loaded in a process: both register the same op names. ``load()``
decides which, once; ``selfattn.build_info()`` says which it was.

This file is also executed by setup.py on its own (the package is not importable
before it is built), so it imports nothing from selfattn and imports
``torch.utils.cpp_extension`` only inside functions, after ``CUDA_HOME`` is settled.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import mmap
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

# Searched for in the built library's bytes, so that its build can be read without loading it
# (loading a library built against another torch fails with an undefined-symbol error).
BUILD_MARKER = b"selfattn-build-info:"

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
# Build settings


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


def _torch_version_tag() -> str:
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


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class BuildInfo:
    """Which build of the C++ library this process uses."""

    kind: str  # "compiled" or "jit"
    path: str
    torch: str
    cpu_capability: str
    cuda: str | None

    def __str__(self) -> str:
        cuda = f"CUDA {self.cuda}" if self.cuda else "no CUDA"
        return (f"selfattn {self.kind} build, torch {self.torch}, CPU {self.cpu_capability}, {cuda}: "
                f"{self.path}")


_loaded: BuildInfo | None = None


def read_build_info(library: str, kind: str) -> BuildInfo | None:
    """The build settings embedded in a built library, read from its bytes without loading it."""
    try:
        with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(BUILD_MARKER)
            if start < 0:
                return None
            end = data.find(b"\0", start)
            text = data[start + len(BUILD_MARKER):end].decode(errors="replace")
    except (OSError, ValueError):
        return None
    fields = dict(item.split(":", 1) for item in text.strip().split(",") if ":" in item)
    cuda = fields.get("cuda", "none")
    return BuildInfo(kind=kind, path=library, torch=fields.get("torch", "?"),
                     cpu_capability=fields.get("cpu", "?"), cuda=None if cuda == "none" else cuda)


def _check_compatible(info: BuildInfo) -> None:
    if info.torch != torch.__version__:
        raise ImportError(
            f"selfattn's compiled extension ({info.path}) was built against torch {info.torch}, "
            f"but this process imports torch {torch.__version__}; rebuild it against this torch with "
            "`pip install --no-build-isolation .` (build isolation compiles against whatever torch "
            "pip downloads).")
    have = host_cpu_capability()
    if info.cpu_capability in CAPABILITIES and CAPABILITIES.index(info.cpu_capability) > CAPABILITIES.index(have):
        raise ImportError(
            f"selfattn was compiled for {info.cpu_capability} instructions, which this CPU lacks "
            f"(it has {have}); rebuild it here, or build with SELFATTN_CPU_CAPABILITY={have}.")


def _load_compiled(spec) -> BuildInfo:
    info = read_build_info(spec.origin, "compiled") or BuildInfo(
        "compiled", spec.origin, "?", "?", None)
    _check_compatible(info)
    try:
        importlib.import_module("selfattn._C")
    except ImportError as error:
        if "undefined symbol" in str(error):
            raise ImportError(
                f"selfattn's compiled extension ({spec.origin}) does not match the installed torch "
                f"{torch.__version__} ({error}); rebuild it with `pip install --no-build-isolation .`."
            ) from error
        raise
    return info


def _jit_build_directory(name: str) -> Path:
    root = os.environ.get("SELFATTN_JIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "selfattn")
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_jit(reason: str) -> BuildInfo:
    if not CSRC.is_dir():
        raise ImportError(
            f"selfattn: {reason}, and there is no csrc/ next to the package to build from; "
            "install it with `pip install --no-build-isolation .` from a checkout.")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ImportError(f"selfattn: {reason}, and building csrc/ needs a C++ compiler, but "
                          f"{compiler!r} is not on PATH (install g++, or set CXX).")
    config = extension_config()
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as error:
        raise ImportError(f"selfattn: {reason}, and the JIT build needs ninja: `pip install ninja`.") from error
    name = f"selfattn_jit_{_torch_version_tag()}_{config.cpu_capability.lower()}" + ("_cuda" if config.with_cuda else "")
    build_dir = _jit_build_directory(name)
    verbose = os.environ.get("SELFATTN_VERBOSE") == "1"
    print(f"selfattn: {reason}; JIT-building csrc/ with ninja in {build_dir} "
          f"(first build about a minute, later imports reuse it)", file=sys.stderr, flush=True)
    try:
        path = cpp_extension.load(
            name=name,
            sources=config.sources,
            extra_cflags=config.cxx_flags,
            extra_cuda_cflags=config.nvcc_flags,
            extra_ldflags=config.link_flags,
            extra_include_paths=config.include_dirs,
            build_directory=str(build_dir),
            with_cuda=config.with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as error:  # the compiler's output is in the message
        raise ImportError(f"selfattn: the JIT build of csrc/ failed:\n{error}") from error
    return read_build_info(path, "jit") or BuildInfo("jit", path, torch.__version__, config.cpu_capability,
                                                     torch.version.cuda if config.with_cuda else None)


def load() -> BuildInfo:
    """Load the C++ library once per process: the compiled build, or else the JIT build."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if hasattr(torch.ops.selfattn, "attention_fwd"):
        raise ImportError(
            "selfattn: ops named selfattn:: are already registered in this process by another "
            "library; load only one build of selfattn (the compiled one or SELFATTN_JIT=1).")
    if os.environ.get("SELFATTN_JIT") == "1":
        _loaded = _load_jit("SELFATTN_JIT=1")
    else:
        spec = importlib.util.find_spec("selfattn._C")
        if spec is None or spec.origin is None:
            _loaded = _load_jit("no compiled extension (selfattn/_C) is installed")
        else:
            _loaded = _load_compiled(spec)
    return _loaded
