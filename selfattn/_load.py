"""The one loader of selfattn's C++ library.

The ops live in a C++ library that registers them with PyTorch's dispatcher
(``TORCH_LIBRARY(selfattn)``). It comes from one of two builds, both configured by
``_settings.py``:

* ``compiled``: ``pip install --no-build-isolation .`` builds ``selfattn/_C*.so``
  against the installed torch;
* ``jit``: ``torch.utils.cpp_extension.load`` compiles ``csrc/`` with ninja on import
  (when no compiled library is present, or when ``SELFATTN_JIT=1``), cached between runs.

Only one may be loaded in a process: both register the same op names. ``load()``
decides which, once; ``selfattn.build_info()`` says which it was.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import mmap
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _settings

# Searched for in the built library's bytes, so that its build can be read without loading it
# (loading a library built against another torch fails with an undefined-symbol error).
BUILD_MARKER = b"selfattn-build-info:"

# How far the CUDA kernels have been checked; to change once scripts/gpu_check.sh has run them.
CUDA_STATUS = "tested in the CPU emulation; not yet run on a GPU"


@dataclass(frozen=True)
class BuildInfo:
    """Which build of the C++ library this process uses."""

    kind: str  # "compiled" or "jit"
    path: str
    torch: str
    cpu_capability: str
    cuda: str | None
    cuda_archs: str | None = None  # as TORCH_CUDA_ARCH_LIST, separated by "/"
    sanitize: str | None = None  # the sanitizers compiled in, e.g. "address+undefined"

    def __str__(self) -> str:
        if self.cuda:
            archs = ", ".join(_arch_name(a) for a in (self.cuda_archs or "?").split("/"))
            cuda = f"CUDA {self.cuda} kernels compiled for {archs}, {CUDA_STATUS}"
        else:
            cuda = "no CUDA"
        sanitize = f", sanitizers {self.sanitize}" if self.sanitize else ""
        return (f"selfattn {self.kind} build, torch {self.torch}, CPU {self.cpu_capability}{sanitize}, "
                f"{cuda}: {self.path}")


def _arch_name(arch: str) -> str:
    """8.0 -> sm_80, 9.0+PTX -> sm_90+PTX; named archs (Hopper) as they are."""
    number, plus, ptx = arch.partition("+")
    major, dot, minor = number.partition(".")
    return f"sm_{major}{minor}{plus}{ptx}" if dot and major.isdigit() else arch


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
                     cpu_capability=fields.get("cpu", "?"), cuda=None if cuda == "none" else cuda,
                     cuda_archs=fields.get("archs"), sanitize=fields.get("sanitize"))


def _check_compatible(info: BuildInfo) -> None:
    if info.torch != torch.__version__:
        raise ImportError(
            f"selfattn's compiled extension ({info.path}) was built against torch {info.torch}, "
            f"but this process imports torch {torch.__version__}; rebuild it against this torch with "
            "`pip install --no-build-isolation .` (build isolation compiles against whatever torch "
            "pip downloads).")
    have = _settings.host_cpu_capability()
    wanted = info.cpu_capability
    if wanted in _settings.CAPABILITIES and _settings.CAPABILITIES.index(wanted) > _settings.CAPABILITIES.index(have):
        raise ImportError(
            f"selfattn was compiled for {wanted} instructions, which this CPU lacks "
            f"(it has {have}); rebuild it here, or build with SELFATTN_CPU_CAPABILITY={have}.")


def _check_sanitizer_runtime() -> None:
    # Python is not built with the sanitizers, so their runtime must be loaded before anything
    # else; a library that needs it aborts the process on loading otherwise.
    if not hasattr(ctypes.CDLL(None), "__asan_init"):
        raise ImportError(
            "selfattn: this is a sanitizer build (SELFATTN_SANITIZE=1); run Python with "
            "LD_PRELOAD=$(gcc -print-file-name=libasan.so) (scripts/sanitize_tests.sh does).")


def _load_compiled(spec) -> BuildInfo:
    info = read_build_info(spec.origin, "compiled") or BuildInfo(
        "compiled", spec.origin, "?", "?", None)
    _check_compatible(info)
    if info.sanitize:
        _check_sanitizer_runtime()
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
    if not _settings.CSRC.is_dir():
        raise ImportError(
            f"selfattn: {reason}, and there is no csrc/ next to the package to build from; "
            "install it with `pip install --no-build-isolation .` from a checkout.")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ImportError(f"selfattn: {reason}, and building csrc/ needs a C++ compiler, but "
                          f"{compiler!r} is not on PATH (install g++, or set CXX).")
    config = _settings.extension_config()  # before cpp_extension is imported: it reads CUDA_HOME
    if config.sanitize:
        _check_sanitizer_runtime()
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as error:
        raise ImportError(f"selfattn: {reason}, and the JIT build needs ninja: `pip install ninja`.") from error
    name = f"selfattn_jit_{_settings.torch_version_tag()}_{config.variant}"
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
