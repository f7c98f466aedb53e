"""Builds selfattn._C, the C++ (and, where a CUDA toolkit is present, CUDA) library.

    pip install --no-build-isolation .      # compiles against the torch already installed

Sources and flags come from selfattn/_settings.py, which the JIT build uses too. A torch older
than _settings.TORCH_FLOOR is refused before anything is compiled. Environment: MAX_JOBS (parallel
compile jobs), SELFATTN_CUDA=0|1 (force the CUDA sources off or on; unset, a CUDA toolkit of another
major version than torch's CUDA gives a CPU-only build, said in one line), CUDA_HOME (the CUDA
toolkit; default: found as torch finds it), TORCH_CUDA_ARCH_LIST (GPU archs; default the visible
GPUs', else 8.0;9.0), SELFATTN_SANITIZE=1 (CPU only, ASan and UBSan). The CPU kernels are compiled
for every x86-64 instruction set they have code for (DEFAULT, AVX2, AVX512); the one to run is
chosen at run time (csrc/cpu/dispatch.cpp).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# Execute selfattn/_settings.py on its own: the package cannot be imported before it is built.
_spec = importlib.util.spec_from_file_location("selfattn_settings", ROOT / "selfattn" / "_settings.py")
_settings = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _settings  # dataclasses look their module up there
_spec.loader.exec_module(_settings)

_compiler = os.environ.get("CXX", "c++")
if shutil.which(_compiler) is None:
    sys.exit(f"selfattn: building the extension needs a C++ compiler, but {_compiler!r} is not on PATH "
             "(install g++, or point CXX at one).")

# Refuses a torch older than the floor and a SELFATTN_CUDA=1 that cannot be met, before anything
# is compiled; settles CUDA_HOME and TORCH_CUDA_ARCH_LIST before cpp_extension reads them.
try:
    config = _settings.extension_config()
except RuntimeError as error:
    message = str(error)
    sys.exit(message if message.startswith("selfattn") else f"selfattn: {message}")

from torch.utils.cpp_extension import CppExtension, CUDAExtension  # noqa: E402

Extension = CUDAExtension if config.with_cuda else CppExtension


class BuildExt(_settings.build_extension_class(config)):
    """Keeps object files in build/ across pip runs, so that rebuilding recompiles only what
    changed (pip hands each editable install a fresh temporary folder otherwise)."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"{sys.implementation.cache_tag}-torch{_settings.torch_version_tag()}"
        kind = ("cuda" if config.with_cuda else "cpu") + ("-sanitize" if config.sanitize else "")
        self.build_temp = str(ROOT / "build" / f"temp-{tag}-{kind}")


print(f"selfattn: building {'C++ and CUDA' if config.with_cuda else 'C++ (no CUDA)'} sources, "
      f"CPU kernels for {', '.join(config.cpu_capabilities)}"
      + (f", CUDA toolkit {os.environ['CUDA_HOME']}, GPU archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
         if config.with_cuda else "")
      + (", with ASan and UBSan" if config.sanitize else ""))

setup(
    packages=find_packages(include=["selfattn", "selfattn.*"]),
    ext_modules=[
        Extension(
            "selfattn._C",
            sources=[os.path.relpath(src, ROOT) for src in config.sources],
            include_dirs=config.include_dirs,
            depends=[os.path.relpath(path, ROOT) for path in _settings.extension_depends()],
            extra_compile_args={"cxx": config.cxx_flags, "nvcc": config.nvcc_flags},
            extra_link_args=config.link_flags,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
