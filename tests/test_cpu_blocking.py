"""The CPU forward's query block from the caches (csrc/cpu/blocking.h; DESIGN.md, "Blocking from
the caches"): the model's choice on known CPUs, clamping and the override, and — what makes the
choice safe — results bitwise the same whatever query block the caches give.

The expected blocks are worked out by hand from the model as DESIGN.md states it (the score tile,
64 keys x block_q float32, in half the L1d share; the work item's set in half the L2 share).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn  # noqa: F401  (loads the ops)
from tests.common import assert_close

ops = torch.ops.selfattn
KIB = 1024
ROOT = Path(__file__).resolve().parent.parent

# (L1d, L2) per core as the CPUs' data sheets give them.
CPUS = {
    "zen3": (32 * KIB, 512 * KIB),
    "zen4": (32 * KIB, 1024 * KIB),
    "zen5": (48 * KIB, 1024 * KIB),
    "sapphire_rapids": (48 * KIB, 2048 * KIB),
    "skylake_client": (32 * KIB, 256 * KIB),
}

# (cpu, sharers, D, float vector width) -> block_q; float32 accumulators, Dv = D.
# L1 bound: l1d / sharers / 2 / (64 keys * 4 bytes), down to the vector width, in [32, 128].
# L2 bound: 4 * (D*bq + 64*bq + bq*D + 64*2D) <= l2 / sharers / 2, lowering bq by the vector
# width while that fails, not below 32.
EXPECTED = [
    ("zen3", 1, 64, 8, 64),             # L1: 16 KiB / 256 B = 64; L2: 80 KiB <= 256 KiB
    ("zen4", 1, 64, 16, 64),
    ("zen5", 1, 64, 8, 96),             # 24 KiB / 256 B = 96; L2: 104 KiB <= 512 KiB
    ("zen5", 1, 64, 16, 96),
    ("sapphire_rapids", 1, 64, 16, 96),
    ("skylake_client", 1, 64, 8, 64),   # L2: 80 KiB <= 128 KiB
    ("zen3", 1, 128, 8, 64),            # L2: 144 KiB <= 256 KiB
    ("skylake_client", 1, 128, 8, 48),  # L2: 144 KiB (64) and 134 KiB (56) > 128 KiB; 124 KiB (48)
    ("skylake_client", 1, 128, 16, 48),  # 64 too big, 48 fits
    ("zen3", 1, 256, 8, 56),            # L2: 272 KiB (64) > 256 KiB; 254 KiB (56)
    ("zen3", 1, 256, 16, 48),           # 64 too big; 48: 236 KiB
    ("sapphire_rapids", 1, 256, 16, 96),  # L2: 4*(96*576 + 32768) = 344 KiB <= 1 MiB
    ("zen4", 2, 64, 8, 32),             # SMT siblings: 16 KiB L1d share -> 8 KiB / 256 B = 32
    ("sapphire_rapids", 2, 64, 16, 48),  # 24 KiB share -> 48
    # L1: 32; the L2 share's half (64 KiB) cannot hold even the key and value blocks (64 KiB):
    # the floor of 32 columns.
    ("skylake_client", 2, 128, 8, 32),
]


@pytest.mark.parametrize("cpu, sharers, dim, width, expected", EXPECTED)
def test_model_on_known_cpus(cpu, sharers, dim, width, expected):
    l1d, l2 = CPUS[cpu]
    assert ops._cpu_forward_query_block([l1d, l2, sharers], dim, dim, 4, width) == expected


def test_model_clamps_what_vms_misreport():
    # A 1 MiB L1d and a 300 MiB L2 are read as 128 KiB and 4 MiB: the block stops at its maximum.
    assert ops._cpu_forward_query_block([1 << 20, 300 << 20, 1], 64, 64, 4, 8) == 128
    # A 4 KiB L1d is read as 16 KiB: 8 KiB / 256 B = 32.
    assert ops._cpu_forward_query_block([4 * KIB, 512 * KIB, 1], 64, 64, 4, 8) == 32
    # float64 accumulators halve it: 16 KiB / (64 * 8 B) = 32, in vectors of 4 doubles; 48 KiB: 48.
    assert ops._cpu_forward_query_block([32 * KIB, 512 * KIB, 1], 64, 64, 8, 4) == 32
    assert ops._cpu_forward_query_block([48 * KIB, 512 * KIB, 1], 64, 64, 8, 4) == 48
    # Never below 32 columns, even where half an L1d share holds fewer (8 KiB / 256 B = 32 here,
    # 16 KiB shared by 4: 2 KiB / 256 B = 8 -> 32).
    assert ops._cpu_forward_query_block([16 * KIB, 512 * KIB, 4], 64, 64, 4, 8) == 32


def run_python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "SELFATTN_CPU_CACHES"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**environment, **env}, timeout=600)


def sysfs_cache(level, kind):
    """CPU 0's cache of that level and type from sysfs, in bytes (None if absent)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.exists() else []:
        if (index / "level").read_text().strip() == str(level) and \
                (index / "type").read_text().strip() in kind:
            size = (index / "size").read_text().strip()
            return int(size[:-1]) * {"K": KIB, "M": KIB * KIB}[size[-1]]
    return None


