"""Build settings (selfattn/_settings.py): where the CUDA toolkit and the CUDA library headers are
found, whether its CUDA matches torch's, the GPU archs, the sanitizer build, the torch floor. No
compiling: fake toolkits in tmp_path."""

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfattn import _settings

# Also run against the oldest supported torch (.ci/test_floor_torch.sh).
pytestmark = pytest.mark.floor


def fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


@pytest.fixture
def no_cuda_env(monkeypatch, tmp_path):
    """No CUDA_HOME, no nvcc on PATH, no toolkit in the default place."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(_settings, "DEFAULT_CUDA_HOME", str(tmp_path / "nowhere"))


def test_cuda_home_is_an_explicit_choice(no_cuda_env, monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert _settings.cuda_toolkit_root() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # not a toolkit: no guessing past it
    monkeypatch.setattr(_settings, "DEFAULT_CUDA_HOME", str(toolkit))
    assert _settings.cuda_toolkit_root() is None


def test_nvcc_on_path_is_followed_through_symlinks(no_cuda_env, monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-12.9")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert _settings.cuda_toolkit_root() == str(toolkit.resolve())


def test_nvcc_wrapper_outside_a_toolkit_is_asked_where_its_toolkit_is(no_cuda_env, monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "nvcc"  # prints what a real nvcc's dry run starts with
    wrapper.write_text(f'#!/bin/sh\necho "#\\$ _HERE_={toolkit}/bin" >&2\necho "#\\$ TOP={toolkit}/bin/.." >&2\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert _settings.cuda_toolkit_root() == str(toolkit.resolve())


def test_toolkit_with_headers_only_under_targets(no_cuda_env, monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "conda")
    (toolkit / "targets" / "x86_64-linux").mkdir(parents=True)
    (toolkit / "include").rename(toolkit / "targets" / "x86_64-linux" / "include")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert _settings.cuda_toolkit_root() == str(toolkit)


def test_default_toolkit_and_none(no_cuda_env, monkeypatch, tmp_path):
    assert _settings.cuda_toolkit_root() is None
    toolkit = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setattr(_settings, "DEFAULT_CUDA_HOME", str(toolkit))
    assert _settings.cuda_toolkit_root() == str(toolkit)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_this_machines_nvcc_names_its_toolkit():
    root = _settings.nvcc_toolkit_root(shutil.which("nvcc"))
    assert root is not None and _settings.is_cuda_toolkit(root), root


def nvidia_packages():
    return [d for d in importlib.metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia")]


@pytest.mark.skipif(torch.version.cuda is None or not nvidia_packages(),
                    reason="needs a CUDA build of torch with its nvidia-* pip packages")
def test_cuda_library_headers_come_from_the_pip_packages(tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda")  # without any library headers
    dirs = _settings.cuda_library_include_dirs(str(toolkit))
    for header in _settings.CUDA_LIBRARY_HEADERS:
        assert any((Path(d) / header).is_file() for d in dirs), (header, dirs)
    for header in _settings.CUDA_LIBRARY_HEADERS:  # a toolkit that has them needs nothing else
        (toolkit / "include" / header).write_text("")
    assert _settings.cuda_library_include_dirs(str(toolkit)) == []


def test_arch_list_defaults(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6 9.0+PTX")
    assert _settings.cuda_arch_list() == "8.6 9.0+PTX"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _settings.cuda_arch_list() == _settings.DEFAULT_CUDA_ARCHS
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 0)][i])
    assert _settings.cuda_arch_list() == "8.0;9.0+PTX"


def test_sanitizer_build_is_cpu_only_with_its_flags(monkeypatch):
    monkeypatch.setenv("SELFATTN_SANITIZE", "1")
    monkeypatch.delenv("SELFATTN_CUDA", raising=False)
    config = _settings.extension_config()
    assert not config.with_cuda and config.sanitize
    for flags in (config.cxx_flags, config.link_flags):
        assert "-fsanitize=address,undefined" in flags and "-fno-sanitize-recover=all" in flags
    assert config.build_info.endswith(",cuda:none,sanitize:address+undefined")
    assert config.variant.endswith("_sanitize")
    monkeypatch.setenv("SELFATTN_CUDA", "1")
    with pytest.raises(RuntimeError, match="CPU library only"):
        _settings.extension_config()


def test_cuda_build_records_its_archs(monkeypatch):
    monkeypatch.delenv("SELFATTN_SANITIZE", raising=False)
    if not _settings.want_cuda():
        pytest.skip("no CUDA build possible here")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME") or _settings.cuda_toolkit_root())
    config = _settings.extension_config()
    assert config.with_cuda and config.build_info.endswith(",archs:8.0/9.0")
    assert not any("sanitize" in flag for flag in config.cxx_flags)


def test_cpu_kernels_are_compiled_once_per_capability(monkeypatch):
    """The kernel sources get a copy per instruction set, in a namespace of its own; every other
    source is compiled once, for the x86-64 baseline. SELFATTN_CPU_CAPABILITY is a run-time choice
    now (tests/test_dispatch.py) and changes nothing in the build."""
    monkeypatch.delenv("SELFATTN_SANITIZE", raising=False)
    monkeypatch.setenv("SELFATTN_CUDA", "0")
    monkeypatch.setenv("SELFATTN_CPU_CAPABILITY", "default")
    config = _settings.extension_config()
    kernels = [str(_settings.CSRC / name) for name in _settings.CPU_KERNEL_SOURCES]
    dispatch = str(_settings.CSRC / "cpu" / "dispatch.cpp")
    blocking = str(_settings.CSRC / "cpu" / "blocking.cpp")
    # Every csrc/cpu source is a kernel file (listed, per copy), the dispatch or the cache model
    # (each once).
    assert sorted((_settings.CSRC / "cpu").glob("*.cpp")) == sorted(map(Path, kernels + [dispatch, blocking]))
    assert dispatch in config.sources and blocking in config.sources and not set(kernels) & set(config.sources)
    assert config.cpu_variant_sources == {c: kernels for c in config.cpu_capabilities}
    if platform.machine() == "x86_64":
        assert config.cpu_capabilities == ("DEFAULT", "AVX2", "AVX512")
        assert ",cpu:DEFAULT/AVX2/AVX512," in config.build_info
    assert not [f for f in config.cxx_flags if f.startswith("-m") or "CPU_CAPABILITY" in f]  # baseline
    for capability in config.cpu_capabilities:
        flags = _settings.CAPABILITY_FLAGS[capability]
        assert f"-DSELFATTN_CPU_NS=cpu_{capability.lower()}" in flags
        assert f"-DCPU_CAPABILITY={capability}" in flags  # at::vec's namespace and code for it
        assert f"-DSELFATTN_CPU_HAS_{capability}" in config.cxx_flags  # what dispatch.cpp may pick
    assert not [f for f in _settings.CAPABILITY_FLAGS["DEFAULT"] if f.startswith("-m")]
    assert "-mavx512f" in _settings.CAPABILITY_FLAGS["AVX512"] and "-mavx2" in _settings.CAPABILITY_FLAGS["AVX2"]


def versioned_toolkit(root: Path, release: str) -> Path:
    """A fake toolkit whose nvcc --version says `release` as a real one does."""
    toolkit = fake_toolkit(root)
    (toolkit / "bin" / "nvcc").write_text(
        f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.88"\n')
    return toolkit


@pytest.fixture
def toolkit_for(no_cuda_env, monkeypatch, tmp_path):
    """CUDA_HOME at a fake toolkit of a given CUDA version, beside a torch built with CUDA 12.4."""
    monkeypatch.delenv("SELFATTN_SANITIZE", raising=False)
    monkeypatch.delenv("SELFATTN_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")

    def make(release):
        toolkit = versioned_toolkit(tmp_path / f"cuda-{release}", release)
        monkeypatch.setenv("CUDA_HOME", str(toolkit))
        return toolkit

    return make


def test_toolkit_version_is_read_from_nvcc(tmp_path):
    assert _settings.toolkit_cuda_version(versioned_toolkit(tmp_path / "cuda", "13.0")) == "13.0"
    assert _settings.toolkit_cuda_version(fake_toolkit(tmp_path / "silent")) is None  # nvcc says nothing


def test_toolkit_of_another_major_version_gives_a_cpu_only_build_in_one_sentence(toolkit_for, monkeypatch, capsys):
    toolkit = toolkit_for("13.0")
    assert _settings.want_cuda() is False
    message = capsys.readouterr().err.strip()
    assert message == (f"selfattn: building the CPU kernels only: the CUDA toolkit at {toolkit} is CUDA 13.0, "
                       "not the CUDA 12.x torch 2.6.0+cu124 was built with (12.4); set CUDA_HOME to a CUDA 12.x "
                       "toolkit to build the CUDA kernels.")
    assert not _settings.extension_config().with_cuda
    monkeypatch.setenv("SELFATTN_CUDA", "1")  # the same words, as an error
    with pytest.raises(RuntimeError) as error:
        _settings.want_cuda()
    assert str(error.value) == "SELFATTN_CUDA=1, but " + message.split("only: ", 1)[1]


def test_toolkit_of_another_minor_version_builds_cuda(toolkit_for, capsys):
    toolkit_for("12.8")  # torch itself only warns, and builds
    assert _settings.want_cuda() is True
    assert capsys.readouterr().err == ""


def test_cpu_only_torch_with_a_toolkit_builds_cpu_only_in_silence(toolkit_for, monkeypatch, capsys):
    toolkit_for("13.0")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _settings.want_cuda() is False
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SELFATTN_CUDA", "1")
    with pytest.raises(RuntimeError, match="needs a CUDA build of torch"):
        _settings.want_cuda()


def test_torch_older_than_the_floor_is_refused_in_one_sentence():
    floor = ".".join(map(str, _settings.TORCH_FLOOR))
    with pytest.raises(RuntimeError) as error:
        _settings.check_torch_supported("2.5.1+cu124")
    assert str(error.value) == (f"selfattn supports torch {floor} or newer, but torch 2.5.1+cu124 is installed; "
                                f"upgrade it with `pip install 'torch>={floor}'` and build again.")
    for version in (f"{floor}.0", f"{floor}.0a0+git1234", "2.14.1+cu130", "3.0.0", torch.__version__):
        _settings.check_torch_supported(version)


def test_setup_py_refuses_an_old_torch_before_compiling(tmp_path):
    """setup.py stops at its first step, with that one sentence (torch's version faked: no build
    of an old torch is installed here)."""
    fake = tmp_path / "sitecustomize.py"  # runs before setup.py: makes torch look like 2.5.1
    fake.write_text("import torch\ntorch.__version__ = '2.5.1'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SELFATTN_CUDA": "0"}
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=_settings.SOURCE_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("selfattn supports torch 2.6 or newer, but torch 2.5.1 ")
    assert "building" not in result.stdout


def test_a_newer_library_counts_as_up_to_date(tmp_path):
    """The build's own test of whether to compile the CPU kernels' copies (setuptools.modified's
    newer_group, which older setuptools lack)."""
    source, library = tmp_path / "a.cpp", tmp_path / "lib.so"
    source.write_text("")
    assert _settings.any_newer([str(source)], str(library))  # no library yet
    library.write_text("")
    os.utime(source, (1000, 1000))
    os.utime(library, (2000, 2000))
    assert not _settings.any_newer([str(source)], str(library))
    assert _settings.any_newer([str(source), str(tmp_path / "gone.h")], str(library))  # missing: newer
    os.utime(source, (3000, 3000))
    assert _settings.any_newer([str(source)], str(library))
