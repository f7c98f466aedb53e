"""Which build the tests run against, and how the loader reports the builds it cannot use. All but
the JIT build's test (minutes of compiling) also run against the oldest supported torch
(`floor`: .ci/test_floor_torch.sh)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from selfattn import _load, _settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.floor
def test_build_under_test_is_the_expected_one():
    info = selfattn.build_info()
    assert info.kind in ("compiled", "jit")
    assert info.torch == torch.__version__
    assert Path(info.path).exists()
    # CI installs with the README's command and sets this, so the tests cannot silently run
    # against a different build (a JIT build from csrc/, say) than the one users get.
    expected = os.environ.get("SELFATTN_EXPECT_BUILD")
    if expected:
        assert info.kind == expected, f"tests ran against the {info.kind} build, expected {expected}: {info}"
    expected_cuda = os.environ.get("SELFATTN_EXPECT_CUDA")
    if expected_cuda:
        assert (info.cuda is not None) == (expected_cuda == "1"), f"CUDA in the build: {info.cuda}"


@pytest.mark.floor
def test_library_built_for_another_torch_is_reported_in_words(tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF junk " + _load.BUILD_MARKER + b"torch:1.0.0,cpu:DEFAULT/AVX2,cuda:none\0 more")
    info = _load.read_build_info(str(fake), "compiled")
    assert (info.torch, info.cpu_capabilities, info.cuda) == ("1.0.0", ("DEFAULT", "AVX2"), None)
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0.*pip install --no-build-isolation"):
        _load._check_compatible(info)


@pytest.mark.floor
def test_build_info_says_which_gpu_architectures_were_compiled(tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(_load.BUILD_MARKER + b"torch:2.9.0,cpu:DEFAULT/AVX2/AVX512,cuda:13.0,archs:8.0/9.0+PTX\0")
    info = _load.read_build_info(str(fake), "compiled")
    assert (info.cuda, info.cuda_archs, info.sanitize) == ("13.0", "8.0/9.0+PTX", None)
    assert str(info).endswith(f"CUDA 13.0 kernels compiled for sm_80, sm_90+PTX: {fake}")
    cpu = _load.BuildInfo("jit", "x.so", "2.9.0", ("DEFAULT",), None, sanitize="address+undefined")
    assert "CPU kernels DEFAULT, sanitizers address+undefined, no CUDA" in str(cpu)


@pytest.mark.floor
def test_build_info_says_why_a_cuda_torch_got_no_cuda(tmp_path):
    """pip hides setup.py's output: a build that left CUDA out for a mismatched toolkit says so here."""
    fake = tmp_path / "_C.so"
    fake.write_bytes(_load.BUILD_MARKER + b"torch:2.6.0+cu124,cpu:DEFAULT,cuda:none,cuda_toolkit_mismatch:13.0/12.4\0")
    info = _load.read_build_info(str(fake), "compiled")
    assert (info.cuda, info.cuda_toolkit_mismatch) == (None, "13.0/12.4")
    assert str(info).endswith("no CUDA (the CUDA toolkit found is CUDA 13.0, torch's CUDA is 12.4: rebuild with "
                              f"CUDA_HOME at a CUDA 12.x toolkit for the CUDA kernels): {fake}")


@pytest.mark.floor
def test_build_info_says_which_cpu_kernels_run():
    """Every x86-64 build holds the three copies and runs one (tests/test_dispatch.py: which)."""
    info = selfattn.build_info()
    assert info.cpu_capabilities == _settings.compiled_cpu_capabilities()
    assert info.cpu_capability in info.cpu_capabilities
    assert f"CPU kernels {'/'.join(info.cpu_capabilities)} (running {info.cpu_capability})" in str(info)
    _load._check_compatible(info)  # no CPU is refused: the copy is chosen at run time


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=1800)


@pytest.mark.floor
def test_a_second_build_in_one_process_is_refused():
    result = run_python("import selfattn\nfrom selfattn import _load\n_load._loaded = None\n_load.load()")
    assert result.returncode != 0 and "already registered" in result.stderr


@pytest.mark.floor
def test_missing_compiler_is_reported_in_words(tmp_path):
    result = run_python("import selfattn", SELFATTN_JIT="1", SELFATTN_JIT_CACHE=str(tmp_path),
                        CXX="no-such-compiler")
    assert result.returncode != 0
    assert "needs a C++ compiler, but 'no-such-compiler' is not on PATH" in result.stderr


JIT_CHECK = """
import torch, selfattn
torch.manual_seed(0)
worst = 0.0
ran = []
for capability in selfattn.build_info().cpu_capabilities:
    try:
        torch.ops.selfattn._cpu_capability(capability)
    except RuntimeError:  # this CPU cannot run it
        continue
    ran.append(capability)
    for dtype, shape, causal in [(torch.float32, (2, 3, 70, 70, 64, 64), False),
                                 (torch.float32, (1, 2, 130, 77, 33, 7), True),
                                 (torch.bfloat16, (2, 2, 65, 65, 64, 64), True),
                                 (torch.float64, (1, 1, 1, 5, 3, 3), False)]:
        b, h, nq, nk, d, dv = shape
        q, k, v = (torch.randn(b, h, n, e, dtype=dtype, requires_grad=True) for n, e in ((nq, d), (nk, d), (nk, dv)))
        g = torch.randn(b, h, nq, dv, dtype=dtype)
        out = selfattn.attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), g)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        tol = 0.05 if dtype == torch.bfloat16 else 1e-4
        for a, e in zip((out,) + grads, (ref,) + ref_grads):
            worst = max(worst, float((a.double() - e).abs().max()) / tol)
print(selfattn.build_info().kind, "/".join(ran), worst)
"""


def test_jit_build_from_csrc(tmp_path):
    """SELFATTN_JIT=1 compiles csrc/ with ninja into a cache and uses it: the same build as
    setup.py's (one library, a copy of the CPU kernels per instruction set), each copy this CPU
    can run checked against float64. CPU sources only, to keep it to a few minutes."""
    env = dict(SELFATTN_JIT="1", SELFATTN_JIT_CACHE=str(tmp_path), SELFATTN_CUDA="0", MAX_JOBS="2")
    result = run_python(JIT_CHECK, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    kind, ran, worst = result.stdout.split()
    assert kind == "jit" and ran.startswith("DEFAULT"), ran
    assert float(worst) < 1.0, f"error {worst} x tolerance"
    assert "JIT-building csrc/" in result.stderr  # it says what it is doing
    library = next(tmp_path.glob("*/selfattn_jit_*.so"))
    built = library.stat().st_mtime_ns
    # The second import reuses the cache: nothing compiled or linked again.
    again = run_python(JIT_CHECK, **env)
    assert again.returncode == 0 and again.stdout.split()[:2] == ["jit", ran]
    assert library.stat().st_mtime_ns == built


@pytest.mark.floor
def test_demo_runs():
    result = subprocess.run([sys.executable, "-m", "selfattn", "--no-timing"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1.0491,  2.0474,  4.9491" in result.stdout
