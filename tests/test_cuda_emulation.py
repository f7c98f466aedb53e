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


NO_MASK = (None, -1, -1, 0)  # attn_mask, window_left, window_right, diagonal_offset: none


def emu_forward(emu, q, k, v, causal, scale, mask_args=NO_MASK):
    """out as the op allocates it ((B, Nq, H, Dv) memory), both outputs NaN until written.
    mask_args: the op's (attn_mask, window_left, window_right, diagonal_offset)."""
    b, h, nq, _ = q.shape
    out = torch.full((b, nq, h, v.shape[3]), float("nan"), dtype=q.dtype).transpose(1, 2)
    lse = torch.full((b, h, nq), float("nan"), dtype=acc_dtype(q.dtype))
    emu.forward(q, k, v, causal, scale, *mask_args, out, lse)
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
    emu.backward(grad_out, q, k, v, out, lse, causal, scale, *NO_MASK, *grads)
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
    emu.backward(torch.randn_like(out), q, k, v, out, lse, False, 1.0, *NO_MASK, *grads)
    assert all((g == 0).all() for g in grads)
    # Nq = 0 and B = 0: nothing to do, nothing breaks.
    for shape in ((1, 1, 0, 4, 8, 8), (0, 2, 3, 3, 8, 8)):
        q, k, v = sample_inputs(*shape, dtype=dtype)
        out, lse = emu_forward(emu, q, k, v, True, 1.0)
        grads = packed_grads(q, k, v)
        emu.backward(torch.zeros_like(out), q, k, v, out, lse, True, 1.0, *NO_MASK, *grads)
        assert all((g == 0).all() for g in grads)  # (vacuous for B = 0: nothing to write)
    # Hq = 0 with Hk = 2 (0 is a multiple of any Hk): dk, dv are zero, not left unwritten.
    q, k, v = torch.randn(1, 0, 5, 8, dtype=dtype), torch.randn(1, 2, 4, 8, dtype=dtype), torch.randn(1, 2, 4, 8, dtype=dtype)
    out, lse = emu_forward(emu, q, k, v, False, 1.0)
    grads = packed_grads(q, k, v)
    emu.backward(torch.zeros_like(out), q, k, v, out, lse, False, 1.0, *NO_MASK, *grads)
    assert all((g == 0).all() for g in grads)


def assert_same_under_two_seeds(emu, q, k, v, grad_out, scale, mask_args=NO_MASK):
    """Causal forward and backward under two emulation seeds (thread orders, cp.async landing
    times) give bitwise identical out, lse and gradients."""
    results = []
    for seed in (1, 2):
        emu.seed(seed)
        out, lse = emu_forward(emu, q, k, v, True, scale, mask_args)
        grads = packed_grads(q, k, v)
        emu.backward(grad_out, q, k, v, out, lse, True, scale, *mask_args, *grads)
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
    emu.forward(q, k, v, False, 0.25, *NO_MASK, out, lse)
    grad_out = torch.randn_like(q)
    emu.backward(grad_out, q, k, v, out, lse, False, 0.25, *NO_MASK, *grads)
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
    emu.backward(grad_out, q, k, v, out, lse, True, scale, *NO_MASK, *grads)
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
    counters = tc_counters(emu, lambda: (emu.forward(q, k, v, False, 0.25, *NO_MASK, out, lse),
                                         emu.backward(grad_out, q, k, v, out, lse, False, 0.25, *NO_MASK,
                                                      *grads)))
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
        emu.backward(grad_out, q, k, v, out, lse, causal, scale, *NO_MASK, *grads)
    assert str(from_emulation.value).splitlines()[0] == str(from_cpu_op.value).splitlines()[0]
    assert all(torch.isnan(g).all() for g in grads)  # nothing was written


# ---------------------------------------------------------------------------------------------
# The mask description (csrc/mask.h, CONTRACT.md "Masks"): a band of visible keys (causal top-left
# or bottom-right, sliding windows, any diagonal offset), at most one tensor mask (bool or
# additive, broadcast through stride 0), and grouped-query attention, in every kernel family:
# tiled (fp32, fp16 at odd head dims), tensor cores (fp16/bf16 at D = 64 here; more tensor masks
# on them in test_cuda_emulation_tc_masks.py), generic (fp64). The oracle is an explicit float64 softmax with a
# dense float64 mask built here from the op's arguments, never from the kernels' own logic.

NEG_INF = float("-inf")


