"""bfloat16 on the CPU kernels' native path (AVX512-BF16 tile GEMMs, csrc/cpu/tile_bf16.h) and on
the float32 path it replaces (SELFATTN_BF16_KERNELS=0), against the float64 oracle of
tests/test_masks.py (dense masks built in the test) with eager bfloat16 as the yardstick: the band
(causal, bottom-right, windows), tensor masks, grouped-query attention, Nq != Nk, head dims that
are odd or not a multiple of the vector width, strided layouts; forward and backward. Sizes cover
odd key and query counts (the bf16 GEMMs run over pairs) and several 64-wide blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from tests.common import make_tensor
from tests.test_masks import check_against_oracle, inputs, make_mask

BF16 = torch.bfloat16


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists this CPU flag (avx512_bf16, amx_bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


NATIVE_REASON = "this CPU has no AVX512-BF16 (or the library is not the AVX-512 build): only the float32 path runs"
native_available = cpu_has("avx512_bf16") and "AVX512" in str(selfattn.build_info())


# The native paths' tile GEMMs: selfattn's own AVX512-BF16 micro-kernel, or oneDNN's brgemm (the
# default where the CPU has AMX, which it then runs on; elsewhere oneDNN's AVX512-BF16 code).
GEMM_OF_PATH = {"native": "avx512bf16", "brgemm": "brgemm"}


@pytest.fixture(params=["native", "brgemm", "float32"])
def bf16_path(request, monkeypatch):
    """Runs a test on each bf16 path; the native ones are skipped where the CPU cannot run them."""
    if request.param in GEMM_OF_PATH:
        if not native_available:
            pytest.skip(NATIVE_REASON)
        monkeypatch.delenv("SELFATTN_BF16_KERNELS", raising=False)
        monkeypatch.setenv("SELFATTN_BF16_GEMM", GEMM_OF_PATH[request.param])
    else:
        monkeypatch.setenv("SELFATTN_BF16_KERNELS", "0")
    return request.param


@pytest.mark.parametrize("nq,nk", [(70, 131), (131, 70), (128, 128), (1, 200), (257, 3)])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), ("bottom_right", None), (True, (40, -1)),
                                           (False, (7, 9))], ids=str)
def test_band(bf16_path, causal, window, nq, nk):
    check_against_oracle(*inputs(2, 2, 2, nq, nk, 64, BF16), causal=causal, window=window, scale=0.125)


# Head dims: odd (a zero pads the last pair), not a multiple of 16 (padded GEMM rows), D != Dv.
@pytest.mark.parametrize("dim,dim_v", [(33, 33), (80, 80), (24, 40), (7, 64), (128, 128)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=str)
def test_head_dims(bf16_path, dim, dim_v, causal):
    check_against_oracle(*inputs(1, 2, 2, 97, 150, dim, BF16, dv=dim_v), causal=causal, scale=dim ** -0.5)


@pytest.mark.parametrize("kind", ["bool full", "float full", "key padding", "float -inf blocks", "expanded"])
def test_tensor_masks(bf16_path, kind):
    q, k, v = inputs(2, 2, 2, 75, 140, 64, BF16)
    check_against_oracle(q, k, v, attn_mask=make_mask(kind, 2, 2, 75, 140, BF16), causal=True)


@pytest.mark.parametrize("hq,hk", [(4, 2), (8, 1)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=str)
def test_gqa(bf16_path, hq, hk, causal):
    q, k, v = inputs(2, hq, hk, 70, 200, 64, BF16)
    check_against_oracle(q, k, v, causal=causal, attn_mask=make_mask("key padding", 2, hq, 70, 200, BF16))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_last"])
def test_layouts(bf16_path, layout):
    """Rows read in place (contiguous head dim) and copied (strided head dim)."""
    q, k, v = (make_tensor((2, 3, n, 64), BF16, layout=layout) for n in (90, 130, 130))
    check_against_oracle(q, k, v, causal=True)


def test_long_sequences_split_backward(bf16_path):
    """More key blocks than threads split the backward over work items; many query blocks."""
    check_against_oracle(*inputs(1, 1, 1, 600, 700, 64, BF16), causal="bottom_right")


def test_native_path_runs_and_agrees(monkeypatch):
    """The native kernels do run (their roundings differ from the float32 path's) and agree with
    the float32 path to bfloat16 precision; every output element is written."""
    if not native_available:
        pytest.skip(NATIVE_REASON)
    q, k, v = inputs(2, 4, 4, 150, 150, 64, BF16)
    grad_out = torch.randn(2, 4, 150, 64, dtype=BF16)
    results = {}
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # new memory is NaN-filled: an unwritten element shows
    try:
        for path in ("1", "0"):
            monkeypatch.setenv("SELFATTN_BF16_KERNELS", path)
            out, lse = torch.ops.selfattn.attention_fwd(q, k, v, True, 0.125)
            grads = torch.ops.selfattn.attention_bwd(grad_out, q, k, v, out, lse, True, 0.125)
            results[path] = (out, lse, *grads)
    finally:
        torch.use_deterministic_algorithms(previous)
    for native, widened in zip(results["1"], results["0"]):
        assert not native.isnan().any()
        assert not torch.equal(native, widened)
        torch.testing.assert_close(native.float(), widened.float(), atol=0.06, rtol=0.05)


def test_overlapping_rows(bf16_path):
    """k and v rows that overlap in memory (row stride 8 < D): read in place by the micro-kernel;
    brgemm gets copies (a row stride below the depth is outside oneDNN's stated contract, though
    its AVX512-BF16 code here reads it correctly)."""
    q = make_tensor((1, 2, 70, 64), BF16)
    k, v = (torch.randn(4400, dtype=BF16).as_strided((1, 2, 130, 64), (2200, 1100, 8, 1)) for _ in range(2))
    check_against_oracle(q, k, v, causal=True)


def test_tile_gemm_choice_is_reported(monkeypatch):
    """build_info() names the bf16 tile GEMMs the kernels run on: brgemm by default where the CPU
    has AMX-BF16 (oneDNN drives AMX), the micro-kernel elsewhere; the settings choose, and a
    setting that names neither is refused in words."""
    ops = torch.ops.selfattn
    monkeypatch.setenv("SELFATTN_BF16_KERNELS", "0")
    assert ops._bf16_tile_gemm() == "float32"
    monkeypatch.delenv("SELFATTN_BF16_KERNELS")
    if not native_available:
        pytest.skip(NATIVE_REASON)
    amx = cpu_has("amx_bf16")
    brgemm = "onednn-brgemm (AMX)" if amx else "onednn-brgemm (AVX512-BF16)"
    monkeypatch.delenv("SELFATTN_BF16_GEMM", raising=False)
    assert ops._bf16_tile_gemm() == (brgemm if amx else "avx512bf16")
    assert f"bf16 tile GEMMs {ops._bf16_tile_gemm()}," in str(selfattn.build_info())
    for setting, expected in [("brgemm", brgemm), ("avx512bf16", "avx512bf16")]:
        monkeypatch.setenv("SELFATTN_BF16_GEMM", setting)
        assert ops._bf16_tile_gemm() == expected
    monkeypatch.setenv("SELFATTN_BF16_GEMM", "amx")
    q, k, v = inputs(1, 1, 1, 100, 100, 64, BF16)  # the tiled path (few queries would decode)
    with pytest.raises(RuntimeError, match="SELFATTN_BF16_GEMM: expected 'brgemm' or 'avx512bf16'.*got 'amx'"):
        selfattn.attention(q, k, v)


CAPPED_ISA = """
import os, torch, selfattn
q, k, v = (torch.randn(1, 2, 100, 64, dtype=torch.bfloat16) for _ in range(3))
out = selfattn.attention(q, k, v)
print(torch.ops.selfattn._bf16_tile_gemm(), bool(out.isfinite().all()))
os.environ["SELFATTN_BF16_GEMM"] = "brgemm"
selfattn.attention(q, k, v)
"""


def test_brgemm_that_onednn_cannot_build():
    """With oneDNN capped below AVX512-BF16 (ONEDNN_MAX_CPU_ISA) it cannot build a bf16 brgemm: the
    default falls back to the micro-kernel (on an AMX CPU too), and SELFATTN_BF16_GEMM=brgemm is
    refused in words, not with oneDNN's bare 'could not generate a kernel'."""
    if not native_available:
        pytest.skip(NATIVE_REASON)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    env.pop("SELFATTN_BF16_GEMM", None)
    result = subprocess.run([sys.executable, "-c", CAPPED_ISA], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert result.stdout.split() == ["avx512bf16", "True"], result.stderr
    assert result.returncode != 0
    assert "SELFATTN_BF16_GEMM=brgemm: no bf16 brgemm can run here (oneDNN: could not" in result.stderr
