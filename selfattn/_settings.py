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
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent  # the checkout, when running from one
CSRC = SOURCE_ROOT / "csrc"

# The CPU kernel sources, compiled once per CPU capability (each copy in a namespace of its own,
# csrc/cpu/capability.h); csrc/cpu/dispatch.cpp picks one at run time. Every other source is
# compiled once, for the x86-64 baseline. Listed by name, not globbed: a new kernel file is added
# here and to the table in csrc/cpu/kernels.h.
CPU_KERNEL_SOURCES = (
    "cpu/attention_fwd.cpp", "cpu/attention_bwd.cpp", "cpu/attention_jvp.cpp", "cpu/attention_decode.cpp",
)

CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
# Flags under which at::vec uses the instruction set's own code; without them it runs its
# scalar fallback (measured ~10x slower for exp). Same sets as PyTorch's own kernels use, plus
# the namespace the copy lives in.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-DSELFATTN_CPU_NS=cpu_avx512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
             "-DSELFATTN_CPU_NS=cpu_avx2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DSELFATTN_CPU_NS=cpu_default"],
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


# The oldest torch release the C++ sources compile against and the Python side runs on; CI builds
# and tests both ends (.ci/test_floor_torch.sh: this one; .ci/run: the newest). Kept equal to
# the torch floor in requirements.txt and pyproject.toml.
TORCH_FLOOR = (2, 6)


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string: "2.6.0+cu124" -> (2, 6)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise RuntimeError(f"selfattn: cannot read a release from torch's version {version!r}.")
    return int(found.group(1)), int(found.group(2))


def check_torch_supported(version: str | None = None) -> None:
    """Refuses, in one sentence, a torch older than TORCH_FLOOR: before anything is compiled
    (setup.py and the JIT build call this first)."""
    version = version or torch.__version__
    if torch_release(version) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise RuntimeError(f"selfattn supports torch {floor} or newer, but torch {version} is installed; "
                           f"upgrade it with `pip install 'torch>={floor}'` and build again.")


# ---------------------------------------------------------------------------------------------
# CPU


def compiled_cpu_capabilities() -> tuple[str, ...]:
    """The CPU variants one build holds: all three on x86-64 (the one that runs is chosen at run
    time, csrc/cpu/dispatch.cpp), the portable one elsewhere."""
    return CAPABILITIES if platform.machine().lower() in ("x86_64", "amd64") else ("DEFAULT",)


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


