"""Which build the tests run against, and how the loader reports the builds it cannot use."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from selfattn import _load, _settings

ROOT = Path(__file__).resolve().parent.parent


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


def test_library_built_for_another_torch_is_reported_in_words(tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF junk " + _load.BUILD_MARKER + b"torch:1.0.0,cpu:AVX2,cuda:none\0 more")
    info = _load.read_build_info(str(fake), "compiled")
    assert (info.torch, info.cpu_capability, info.cuda) == ("1.0.0", "AVX2", None)
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0.*pip install --no-build-isolation"):
        _load._check_compatible(info)


def test_build_info_says_how_far_the_cuda_kernels_are_tested(tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(_load.BUILD_MARKER + b"torch:2.9.0,cpu:AVX2,cuda:13.0,archs:8.0/9.0+PTX\0")
    info = _load.read_build_info(str(fake), "compiled")
    assert (info.cuda, info.cuda_archs, info.sanitize) == ("13.0", "8.0/9.0+PTX", None)
    assert ("CUDA 13.0 kernels compiled for sm_80, sm_90+PTX, tested in the CPU emulation; "
            "not yet run on a GPU") in str(info)
    cpu = _load.BuildInfo("jit", "x.so", "2.9.0", "AVX2", None, sanitize="address+undefined")
    assert "sanitizers address+undefined, no CUDA" in str(cpu)


def test_library_built_for_a_missing_instruction_set_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(_settings, "host_cpu_capability", lambda: "AVX2")
    info = _load.BuildInfo("compiled", "x.so", torch.__version__, "AVX512", None)
    with pytest.raises(ImportError, match="AVX512 instructions, which this CPU lacks"):
        _load._check_compatible(info)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=900)


def test_a_second_build_in_one_process_is_refused():
    result = run_python("import selfattn\nfrom selfattn import _load\n_load._loaded = None\n_load.load()")
    assert result.returncode != 0 and "already registered" in result.stderr


def test_missing_compiler_is_reported_in_words(tmp_path):
    result = run_python("import selfattn", SELFATTN_JIT="1", SELFATTN_JIT_CACHE=str(tmp_path),
                        CXX="no-such-compiler")
    assert result.returncode != 0
    assert "needs a C++ compiler, but 'no-such-compiler' is not on PATH" in result.stderr


JIT_CHECK = """
import torch, selfattn
torch.manual_seed(0)
worst = 0.0
for dtype, shape, causal in [(torch.float32, (2, 3, 70, 70, 64, 64), False), (torch.float32, (1, 2, 130, 77, 33, 7), True),
                             (torch.bfloat16, (2, 2, 65, 65, 64, 64), True), (torch.float64, (1, 1, 1, 5, 3, 3), False)]:
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
info = selfattn.build_info()
print(info.kind, info.cpu_capability, worst)
"""


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_jit_build_from_csrc(tmp_path, capability):
    """SELFATTN_JIT=1 compiles csrc/ with ninja into a cache and uses it. Built here for the
    instruction sets other machines fall back to (AVX2, and none), so their kernels are checked
    against float64 too. CPU sources only, to keep it to a minute or two each."""
    if capability == "AVX2" and _settings.host_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU cannot run AVX2 code")
    env = dict(SELFATTN_JIT="1", SELFATTN_JIT_CACHE=str(tmp_path), SELFATTN_CUDA="0", MAX_JOBS="2",
               SELFATTN_CPU_CAPABILITY=capability)
    result = run_python(JIT_CHECK, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    kind, built_for, worst = result.stdout.split()
    assert (kind, built_for) == ("jit", capability)
    assert float(worst) < 1.0, f"error {worst} x tolerance"
    assert "JIT-building csrc/" in result.stderr  # it says what it is doing
    # The second import reuses the cache.
    again = run_python(JIT_CHECK, **env)
    assert again.returncode == 0 and again.stdout.split()[:2] == ["jit", capability]


def test_demo_runs():
    result = subprocess.run([sys.executable, "-m", "selfattn", "--no-timing"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1.0491,  2.0474,  4.9491" in result.stdout