def test_caches_come_from_sysfs_or_the_override():
    report = "import torch, selfattn\nprint(torch.ops.selfattn._cpu_caches())\nprint(selfattn.build_info())"
    result = run_python(report)
    assert result.returncode == 0, result.stderr
    l1d, l2, _ = eval(result.stdout.splitlines()[0])
    if os.sched_getaffinity(0) and min(os.sched_getaffinity(0)) == 0 and sysfs_cache(1, ("Data",)):
        assert l1d == min(max(sysfs_cache(1, ("Data",)), 16 * KIB), 128 * KIB)
        assert l2 == min(max(sysfs_cache(2, ("Unified", "Data")), 128 * KIB), 4096 * KIB)
        assert "(sysfs)" in result.stdout
    assert "float32 forward query block" in result.stdout  # build_info says the choice

    result = run_python(report, SELFATTN_CPU_CACHES="48,2048,2")
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout.splitlines()[0]) == [48 * KIB, 2048 * KIB, 2]
    assert ("L1d 48 KiB, L2 2048 KiB per core shared by 2 CPUs (SELFATTN_CPU_CACHES); "
            "float32 forward query block 48 at D = 64") in result.stdout

    result = run_python(report, SELFATTN_CPU_CACHES="32K")
    assert result.returncode != 0
    assert "SELFATTN_CPU_CACHES must be 'L1D_KIB,L2_KIB'" in result.stderr and "got '32K'" in result.stderr


@pytest.fixture
def restore_caches():
    yield
    ops._cpu_caches(0, 0, 0)


def oracle(q, k, v, visible, scale):
    """out and lse in float64 by an explicit softmax over the visible keys."""
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v.double(), lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variant", ["full", "causal", "window", "mask", "dropout"])
def test_results_do_not_depend_on_the_query_block(dtype, variant, restore_caches):
    """Caches giving query blocks of 32, 64, 96 and 128 give bitwise the same out and lse."""
    batch, heads, nq, nk, dim = 2, 3, 300, 333, 64
    q, k, v = (torch.randn(batch, heads, n, dim, dtype=dtype) for n in (nq, nk, nk))
    scale = 1 / math.sqrt(dim)
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    kwargs = {}
    visible = torch.ones(nq, nk, dtype=torch.bool)
    if variant == "causal":
        kwargs["causal"] = True
        visible = j <= i
    elif variant == "window":
        kwargs.update(window_left=70, window_right=5)
        visible = (j >= i - 70) & (j <= i + 5)
    elif variant == "mask":
        kwargs["attn_mask"] = torch.rand(batch, 1, nq, nk) > 0.3
        visible = kwargs["attn_mask"]
    elif variant == "dropout":
        kwargs.update(dropout_p=0.2, rng_state=torch.tensor([1234, 0]))
    causal = kwargs.pop("causal", False)
    caches = {32: 16 * KIB, 64: 32 * KIB, 96: 48 * KIB, 128: 64 * KIB}  # L1d for each block
    elem, width = (8, 4) if dtype == torch.float64 else (4, 8)
    results = {}
    for block, l1d in caches.items():
        # The model gives that block (float64's accumulators are twice as wide: half of it, at least 32).
        expected = block if elem == 4 else max(32, block // 2)
        assert ops._cpu_forward_query_block([l1d, 4096 * KIB, 1], dim, dim, elem, width) == expected
        ops._cpu_caches(l1d, 4096 * KIB, 1)
        results[block] = ops.attention_fwd(q, k, v, causal, scale, **kwargs)
    first_out, first_lse = results[32]
    for block, (out, lse) in results.items():
        assert torch.equal(out, first_out) and torch.equal(lse, first_lse), f"query block {block} differs"
    if variant != "dropout":  # (dropout's oracle is tests/test_dropout.py's)
        expected_out, expected_lse = oracle(q, k, v, visible, scale)
        eager_scores = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~visible, float("-inf"))
        eager_out = torch.softmax(eager_scores, dim=-1) @ v
        eager_lse = torch.logsumexp(eager_scores.to(first_lse.dtype), dim=-1)
        assert_close(first_out, expected_out, eager_out, "out")
        assert_close(first_lse, expected_lse, eager_lse, "lse")