def toolkit_cuda_version(root: str | Path) -> str | None:
    """The CUDA version of a toolkit ("13.0"), read as torch reads it: from `nvcc --version`."""
    try:
        result = subprocess.run([str(Path(root) / "bin" / "nvcc"), "--version"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", result.stdout)
    return found.group(1) if found else None


def cuda_mismatch(toolkit: str, version: str | None) -> str | None:
    """Why a toolkit of that CUDA version cannot build against this torch's CUDA, in words, or None
    when it can.

    Judged as torch.utils.cpp_extension judges (and would refuse the build with a message
    that names neither selfattn nor a way out): another major version is a mismatch; another minor
    version only gets torch's warning, and builds. A toolkit whose version nvcc does not say is
    left to torch's own check."""
    if version is None or torch.version.cuda is None:
        return None
    torch_major = torch.version.cuda.split(".")[0]
    if version.split(".")[0] == torch_major:
        return None
    return (f"the CUDA toolkit at {toolkit} is CUDA {version}, not the CUDA {torch_major}.x torch {torch.__version__} "
            f"was built with ({torch.version.cuda}); set CUDA_HOME to a CUDA {torch_major}.x toolkit to build the "
            "CUDA kernels")


def cuda_choice() -> tuple[bool, str | None]:
    """Whether to build the CUDA sources, and the CUDA version of a toolkit passed over for not
    matching torch's (None if none was).

    CUDA is built when torch is a CUDA build and a CUDA toolkit of the same major version is present
    (no GPU needed); a toolkit of another major version gives a CPU-only build, said in one line.
    SELFATTN_CUDA=0 or 1 forces the choice (1 makes a mismatch an error). Sanitizer builds are CPU
    only."""
    forced = os.environ.get("SELFATTN_CUDA")
    if forced == "1" and want_sanitize():
        raise RuntimeError("SELFATTN_SANITIZE=1 builds the CPU library only; unset SELFATTN_CUDA=1")
    if forced == "0" or want_sanitize():
        return False, None
    has_sources = bool(glob.glob(str(CSRC / "cuda" / "*.cu")))
    toolkit = cuda_toolkit_root()
    possible = torch.version.cuda is not None and has_sources and toolkit is not None
    if forced == "1" and not possible:
        explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        where = (f"CUDA_HOME={explicit} lacks bin/nvcc or cuda_runtime.h" if explicit else
                 f"none on PATH or in {DEFAULT_CUDA_HOME}; set CUDA_HOME")
        raise RuntimeError(
            "SELFATTN_CUDA=1, but a CUDA build needs a CUDA build of torch "
            f"(this one: {torch.__version__}), a CUDA toolkit ({where}), and csrc/cuda/*.cu")
    if not possible:
        return False, None
    version = toolkit_cuda_version(toolkit)
    mismatch = cuda_mismatch(toolkit, version)
    if mismatch is None:
        return True, None
    if forced == "1":
        raise RuntimeError(f"SELFATTN_CUDA=1, but {mismatch}.")
    print(f"selfattn: building the CPU kernels only: {mismatch}.", file=sys.stderr, flush=True)
    return False, version


def want_cuda() -> bool:
    """Whether to build the CUDA sources (cuda_choice)."""
    return cuda_choice()[0]


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
    sources: list[str]  # compiled once, with cxx_flags (and nvcc_flags)
    # capability -> the CPU kernel sources, compiled once more per capability with cxx_flags +
    # CAPABILITY_FLAGS[capability], in CAPABILITIES order (the link order: see BuildExtension)
    cpu_variant_sources: dict[str, list[str]]
    cxx_flags: list[str]
    nvcc_flags: list[str]
    link_flags: list[str]
    include_dirs: list[str]
    with_cuda: bool
    sanitize: bool
    cpu_capabilities: tuple[str, ...]
    build_info: str

    @property
    def variant(self) -> str:
        """What sets builds apart beyond the torch version: names their JIT build folders."""
        return "cpu" + ("_cuda" if self.with_cuda else "") + ("_sanitize" if self.sanitize else "")


def extension_config() -> ExtensionConfig:
    """Sources and flags of the C++ library, for setup.py and the JIT build alike. Sets CUDA_HOME
    and TORCH_CUDA_ARCH_LIST for torch.utils.cpp_extension when they are unset."""
    check_torch_supported()
    with_cuda, passed_over = cuda_choice()
    sanitize = want_sanitize()
    capabilities = compiled_cpu_capabilities()
    include_dirs = []
    # Passed unquoted through the shell and stringized in selfattn.cpp: no quotes, spaces or ';'.
    info = (f"torch:{torch.__version__},cpu:{'/'.join(capabilities)},"
            f"cuda:{torch.version.cuda if with_cuda else 'none'}")
    if passed_over:  # selfattn.build_info() says why there is no CUDA (pip hides setup.py's output)
        info += f",cuda_toolkit_mismatch:{passed_over}/{torch.version.cuda}"
    if with_cuda:
        toolkit = cuda_toolkit_root()
        os.environ.setdefault("CUDA_HOME", toolkit)
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        include_dirs = cuda_library_include_dirs(toolkit)
        info += ",archs:" + re.sub(r"[;\s]+", "/", os.environ["TORCH_CUDA_ARCH_LIST"])
    if sanitize:
        info += ",sanitize:address+undefined"
    kernel_sources = [str(CSRC / name) for name in CPU_KERNEL_SOURCES]
    sources = [src for src in sorted(glob.glob(str(CSRC / "*.cpp"))) + sorted(glob.glob(str(CSRC / "cpu" / "*.cpp")))
               if src not in kernel_sources]
    if with_cuda:  # the kernels (.cu) and their host side (.cpp: tensors, dispatch)
        sources += sorted(glob.glob(str(CSRC / "cuda" / "*.cu"))) + sorted(glob.glob(str(CSRC / "cuda" / "*.cpp")))
    cuda_define = ["-DSELFATTN_WITH_CUDA"] if with_cuda else []
    # Which kernel variants dispatch.cpp may pick (DEFAULT always exists).
    variant_defines = [f"-DSELFATTN_CPU_HAS_{c}" for c in capabilities]
    sanitize_flags = SANITIZE_FLAGS if sanitize else []
    # -g0: no debug info (Python's own CFLAGS carry -g), which took a quarter of each C++ compile
    # (22.4 -> 17.3 s for a kernel copy, 30.6 -> 21.8 s for python_module.cpp) and made the objects
    # 20x larger. The sanitizer build keeps -g (its SANITIZE_FLAGS come after) for its reports.
    cxx = (["-O3", "-g0", "-fopenmp", f"-DSELFATTN_BUILD_INFO={info}"] + variant_defines + cuda_define
           + sanitize_flags)
    # No -std here: torch's cpp_extension adds the standard its headers need (C++20 from torch
    # 2.10 on), and only when no -std is given; a fixed -std=c++17 breaks those headers.
    # No SELFATTN_BUILD_INFO either (only selfattn.cpp reads it): nvcc splits -D values at
    # commas, and its "cuda:13.0" piece would define a macro `cuda` that breaks thrust's headers.
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + cuda_define
    return ExtensionConfig(
        sources=sources,
        cpu_variant_sources={c: kernel_sources for c in capabilities},
        cxx_flags=cxx,
        nvcc_flags=nvcc,
        # at::parallel_for runs on one thread, silently, without OpenMP.
        link_flags=["-fopenmp"] + sanitize_flags,
        include_dirs=include_dirs,
        with_cuda=with_cuda,
        sanitize=sanitize,
        cpu_capabilities=capabilities,
        build_info=info,
    )


# ---------------------------------------------------------------------------------------------
# Building


def build_extension_class(config: ExtensionConfig):
    """torch's BuildExtension, plus the CPU kernel sources compiled once per capability.

    setuptools compiles an extension's sources with one set of flags; the variants are compiled
    here, each into a folder of its own (same file names, other flags), through the same
    ninja-driven compiler, and linked after the extension's own objects. The link order matters:
    an inline function of a header (ATen, c10, the standard library) that the linker does not
    inline is emitted by every object using it, and the linker keeps the first copy. Baseline
    objects first, then DEFAULT, AVX2, AVX512, so code outside the kernels never runs an
    instruction this CPU may lack (tests/test_dispatch.py checks the library's instructions).
    Imports torch.utils.cpp_extension: call after extension_config().
    """
    from torch.utils.cpp_extension import BuildExtension

    class SelfattnBuildExtension(BuildExtension):
        def build_extension(self, ext):
            library = self.get_ext_fullpath(ext.name)
            if self.force or any_newer(list(ext.sources) + list(ext.depends), library):
                ext.extra_objects = []
                for capability, sources in config.cpu_variant_sources.items():
                    flags = dict(ext.extra_compile_args)  # with what BuildExtension added by now
                    flags["cxx"] = flags["cxx"] + CAPABILITY_FLAGS[capability]
                    ext.extra_objects += self.compiler.compile(
                        [_relative_to_cwd(src) for src in sources], output_dir=os.path.join(self.build_temp, "cpu_" + capability.lower()),
                        include_dirs=ext.include_dirs, extra_postargs=flags, depends=ext.depends)
            super().build_extension(ext)  # compiles ext.sources, links them + extra_objects

    return SelfattnBuildExtension


def any_newer(inputs: list[str], target: str) -> bool:
    """Whether target is missing or older than one of inputs (a missing input counts as newer):
    setuptools.modified.newer_group(inputs, target, "newer"), done here because that module
    came with setuptools 69 and the build supports older ones."""
    try:
        built = os.stat(target).st_mtime
    except FileNotFoundError:
        return True
    for path in inputs:
        try:
            if os.stat(path).st_mtime > built:
                return True
        except FileNotFoundError:
            return True
    return False


def _relative_to_cwd(path: str) -> str:
    """A source path as setuptools prefers it (the object file's path follows it): relative to
    the folder the build runs in, when inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def extension_depends() -> list[str]:
    """Every file a build reads besides the sources it compiles: a change rebuilds the library."""
    kernels = [str(CSRC / name) for name in CPU_KERNEL_SOURCES]
    headers = [p for pattern in ("**/*.h", "**/*.cuh") for p in glob.glob(str(CSRC / pattern), recursive=True)]
    return kernels + sorted(headers)
