"""The CUDA kernels' code, run on the CPU through a fiber-per-thread emulation of CUDA
(tests/cuda_emulation/), against float64 references. Needs no GPU, so the CUDA kernels'
indexing, masking, tiling, strides, barriers and determinism are checked on every machine; what
it cannot check (speed, the real memory model, compiler output) is left to tests/test_cuda.py.

Opt-in, as it compiles the kernels as C++ first (about a minute, cached):
    SELFATTN_TEST_EMULATION=1 python -m pytest -q tests/test_cuda_emulation.py
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from tests.common import assert_close, attention_with_grads, eager_attention, make_tensor, sample_inputs
from tests.test_bad_inputs import ATTENTION as ATTENTION_CASES

pytestmark = pytest.mark.skipif(os.environ.get("SELFATTN_TEST_EMULATION") != "1",
                                reason="set SELFATTN_TEST_EMULATION=1 to run the CUDA kernels in CPU emulation")

HERE = Path(__file__).resolve().parent

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]  # the tiled kernels
HEAD_DIMS = [3, 16, 33, 64, 80, 128, 256]  # every head-dim bucket, multiples of 4 and not


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    tag = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    build_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selfattn" / f"cuda_emulation_{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=f"selfattn_cuda_emulation_{tag}", sources=[str(HERE / "cuda_emulation" / "harness.cpp")],
                extra_cflags=["-O2", "-fno-strict-aliasing", "-DSELFATTN_CUDA_EMULATION"], build_directory=str(build_dir),
                with_cuda=False)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference(q, k, v, causal, scale):
    """out and lse in float64."""
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.double()), torch.logsumexp(s, dim=-1)


def emu_forward(emu, q, k, v, causal, scale):
    """out as the op allocates it ((B, Nq, H, Dv) memory), both outputs NaN until written."""
    b, h, nq, _ = q.shape
    out = torch.full((b, nq, h, v.shape[3]), float("nan"), dtype=q.dtype).transpose(1, 2)
    lse = torch.full((b, h, nq), float("nan"), dtype=acc_dtype(q.dtype))
    emu.forward(q, k, v, causal, scale, out, lse)
    return out, lse


def packed_grads(q, k, v):
    """NaN-filled gradients as strided views of one (B, N, 3, H, D) buffer, as the fused op
    passes them (only when q, k and v have one shape), else plain NaN tensors."""
    if q.shape == k.shape == v.shape:
        b, h, n, d = q.shape
        buf = torch.full((b, n, 3, h, d), float("nan"), dtype=q.dtype)
        return [buf.select(2, i).transpose(1, 2) for i in range(3)]
    return [torch.full(t.shape, float("nan"), dtype=t.dtype) for t in (q, k, v)]


def check_lse(lse, expected):
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(lse), finite)
    tol = 1e-12 if lse.dtype == torch.float64 else 2e-6
    err = (lse.double() - expected).abs()[finite]
    bound = tol * expected.abs()[finite].clamp(min=1.0)
    assert (err <= bound).all(), f"lse error {err.max().item():.3e}"


def run_case(emu, shape, dtype, causal, layout="contiguous", check_backward=True):
    batch, heads, nq, nk, dim, dim_v = shape
    q, k, v = sample_inputs(batch, heads, nq, nk, dim, dim_v, dtype=dtype, layout=layout)
    scale = 1.0 / math.sqrt(dim)
    out, lse = emu_forward(emu, q, k, v, causal, scale)
    expected, expected_lse = reference(q, k, v, causal, scale)
    assert_close(out, expected, eager_attention(q, k, v, causal, scale), "out")
    check_lse(lse, expected_lse)
    if not check_backward:
        return
    grad_out = make_tensor((batch, heads, nq, dim_v), dtype, layout=layout)
    _, grads64 = attention_with_grads(eager_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                      causal=causal, scale=scale)
    _, grads_eager = attention_with_grads(eager_attention, q, k, v, grad_out, causal=causal, scale=scale)
    grads = packed_grads(q, k, v)
    emu.backward(grad_out, q, k, v, out, lse, causal, scale, *grads)
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g, g64, ge, name)


@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(emu, dim, dtype, causal):
    # 70 queries and 45 keys: partial query blocks and key tiles of every configuration.
    run_case(emu, (1, 2, 70, 45, dim, dim), dtype, causal)


@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 8, 8),       # N = 1
    (2, 3, 1, 9, 16, 16),     # one query
    (1, 1, 9, 1, 16, 16),     # one key
    (1, 1, 65, 65, 64, 64),   # one past the block size
    (1, 1, 130, 40, 64, 32),  # Nq > Nk, Dv < D
    (1, 1, 40, 130, 24, 72),  # Nq < Nk, Dv > D (another bucket)
    (1, 2, 33, 17, 200, 7),   # largest bucket, tiny Dv
    (2, 1, 17, 33, 5, 256),
])
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(emu, shape, causal):
    run_case(emu, shape, torch.float32, causal)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_last"])
@pytest.mark.parametrize("dim", [16, 33, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layouts(emu, layout, dim, dtype):
    """Vector loads where the strides allow them, element-wise loads where they do not."""
    run_case(emu, (2, 2, 37, 37, dim, dim), dtype, True, layout)


def test_misaligned_views(emu):
    """A base pointer off the 4-element alignment takes the element-wise path (the emulation
    aborts on a misaligned vector access)."""
    buf = torch.randn(3 * 2 * 40 * 32 + 1)
    q, k, v = (buf[1 + i * 2 * 40 * 32:1 + (i + 1) * 2 * 40 * 32].view(1, 2, 40, 32) for i in range(3))
    scale = 32 ** -0.5
    out, lse = emu_forward(emu, q, k, v, False, scale)
    expected, _ = reference(q, k, v, False, scale)
    assert_close(out, expected, eager_attention(q, k, v, False, scale), "out")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim", [8, 64, 256])
def test_float64(emu, causal, dim):
    run_case(emu, (1, 2, 37, 41, dim, dim), torch.float64, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty(emu, dtype):
    # Nk = 0: out = 0, lse = -inf, zero gradients.
    q, k, v = sample_inputs(2, 2, 5, 0, 8, dtype=dtype)
    out, lse = emu_forward(emu, q, k, v, False, 1.0)
    assert (out == 0).all() and (lse == float("-inf")).all()
    grads = packed_grads(q, k, v)
    emu.backward(torch.randn_like(out), q, k, v, out, lse, False, 1.0, *grads)
    assert all((g == 0).all() for g in grads)
    # Nq = 0 and B = 0: nothing to do, nothing breaks.
    for shape in ((1, 1, 0, 4, 8, 8), (0, 2, 3, 3, 8, 8)):
        q, k, v = sample_inputs(*shape, dtype=dtype)
        out, lse = emu_forward(emu, q, k, v, True, 1.0)
        grads = packed_grads(q, k, v)
        emu.backward(torch.zeros_like(out), q, k, v, out, lse, True, 1.0, *grads)
        assert all((g == 0).all() for g in grads)  # (vacuous for B = 0: nothing to write)


def assert_same_under_two_seeds(emu, q, k, v, grad_out, scale):
    """Causal forward and backward under two emulation seeds (thread orders, cp.async landing
    times) give bitwise identical out, lse and gradients."""
    results = []
    for seed in (1, 2):
        emu.seed(seed)
        out, lse = emu_forward(emu, q, k, v, True, scale)
        grads = packed_grads(q, k, v)
        emu.backward(grad_out, q, k, v, out, lse, True, scale, *grads)
        results.append([out, lse, *grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_deterministic_under_any_thread_order(emu, dtype):
    """Bitwise identical results when the threads between barriers run in other orders."""
    q, k, v = sample_inputs(1, 2, 70, 70, 40, dtype=dtype)
    assert_same_under_two_seeds(emu, q, k, v, torch.randn(1, 2, 70, 40, dtype=dtype), 0.3)


@pytest.mark.parametrize("offset", [2, 4])  # element-wise stores (unaligned base), vector stores
def test_writes_stay_inside_views(emu, offset):
    """Outputs and gradients that are views into a larger buffer: every element of each view
    is written, nothing outside them changes."""
    q, k, v = sample_inputs(2, 2, 21, 21, 12, dtype=torch.float16)
    big = torch.full((2, 21, 4, 2, 16 + offset), float("nan"), dtype=torch.float16)
    views = [big[:, :, i, :, offset:offset + 12].transpose(1, 2) for i in range(4)]
    inside = torch.zeros(big.shape, dtype=torch.bool)
    inside[..., offset:offset + 12] = True
    big[~inside] = 7.0
    out, grads = views[0], views[1:]
    lse = torch.full((2, 2, 21), float("nan"))
    emu.forward(q, k, v, False, 0.25, out, lse)
    grad_out = torch.randn_like(q)
    emu.backward(grad_out, q, k, v, out, lse, False, 0.25, *grads)
    assert (big[~inside] == 7.0).all()
    expected, _ = reference(q, k, v, False, 0.25)
    assert_close(out, expected, eager_attention(q, k, v, False, 0.25), "out")
    _, grads64 = attention_with_grads(eager_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                      scale=0.25)
    _, grads_eager = attention_with_grads(eager_attention, q, k, v, grad_out, scale=0.25)
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g, g64, ge, name)


# ---------------------------------------------------------------------------------------------
# The tensor-core kernels (half and bfloat16 at D = Dv = 64 or 128, aligned layouts): their
# mma.sync / ldmatrix / cp.async run as the emulation's warp collectives, whose fragment layouts
# come from the PTX ISA, so a wrong fragment, swizzle or pipeline step shows up here.

TC_DTYPES = [torch.float16, torch.bfloat16]


def tc_counters(emu, fn):
    """fn() and the tensor-core instructions it ran."""
    emu.reset_counters()
    fn()
    return emu.counters()


def assert_tensor_cores(counters):
    assert counters["mma"] > 0, "the tensor-core kernels did not run"
    # The swizzled tiles make every ldmatrix phase conflict-free.
    assert counters["ldmatrix_extra_wavefronts"] == 0, counters


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [
    (1, 1),
    (70, 45),    # partial query block and key tile, Nq > Nk
    (45, 200),   # Nq < Nk: several key tiles, the last partial; causal rows see a prefix
    (150, 130),  # two query blocks (forward), three dk/dv key blocks, partial everything
])
def test_tensor_cores(emu, dim, dtype, causal, nq, nk):
    counters = tc_counters(emu, lambda: run_case(emu, (1, 2, nq, nk, dim, dim), dtype, causal))
    assert_tensor_cores(counters)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dim", [64, 128])
def test_tensor_cores_strided(emu, layout, dim):
    """(B, N, H, D) memory (a projection's output) and every other batch: still aligned rows, so
    still the tensor cores; gradients are views of one packed buffer (run_case)."""
    counters = tc_counters(emu, lambda: run_case(emu, (2, 2, 37, 37, dim, dim), torch.bfloat16, True, layout))
    assert_tensor_cores(counters)


@pytest.mark.parametrize("dim", [64, 128])
def test_tensor_cores_packed_qkv(emu, dim):
    """The fused op's layout: q, k, v are views of one (B, N, 3, H, D) buffer, out is (B, H, N, D)
    with (B, N, H, D) memory, the gradients are views of one packed buffer."""
    b, n, h = 2, 77, 3
    qkv = torch.randn(b, n, 3, h, dim, dtype=torch.float16)
    q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
    scale = dim ** -0.5
    emu.reset_counters()
    out, lse = emu_forward(emu, q, k, v, True, scale)
    expected, expected_lse = reference(q, k, v, True, scale)
    assert_close(out, expected, eager_attention(q, k, v, True, scale), "out")
    check_lse(lse, expected_lse)
    grad_out = torch.randn(b, n, h, dim, dtype=torch.float16).transpose(1, 2)
    grads = packed_grads(q, k, v)
    emu.backward(grad_out, q, k, v, out, lse, True, scale, *grads)
    assert_tensor_cores(emu.counters())
    _, grads64 = attention_with_grads(eager_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                      causal=True, scale=scale)
    _, grads_eager = attention_with_grads(eager_attention, q, k, v, grad_out, causal=True, scale=scale)
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g, g64, ge, name)


@pytest.mark.parametrize("case", ["strided_last", "misaligned", "negative_scale", "dim_v"])
def test_tensor_core_fallbacks(emu, case):
    """Where the tensor-core kernels do not apply, the tiled kernels give the same contract."""
    dim, dim_v, scale, layout = 64, 64, 0.125, "contiguous"
    if case == "strided_last":
        layout = "strided_last"
    elif case == "negative_scale":
        scale = -0.125  # the forward keeps raw-score maxima: needs scale > 0
    elif case == "dim_v":
        dim_v = 32
    if case == "misaligned":  # rows 16-byte aligned, base 2 bytes off
        buf = torch.randn(3 * 2 * 40 * 64 + 1, dtype=torch.bfloat16)
        q, k, v = (buf[1 + i * 2 * 40 * 64:1 + (i + 1) * 2 * 40 * 64].view(1, 2, 40, 64) for i in range(3))
    else:
        q, k, v = sample_inputs(1, 2, 40, 40, dim, dim_v, dtype=torch.bfloat16, layout=layout)
    emu.reset_counters()
    out, lse = emu_forward(emu, q, k, v, True, scale)
    assert emu.counters()["mma"] == 0
    expected, expected_lse = reference(q, k, v, True, scale)
    assert_close(out, expected, eager_attention(q, k, v, True, scale), "out")
    check_lse(lse, expected_lse)


@pytest.mark.parametrize("dim", [64, 128])
def test_tensor_cores_deterministic(emu, dim):
    """Bitwise identical results under other thread orders and other cp.async landing times."""
    q, k, v = sample_inputs(1, 2, 150, 150, dim, dtype=torch.bfloat16)
    assert_same_under_two_seeds(emu, q, k, v, torch.randn(1, 2, 150, dim, dtype=torch.bfloat16), 0.1)


def test_tensor_cores_write_inside_views(emu):
    """Outputs and gradients that are aligned views into a larger buffer (16-byte offset): every
    element of each view written, nothing outside them."""
    dim, offset = 64, 8
    q, k, v = sample_inputs(2, 2, 21, 21, dim, dtype=torch.float16)
    big = torch.full((2, 21, 4, 2, dim + 2 * offset), float("nan"), dtype=torch.float16)
    views = [big[:, :, i, :, offset:offset + dim].transpose(1, 2) for i in range(4)]
    inside = torch.zeros(big.shape, dtype=torch.bool)
    inside[..., offset:offset + dim] = True
    big[~inside] = 7.0
    out, grads = views[0], views[1:]
    lse = torch.full((2, 2, 21), float("nan"))
    grad_out = torch.randn_like(q)
    counters = tc_counters(emu, lambda: (emu.forward(q, k, v, False, 0.25, out, lse),
                                         emu.backward(grad_out, q, k, v, out, lse, False, 0.25, *grads)))
    assert_tensor_cores(counters)
    assert (big[~inside] == 7.0).all()
    expected, _ = reference(q, k, v, False, 0.25)
    assert_close(out, expected, eager_attention(q, k, v, False, 0.25), "out")
    _, grads64 = attention_with_grads(eager_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                      scale=0.25)
    _, grads_eager = attention_with_grads(eager_attention, q, k, v, grad_out, scale=0.25)
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g, g64, ge, name)


@pytest.mark.parametrize("case", [c for c in ATTENTION_CASES if c.op == "attention_bwd"], ids=lambda c: c.name)
def test_bad_backward_arguments_stop_before_the_cuda_host_code(emu, case):
    """The emulated CUDA path meets the ops' checks (csrc/checks.cpp) before any kernel argument
    is formed, and says what the CPU op says."""
    grad_out, q, k, v, out, lse, causal, scale = case.make("cpu")
    with pytest.raises(case.error, match=case.message) as from_cpu_op:
        torch.ops.selfattn.attention_bwd(grad_out, q, k, v, out, lse, causal, scale)
    if case.mixes_devices:  # the dispatcher took a meta tensor to the fake kernel: call C++ directly
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        with pytest.raises(case.error, match=case.message) as from_cpu_op:
            torch.ops.selfattn.attention_bwd.default.redispatch(keys, grad_out, q, k, v, out, lse, causal, scale)
    grads = [torch.full(t.shape, float("nan")) for t in (q, k, v)]
    with pytest.raises(case.error, match=case.message) as from_emulation:
        emu.backward(grad_out, q, k, v, out, lse, causal, scale, *grads)
    assert str(from_emulation.value).splitlines()[0] == str(from_cpu_op.value).splitlines()[0]
    assert all(torch.isnan(g).all() for g in grads)  # nothing was written
