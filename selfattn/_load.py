"""The one loader of selfattn's C++ library.

The ops live in a C++ library that registers them with PyTorch's dispatcher
(``TORCH_LIBRARY(selfattn)``). It comes from one of two builds, both configured by
``_settings.py``:

* ``compiled``: ``pip install --no-build-isolation .`` builds ``selfattn/_C*.so``
  against the installed torch;
* ``jit``: ``torch.utils.cpp_extension.load`` compiles ``csrc/`` with ninja on import
  (when no compiled library is present, or when ``SELFATTN_JIT=1``), cached between runs.

Only one may be loaded in a process: both register the same op names. ``load()``
decides which, once; ``selfattn.build_info()`` says which it was. Either build holds the CPU
kernels for every x86-64 instruction set (DEFAULT, AVX2, AVX512) and picks one at run time
(csrc/cpu/dispatch.cpp), so neither refuses a CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
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


@dataclass(frozen=True)
class BuildInfo:
    """Which build of the C++ library this process uses."""

    kind: str  # "compiled" or "jit"
    path: str
    torch: str
    cpu_capabilities: tuple[str, ...]  # the copies of the CPU kernels compiled in
    cuda: str | None
    cuda_archs: str | None = None  # as TORCH_CUDA_ARCH_LIST, separated by "/"
    sanitize: str | None = None  # the sanitizers compiled in, e.g. "address+undefined"
    cpu_capability: str | None = None  # the copy in use (chosen at run time); None before loading
    bf16_gemm: str | None = None  # what bf16 tile GEMMs run on in that copy (the op _bf16_tile_gemm)
    # the caches the CPU forward blocks for and the query blocks they give (the op _cpu_blocking)
    cpu_blocking: str | None = None
    # "13.0/12.4": the CUDA toolkit found and torch's CUDA, when their major versions differed and
    # the build went CPU-only for it
    cuda_toolkit_mismatch: str | None = None

    def __str__(self) -> str:
        if self.cuda:
            archs = ", ".join(_arch_name(a) for a in (self.cuda_archs or "?").split("/"))
            cuda = f"CUDA {self.cuda} kernels compiled for {archs}"
        elif self.cuda_toolkit_mismatch:
            toolkit, _, torch_cuda = self.cuda_toolkit_mismatch.partition("/")
            cuda = (f"no CUDA (the CUDA toolkit found is CUDA {toolkit}, torch's CUDA is {torch_cuda}: rebuild "
                    f"with CUDA_HOME at a CUDA {torch_cuda.split('.')[0]}.x toolkit for the CUDA kernels)")
        else:
            cuda = "no CUDA"
        sanitize = f", sanitizers {self.sanitize}" if self.sanitize else ""
        in_use = f" (running {self.cpu_capability})" if self.cpu_capability else ""
        if self.bf16_gemm:
            in_use += f", bf16 tile GEMMs {self.bf16_gemm}"
        if self.cpu_blocking:
            in_use += f", blocking for {self.cpu_blocking}"
        return (f"selfattn {self.kind} build, torch {self.torch}, CPU kernels "
                f"{'/'.join(self.cpu_capabilities)}{in_use}{sanitize}, {cuda}: {self.path}")


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
                     cpu_capabilities=tuple(fields.get("cpu", "?").split("/")),
                     cuda=None if cuda == "none" else cuda, cuda_archs=fields.get("archs"),
                     sanitize=fields.get("sanitize"), cuda_toolkit_mismatch=fields.get("cuda_toolkit_mismatch"))


def _check_compatible(info: BuildInfo) -> None:
    if info.torch != torch.__version__:
        raise ImportError(
            f"selfattn's compiled extension ({info.path}) was built against torch {info.torch}, "
            f"but this process imports torch {torch.__version__}; rebuild it against this torch with "
            "`pip install --no-build-isolation .` (build isolation compiles against whatever torch "
            "pip downloads).")


def _check_sanitizer_runtime() -> None:
    # Python is not built with the sanitizers, so their runtime must be loaded before anything
    # else; a library that needs it aborts the process on loading otherwise.
    if not hasattr(ctypes.CDLL(None), "__asan_init"):
        raise ImportError(
            "selfattn: this is a sanitizer build (SELFATTN_SANITIZE=1); run Python with "
            "LD_PRELOAD=$(gcc -print-file-name=libasan.so) (.ci/sanitize_tests.sh does).")


def _load_compiled(spec) -> BuildInfo:
    info = read_build_info(spec.origin, "compiled") or BuildInfo("compiled", spec.origin, "?", ("?",), None)
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
    try:  # before cpp_extension is imported: it reads CUDA_HOME
        config = _settings.extension_config()
    except RuntimeError as error:  # a torch below the floor, an unmet SELFATTN_CUDA=1
        raise ImportError(f"selfattn: {reason}, and no JIT build: {error}") from error
    if config.sanitize:
        _check_sanitizer_runtime()
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as error:
        raise ImportError(f"selfattn: {reason}, and the JIT build needs ninja: `pip install ninja`.") from error
    name = f"selfattn_jit_{_settings.torch_version_tag()}_{config.variant}"
    build_dir = _jit_build_directory(name)
    print(f"selfattn: {reason}; JIT-building csrc/ with ninja in {build_dir} "
          f"(first build a few minutes, later imports reuse it)", file=sys.stderr, flush=True)
    from filelock import FileLock  # a dependency of torch

    with FileLock(str(build_dir / "lock")):  # one builder per folder; the others wait, then reuse
        path = _jit_compile(config, name, build_dir)
    torch.ops.load_library(path)
    return read_build_info(path, "jit") or BuildInfo("jit", path, torch.__version__, config.cpu_capabilities,
                                                     torch.version.cuda if config.with_cuda else None)


def _jit_compile(config: _settings.ExtensionConfig, name: str, build_dir: Path) -> str:
    """Builds the library as setup.py does (the same build_ext), into build_dir; ninja recompiles
    only what changed, and nothing is relinked when no source or header is newer than the library.
    The compiler's output goes to build_dir/build.log, and into the error when the build fails
    (SELFATTN_VERBOSE=1: to the terminal)."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    extension = (CUDAExtension if config.with_cuda else CppExtension)(
        name, sources=config.sources, include_dirs=config.include_dirs, depends=_settings.extension_depends(),
        extra_compile_args={"cxx": list(config.cxx_flags), "nvcc": list(config.nvcc_flags)},
        extra_link_args=config.link_flags)
    distribution = Distribution({"name": name, "ext_modules": [extension],
                                 "cmdclass": {"build_ext": _settings.build_extension_class(config)}})
    command = distribution.get_command_obj("build_ext")
    command.build_lib = str(build_dir)
    command.build_temp = str(build_dir / "temp")
    command.ensure_finalized()
    # BuildExtension forces a rebuild, leaving "nothing changed" to ninja, but then relinks every
    # time; an import must not rewrite a library other processes may have loaded.
    command.force = False
    log = build_dir / "build.log"
    verbose = os.environ.get("SELFATTN_VERBOSE") == "1"
    try:
        with contextlib.nullcontext() if verbose else _output_to(log):
            distribution.run_command("build_ext")
    except Exception as error:  # the compiler's output is in the log
        output = "" if verbose else log.read_text(errors="replace")[-20000:]
        raise ImportError(f"selfattn: the JIT build of csrc/ failed ({error}):\n{output}") from error
    return command.get_ext_fullpath(name)


@contextlib.contextmanager
def _output_to(log: Path):
    """Sends this process's stdout and stderr, and its children's (ninja, the compiler), to log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "w") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


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


def build_info() -> BuildInfo:
    """The loaded build, with the copy of the CPU kernels in use now, what its bf16 GEMMs run on and
    the caches its forward blocks for."""
    info = load()
    ops = torch.ops.selfattn
    return dataclasses.replace(info, cpu_capability=ops._cpu_capability(), bf16_gemm=ops._bf16_tile_gemm(),
                               cpu_blocking=ops._cpu_blocking())