def dense_mask(batch, heads, nq, nk, causal, attn_mask, window_left, window_right, offset):
    """(B, Hq, Nq, Nk) float64: 0 where query i sees key j, -inf where it does not, plus an
    additive attn_mask. Query i sits at key position i + offset; the window spans left keys
    before it and right keys after it (-1: unbounded); causal allows nothing after it."""
    rel = torch.arange(nk).view(1, -1) - (torch.arange(nq).view(-1, 1) + offset)  # key - position
    seen = torch.ones(nq, nk, dtype=torch.bool)
    if window_left >= 0:
        seen &= rel >= -window_left
    if window_right >= 0:
        seen &= rel <= window_right
    if causal:
        seen &= rel <= 0
    m = torch.zeros(nq, nk, dtype=torch.float64).masked_fill(~seen, NEG_INF).expand(batch, heads, nq, nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            m = m.masked_fill(~attn_mask, NEG_INF)
        else:
            m = m + attn_mask.double()
    return m


def masked_attention(q, k, v, mask, scale):
    """softmax(scale q kᵀ + mask) v at q's precision, k and v repeated over the query heads of
    their group; a row whose mask is all -inf gives 0 (and zero gradients)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    empty = (mask == NEG_INF).all(-1, keepdim=True)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale + mask.to(q.dtype)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(p, v)


def masked_lse(q, k, mask, scale):
    group = q.shape[1] // k.shape[1]
    s = torch.matmul(q.double(), k.double().repeat_interleave(group, 1).transpose(-2, -1)) * scale + mask
    return torch.logsumexp(s, dim=-1)  # -inf for a row that sees nothing


def run_mask_case(emu, shape, dtype, causal, mask_args, *, backward=True, poison=None):
    """Forward (and backward) of the emulated kernels under a mask against the float64 oracle;
    returns (out, lse, grads, dense mask). poison(q, k, v, grad_out) may overwrite, with NaN, the
    parts of the inputs that no score needs (the kernels must never load them)."""
    batch, hq, hk, nq, nk, dim = shape
    q = make_tensor((batch, hq, nq, dim), dtype)
    k = make_tensor((batch, hk, nk, dim), dtype)
    v = make_tensor((batch, hk, nk, dim), dtype)
    grad_out = make_tensor((batch, hq, nq, dim), dtype)
    attn_mask, window_left, window_right, offset = mask_args
    mask = dense_mask(batch, hq, nq, nk, causal, attn_mask, window_left, window_right, offset)
    scale = dim ** -0.5
    inputs = [q, k, v, grad_out]
    if poison is not None:
        inputs = [t.clone() for t in inputs]
        poison(*inputs)
    out, lse = emu_forward(emu, *inputs[:3], causal, scale, mask_args)
    expected = masked_attention(q.double(), k.double(), v.double(), mask, scale)
    assert_close(out, expected, masked_attention(q, k, v, mask, scale), "out")
    check_lse(lse, masked_lse(q, k, mask, scale))
    if not backward:
        return out, lse, None, mask
    grads = [torch.full(t.shape, float("nan"), dtype=dtype) for t in (q, k, v)]
    emu.backward(inputs[3], *inputs[:3], out, lse, causal, scale, *mask_args, *grads)
    _, grads64 = attention_with_grads(masked_attention, q.double(), k.double(), v.double(), grad_out.double(),
                                      mask=mask, scale=scale)
    _, grads_eager = attention_with_grads(masked_attention, q, k, v, grad_out, mask=mask, scale=scale)
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g, g64, ge, name)
    return out, lse, grads, mask


def assert_empty_rows(out, lse, grads, mask):
    """Rows that see no key: output exactly 0, lse -inf, dq exactly 0."""
    empty = (mask == NEG_INF).all(-1)
    assert empty.any(), "the case was meant to have rows that see nothing"
    assert (out[empty] == 0).all() and (lse[empty] == NEG_INF).all()
    if grads is not None:
        assert (grads[0][empty] == 0).all()


# (causal, window_left, window_right, diagonal_offset, nq, nk): lengths cross the tiles of every
# kernel family (tiled 16-64 rows, tensor-core 64/128), none a multiple of them.
BANDS = {
    "top_left": (True, -1, -1, 0, 70, 150),
    "bottom_right_nq<nk": (True, -1, -1, 150 - 45, 45, 150),
    "bottom_right_nq>nk": (True, -1, -1, 40 - 150, 150, 40),  # the first 110 rows see nothing
    "window_below_tile": (False, 5, 3, 0, 150, 140),
    "window_beyond_n": (False, 300, 200, 0, 70, 90),
    "causal_sliding": (True, 20, 7, 0, 140, 140),  # right clamped to 0 by causal
    "offset_positive": (False, 10, 0, 77, 70, 200),
    "offset_negative": (False, -1, 6, -50, 130, 70),  # the first 44 rows see nothing
    "beyond_the_keys": (False, 3, 0, 500, 30, 70),  # no row sees any key
}
# (dtype, head dim): fp32 and fp16 on the tiled kernels, bf16 at D = 64 on the tensor cores,
# fp64 on the generic kernels.
MASK_DTYPES = {
    "fp32": (torch.float32, 40),
    "fp16": (torch.float16, 24),
    "bf16_tc": (torch.bfloat16, 64),
    "fp64": (torch.float64, 16),
}


# The float64 kernels spend a warp per row and key (slow in the emulation): the bands with many
# visible keys per row run there with fewer heads.
DENSE_BANDS = {"top_left", "bottom_right_nq<nk", "window_beyond_n"}


@pytest.mark.parametrize("dtype_name", list(MASK_DTYPES))
@pytest.mark.parametrize("band", list(BANDS))
def test_band(emu, band, dtype_name):
    causal, window_left, window_right, offset, nq, nk = BANDS[band]
    dtype, dim = MASK_DTYPES[dtype_name]
    heads_kv = {"top_left": 1, "bottom_right_nq<nk": 2, "window_below_tile": 1, "causal_sliding": 2}.get(band, 4)
    heads = 4
    if dtype == torch.float64 and band in DENSE_BANDS:
        heads, heads_kv = 2, 1
    emu.reset_counters()
    out, lse, grads, mask = run_mask_case(emu, (1, heads, heads_kv, nq, nk, dim), dtype, causal,
                                          (None, window_left, window_right, offset))
    empty = (mask == NEG_INF).all(-1)
    if dtype_name == "bf16_tc" and not empty.all():
        assert emu.counters()["mma"] > 0, "the tensor-core kernels did not run"
    if empty.any():
        assert_empty_rows(out, lse, grads, mask)


@pytest.mark.parametrize("band", ["window_below_tile", "offset_negative"])
def test_band_tensor_cores_hd128(emu, band):
    """The D = 128 tensor-core configuration (64-key tiles, 16-query dk/dv steps) under a band
    with GQA."""
    causal, window_left, window_right, offset, nq, nk = BANDS[band]
    emu.reset_counters()
    out, lse, grads, mask = run_mask_case(emu, (1, 4, 2, nq, nk, 128), torch.float16, causal,
                                          (None, window_left, window_right, offset))
    assert emu.counters()["mma"] > 0, "the tensor-core kernels did not run"
    if band == "offset_negative":
        assert_empty_rows(out, lse, grads, mask)


def key_padding(batch, nk, lengths):
    """(B, 1, 1, Nk) bool, True for the first lengths[b] keys: a stride-0 broadcast mask."""
    return (torch.arange(nk).view(1, -1) < torch.tensor(lengths).view(-1, 1)).view(batch, 1, 1, nk)


def tensor_mask(kind, batch, hq, nq, nk, dtype):
    """attn_mask of one kind, with at least one row that sees nothing where the kind allows."""
    g = torch.Generator().manual_seed(7)
    if kind == "bool_full":  # (B, Hq, Nq, Nk), some rows all False
        m = torch.rand(batch, hq, nq, nk, generator=g) < 0.7
        m[0, 1, 3] = False
        m[-1, -1, nq - 1] = False
        return m
    if kind == "bool_key_padding":  # (B, 1, 1, Nk) expanded: stride 0 on heads and queries
        return key_padding(batch, nk, [nk - 23, 0][:batch])  # the second batch sees nothing
    if kind == "float_shared":  # (1, 1, Nq, Nk) float32, some -inf, one row all -inf
        m = torch.randn(1, 1, nq, nk, generator=g) * 2
        m[torch.rand(1, 1, nq, nk, generator=g) < 0.2] = NEG_INF
        m[0, 0, 5] = NEG_INF
        return m
    if kind == "float_q_dtype":  # (B, Hq, Nq, Nk) in q's dtype, a transposed (non-contiguous) view
        m = (torch.randn(batch, hq, nk, nq, generator=g) * 2).transpose(2, 3)
        m[:, :, 2] = NEG_INF
        return m.to(dtype)
    raise ValueError(kind)


# (kind, causal, window_left, window_right, offset): each tensor mask alone and with a band.
TENSOR_MASKS = {
    "bool_full": ("bool_full", False, -1, -1, 0),
    "bool_key_padding+causal": ("bool_key_padding", True, -1, -1, 0),
    "float_shared+window": ("float_shared", False, 30, 10, 5),
    "float_q_dtype": ("float_q_dtype", True, -1, -1, 20),
}


@pytest.mark.parametrize("dtype_name", list(MASK_DTYPES))
@pytest.mark.parametrize("case", list(TENSOR_MASKS))
def test_tensor_mask(emu, case, dtype_name):
    kind, causal, window_left, window_right, offset = TENSOR_MASKS[case]
    dtype, dim = MASK_DTYPES[dtype_name]
    batch, hq, hk, nq, nk = 2, 4, {"fp32": 1, "fp16": 2, "bf16_tc": 4, "fp64": 2}[dtype_name], 75, 90
    if dtype == torch.float64:  # a warp per row and key: smaller
        hq, nq, nk = 2, 35, 40
    attn_mask = tensor_mask(kind, batch, hq, nq, nk, dtype)
    emu.reset_counters()
    out, lse, grads, mask = run_mask_case(emu, (batch, hq, hk, nq, nk, dim), dtype, causal,
                                          (attn_mask, window_left, window_right, offset))
    assert (emu.counters()["mma"] > 0) == (dtype_name == "bf16_tc")  # only bf16 at D = 64 takes the tensor cores
    assert_empty_rows(out, lse, grads, mask)


def test_float32_mask_with_reduced_inputs(emu):
    """A float32 additive mask with bfloat16 q, k, v (the kernels read it as float32)."""
    attn_mask = torch.randn(2, 1, 40, 50) * 3
    run_mask_case(emu, (2, 2, 1, 40, 50, 64), torch.bfloat16, False, (attn_mask, -1, -1, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finfo_min_rows_are_ordinary(emu, dtype):
    """A row masked everywhere with finfo.min (Hugging Face's padding) is not empty: it gives
    what the float64 math gives, a uniform softmax over its keys (forward; the scores never
    overflow to -inf)."""
    attn_mask = torch.zeros(1, 1, 33, 45, dtype=dtype)
    attn_mask[..., 4, :] = torch.finfo(dtype).min
    attn_mask[..., 9, 20:] = torch.finfo(dtype).min
    out, lse, _, _ = run_mask_case(emu, (1, 2, 2, 33, 45, 16), dtype, False, (attn_mask, -1, -1, 0),
                                   backward=False)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16_tc", "fp64"])
def test_unseen_tiles_are_never_loaded(emu, dtype_name):
    """Keys no query sees and queries that see no key, NaN in whole tiles (multiples of 128
    rows, every kernel's tile size divides it): the results are those of clean inputs, so those
    tiles were never loaded (a loaded NaN key poisons P v even where P = 0)."""
    dtype, dim = MASK_DTYPES[dtype_name]

    def poison_keys(q, k, v, grad_out):  # top-left causal over 64 queries: keys >= 64 unseen
        k[:, :, 128:] = float("nan")
        v[:, :, 128:] = float("nan")

    run_mask_case(emu, (1, 2, 1, 64, 300, dim), dtype, True, (None, -1, -1, 0), poison=poison_keys)

    def poison_queries(q, k, v, grad_out):  # bottom-right, Nq = 300 > Nk = 64: rows < 236 see nothing
        q[:, :, :128] = float("nan")
        grad_out[:, :, :128] = float("nan")

    out, lse, grads, mask = run_mask_case(emu, (1, 2, 2, 300, 64, dim), dtype, True, (None, -1, -1, 64 - 300),
                                          poison=poison_queries)
    assert_empty_rows(out, lse, grads, mask)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16_tc", "fp64"])
@pytest.mark.parametrize("heads_kv", [1, 2])
def test_gqa_deterministic_under_any_thread_order(emu, dtype_name, heads_kv):
    """dk, dv summed over a query group in a fixed order: bitwise identical under other thread
    orders, with a band and a tensor mask."""
    dtype, dim = MASK_DTYPES[dtype_name]
    nq, nk = (70, 80) if dtype != torch.float64 else (20, 30)
    q = torch.randn(2, 4, nq, dim, dtype=dtype)
    k, v = (torch.randn(2, heads_kv, nk, dim, dtype=dtype) for _ in range(2))
    attn_mask = key_padding(2, nk, [nk, nk - 30])
    assert_same_under_two_seeds(emu, q, k, v, torch.randn_like(q), 0.2, (attn_mask, 20, -1, 10))
