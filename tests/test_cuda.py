"""The CUDA kernels on a GPU: results against float64 references, every output element
written, determinism, memory, the op surface (opcheck, torch.compile, autocast, gradcheck,
CUDA graphs, a second device). All skipped without a GPU.

Not yet run on a GPU: the kernels are compiled for sm_80/sm_90 and tested in the CPU emulation
(tests/test_cuda_emulation.py). scripts/gpu_check.sh allows this file 180 s: a budget, not a
measurement (how long it takes on a GPU is not known yet).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

import selfattn
from tests.common import (
    ALL_DTYPES,
    assert_close,
    attention_with_grads,
    eager_attention,
    make_tensor,
    reference_layer_float64,
    sample_inputs,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ops = torch.ops.selfattn
CUDA = "cuda"
HEAD_DIMS = [3, 16, 33, 64, 80, 128, 256]  # every head-dim bucket; multiples of 4 and not


@contextlib.contextmanager
def nan_filled_allocations():
    """While active, new tensors from torch.empty are filled with NaN, so an output element the
    kernels never write shows up as NaN. (warn_only: cuBLAS, used by the fused op's
    projections, would otherwise refuse to run without CUBLAS_WORKSPACE_CONFIG.)"""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def reference_with_grads(q, k, v, grad_out, causal, scale):
    """out, lse and (dq, dk, dv) in float64 on the CPU."""
    q64, k64, v64 = (t.detach().cpu().double() for t in (q, k, v))
    out, grads = attention_with_grads(eager_attention, q64, k64, v64, grad_out.detach().cpu().double(),
                                      causal=causal, scale=scale)
    s = torch.matmul(q64, k64.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return out, torch.logsumexp(s, dim=-1), grads


def check_lse(lse, expected, dtype):
    """lse is float32 (float64 for float64 inputs), close to the float64 logsumexp."""
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 accumulation, the GPU's exp2/log2
    lse = lse.detach().cpu().double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(lse), finite)
    err = (lse - expected).abs()[finite]
    assert (err <= tol * expected.abs()[finite].clamp(min=1.0)).all(), f"lse error {err.max().item():.3e}"


def run_attention(q, k, v, grad_out, causal, scale):
    """The ops' outputs and gradients, allocated while uninitialized memory is NaN."""
    with nan_filled_allocations():
        out, lse = ops.attention_fwd(q, k, v, causal, scale)
        grads = ops.attention_bwd(grad_out, q, k, v, out, lse, causal, scale)[:3]  # (grad_sinks: none)
    return out, lse, grads


def check_attention(q, k, v, causal, scale=None, grad_out=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if grad_out is None:
        grad_out = torch.randn(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    out, lse, grads = run_attention(q, k, v, grad_out, causal, scale)
    assert out.device == q.device and all(g.device == q.device for g in grads)
    out64, lse64, grads64 = reference_with_grads(q, k, v, grad_out, causal, scale)
    out_eager, grads_eager = attention_with_grads(eager_attention, q, k, v, grad_out, causal=causal, scale=scale)
    assert_close(out, out64, out_eager, "out")
    check_lse(lse, lse64, q.dtype)
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g, g64, ge, name)


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,heads,nq,nk", [
    (2, 1, 1, 1),     # N = 1
    (1, 8, 70, 70),   # not a multiple of any block size
    (2, 1, 37, 100),  # Nq < Nk
    (1, 8, 130, 45),  # Nq > Nk
])
def test_attention(dtype, dim, causal, batch, heads, nq, nk):
    check_attention(*sample_inputs(batch, heads, nq, nk, dim, dtype=dtype, device=CUDA), causal)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("dim,dim_v", [(64, 32), (16, 100), (256, 8), (5, 256)])
def test_value_dim_differs(dtype, dim, dim_v):
    check_attention(*sample_inputs(2, 2, 45, 66, dim, dim_v, dtype=dtype, device=CUDA), True)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dim", [33, 64])
def test_non_contiguous(layout, dtype, dim):
    """Vector loads where the strides allow them, element-wise loads where they do not; grad_out
    in the same odd layout."""
    q, k, v = sample_inputs(2, 3, 50, 50, dim, dtype=dtype, device=CUDA, layout=layout)
    grad_out = make_tensor((2, 3, 50, dim), dtype, CUDA, layout)
    check_attention(q, k, v, True, grad_out=grad_out)


def test_misaligned_views():
    buf = torch.randn(3 * 2 * 40 * 32 + 1, device=CUDA)
    q, k, v = (buf[1 + i * 2 * 40 * 32:1 + (i + 1) * 2 * 40 * 32].view(1, 2, 40, 32) for i in range(3))
    check_attention(q, k, v, False)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_empty_keys_and_batches(dtype):
    # Nk = 0: out = 0, lse = -inf, zero gradients, never NaN.
    q, k, v = sample_inputs(2, 2, 5, 0, 8, dtype=dtype, device=CUDA)
    out, lse, grads = run_attention(q, k, v, torch.randn(2, 2, 5, 8, dtype=dtype, device=CUDA), False, 1.0)
    assert (out == 0).all() and (lse == float("-inf")).all()
    assert all((g == 0).all() for g in grads)
    out = selfattn.attention(*(t.requires_grad_() for t in (q, k, v)), causal=True)
    out.sum().backward()
    assert (q.grad == 0).all()
    for shape in ((1, 1, 0, 4, 8, 8), (0, 2, 3, 3, 8, 8)):  # Nq = 0, B = 0
        q, k, v = sample_inputs(*shape, dtype=dtype, device=CUDA)
        out, lse, grads = run_attention(q, k, v, torch.zeros(*q.shape[:3], 8, dtype=dtype, device=CUDA), True, 1.0)
        assert out.shape == (*q.shape[:3], 8) and all((g == 0).all() for g in grads)


def test_head_dim_limit():
    q, k, v = sample_inputs(1, 1, 4, 4, 300, device=CUDA)
    with pytest.raises(ValueError, match="head dims up to 256"):
        ops.attention_fwd(q, k, v, False, 1.0)


# ---------------------------------------------------------------------------------------------
# The fused layer


def check_module(dtype, causal, bias, embed, model_dim, heads, seq):
    """selfattn.SelfAttention (the fused op: packed QKV projection, attention on strided views)
    against the reference module in float64, outputs and every gradient."""
    ref = selfattn.reference.SelfAttention(embed, model_dim, heads, bias=bias, causal=causal)
    ref64 = reference_layer_float64(ref)
    module = selfattn.SelfAttention.from_reference(ref).to(CUDA, dtype)
    eager_module = selfattn.reference.SelfAttention(embed, model_dim, heads, bias=bias, causal=causal).to(CUDA, dtype)
    eager_module.load_state_dict(ref.state_dict())
    x = torch.randn(3, seq, embed)
    grad_out = torch.randn(3, seq, model_dim)

    def run(m, x, grad_out):
        x = x.detach().clone().requires_grad_(True)
        with nan_filled_allocations():
            out = m(x)
            out.backward(grad_out.to(out.dtype))
        return out.detach(), x.grad

    out64, dx64 = run(ref64, x.double(), grad_out.double())
    out, dx = run(module, x.to(CUDA, dtype), grad_out.to(CUDA))
    out_eager, dx_eager = run(eager_module, x.to(CUDA, dtype), grad_out.to(CUDA))
    assert_close(out, out64, out_eager, "out")
    assert_close(dx, dx64, dx_eager, "dx")
    w64 = torch.cat([ref64.to_query.weight.grad, ref64.to_key.weight.grad, ref64.to_value.weight.grad])
    w_eager = torch.cat([eager_module.to_query.weight.grad, eager_module.to_key.weight.grad,
                         eager_module.to_value.weight.grad])
    assert_close(module.in_proj_weight.grad, w64, w_eager, "dW")
    if bias:
        b64 = torch.cat([ref64.to_query.bias.grad, ref64.to_key.bias.grad, ref64.to_value.bias.grad])
        b_eager = torch.cat([eager_module.to_query.bias.grad, eager_module.to_key.bias.grad,
                             eager_module.to_value.bias.grad])
        assert_close(module.in_proj_bias.grad, b64, b_eager, "db")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_self_attention_module(dtype, causal, bias):
    check_module(dtype, causal, bias, embed=48, model_dim=64, heads=4, seq=77)  # head dim 16


def test_self_attention_function():
    """selfattn.self_attention on CUDA, batched and single-sequence, against the projections and
    attention in float64 on the CPU."""
    x = torch.randn(2, 33, 24, device=CUDA)
    w = torch.randn(96, 24, device=CUDA) / 5
    b = torch.randn(96, device=CUDA)

    def layer(x, w, b):  # (B, N, E) -> (B, N, M), heads side by side
        qkv = torch.nn.functional.linear(x, w, b).unflatten(-1, (3, 2, 16))
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        return eager_attention(q, k, v, causal=True).transpose(1, 2).flatten(2)

    expected = layer(x.double().cpu(), w.double().cpu(), b.double().cpu())
    eager = layer(x, w, b)
    with nan_filled_allocations():
        out = selfattn.self_attention(x, w, b, num_heads=2, causal=True)
        single = selfattn.self_attention(x[1], w, b, num_heads=2, causal=True)
    assert_close(out, expected, eager, "out")
    assert_close(single, expected[1], eager[1], "single sequence")


# ---------------------------------------------------------------------------------------------
# The tensor-core kernels: half and bfloat16 at D = Dv = 64 or 128 with aligned layouts

TC_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,heads,nq,nk", [
    (2, 3, 257, 257),  # one past two 128-query blocks: partial blocks and tiles everywhere
    (1, 2, 200, 513),  # Nq < Nk: several key tiles, the last partial
    (1, 2, 513, 130),  # Nq > Nk: causal rows past Nk see every key
])
def test_tensor_cores(dtype, dim, causal, batch, heads, nq, nk):
    check_attention(*sample_inputs(batch, heads, nq, nk, dim, dtype=dtype, device=CUDA), causal)


@pytest.mark.parametrize("dim", [64, 128])
def test_tensor_cores_packed_qkv(dim):
    """The fused op's layout: q, k, v views of one (B, N, 3, H, D) buffer, grad_out with
    (B, N, H, D) memory."""
    b, n, h = 2, 300, 4
    qkv = torch.randn(b, n, 3, h, dim, dtype=torch.bfloat16, device=CUDA)
    q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
    grad_out = torch.randn(b, n, h, dim, dtype=torch.bfloat16, device=CUDA).transpose(1, 2)
    check_attention(q, k, v, True, grad_out=grad_out)


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_module_tensor_cores(dtype, head_dim, causal):
    check_module(dtype, causal, True, embed=96, model_dim=2 * head_dim, heads=2, seq=150)


def cuda_kernel_names(fn):
    """Names of the CUDA kernels fn() launches (torch.profiler; skips where CUPTI is missing)."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except RuntimeError as error:  # pragma: no cover - depends on the machine
        pytest.skip(f"torch.profiler cannot trace CUDA here: {error}")
    return " ".join(event.key for event in prof.key_averages())


def test_tensor_core_dispatch():
    """Aligned half / bfloat16 at D = 64 / 128 runs the tensor-core kernels; a layout they cannot
    read (last dim not contiguous) the tiled ones."""
    q, k, v = sample_inputs(1, 2, 100, 100, 128, dtype=torch.bfloat16, device=CUDA)
    names = cuda_kernel_names(lambda: ops.attention_bwd(torch.randn_like(q), q, k, v,
                                                        *ops.attention_fwd(q, k, v, True, 0.1), True, 0.1))
    for kernel in ("attention_forward_tc_kernel", "attention_backward_dq_tc_kernel",
                   "attention_backward_dkdv_tc_kernel"):
        assert kernel in names, names
    q, k, v = sample_inputs(1, 2, 100, 100, 64, dtype=torch.float16, device=CUDA, layout="strided_last")
    names = cuda_kernel_names(lambda: ops.attention_fwd(q, k, v, True, 0.1))
    assert "attention_forward_kernel" in names and "_tc_kernel" not in names, names


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("kind", ["bool_key_padding", "float_full"])
def test_tensor_cores_with_a_tensor_mask(dtype, dim, kind):
    """attn_mask on the tensor-core kernels (the profiler names them) with bottom-right causal and
    GQA, against the float64 oracle of the emulation tests; the second batch of the key-padding
    case sees no key (output 0, zero gradients)."""
    from tests.test_cuda_emulation import assert_empty_rows, dense_mask, masked_attention, masked_lse

    batch, hq, hk, nq, nk, scale = 2, 4, 2, 200, 300, dim ** -0.5
    q = make_tensor((batch, hq, nq, dim), dtype, device=CUDA)
    k, v = (make_tensor((batch, hk, nk, dim), dtype, device=CUDA) for _ in range(2))
    grad_out = make_tensor((batch, hq, nq, dim), dtype, device=CUDA)
    if kind == "bool_key_padding":
        attn_mask = (torch.arange(nk) < torch.tensor([nk - 77, 0]).view(-1, 1)).view(batch, 1, 1, nk)
    else:
        attn_mask = (torch.randn(batch, hq, nq, nk) * 2).masked_fill(torch.rand(batch, hq, nq, nk) < 0.2,
                                                                     float("-inf")).to(dtype)
    mask_args = (attn_mask.to(CUDA), -1, -1, nk - nq)
    results = {}

    def run():
        results["fwd"] = ops.attention_fwd(q, k, v, True, scale, *mask_args)
        results["bwd"] = ops.attention_bwd(grad_out, q, k, v, *results["fwd"], True, scale, *mask_args)[:3]

    names = cuda_kernel_names(run)
    for kernel in ("attention_forward_tc_kernel", "attention_backward_dq_tc_kernel",
                   "attention_backward_dkdv_tc_kernel"):
        assert kernel in names, names
    (out, lse), grads = results["fwd"], results["bwd"]
    mask = dense_mask(batch, hq, nq, nk, True, attn_mask, -1, -1, nk - nq)
    q, k, v, grad_out = (t.cpu() for t in (q, k, v, grad_out))
    expected, grads64 = attention_with_grads(masked_attention, q.double(), k.double(), v.double(),
                                             grad_out.double(), mask=mask, scale=scale)
    eager, grads_eager = attention_with_grads(masked_attention, q, k, v, grad_out, mask=mask, scale=scale)
    assert_close(out.cpu(), expected, eager, "out")
    expected_lse = masked_lse(q, k, mask, scale)
    assert torch.equal(torch.isfinite(lse.cpu()), torch.isfinite(expected_lse))
    for name, g, g64, ge in zip(("dq", "dk", "dv"), grads, grads64, grads_eager):
        assert_close(g.cpu(), g64, ge, name)
    if kind == "bool_key_padding":
        assert_empty_rows(out.cpu(), lse.cpu(), [g.cpu() for g in grads], mask)


# ---------------------------------------------------------------------------------------------
# Behaviour


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("dim", [64, 128])  # the tensor-core kernels for half and bfloat16
def test_bitwise_deterministic(dtype, dim):
    q, k, v = sample_inputs(2, 4, 300, 300, dim, dtype=dtype, device=CUDA)
    grad_out = torch.randn(2, 4, 300, dim, dtype=dtype, device=CUDA)
    first = run_attention(q, k, v, grad_out, True, 0.125)
    for _ in range(2):
        again = run_attention(q, k, v, grad_out, True, 0.125)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        assert all(torch.equal(a, b) for a, b in zip(again[2], first[2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_memory_is_linear_in_n(dtype):
    """Forward + backward at N = 16384 allocates far less than one N x N float32 matrix (1 GiB)."""
    q, k, v = sample_inputs(1, 1, 16384, 16384, 64, dtype=dtype, device=CUDA, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = selfattn.attention(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert growth < 256 * 2**20, f"peak growth {growth / 2**20:.1f} MiB"
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_autocast_bf16():
    q, k, v = sample_inputs(2, 2, 40, 40, 32, device=CUDA, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = selfattn.attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32
    expected = eager_attention(*(t.detach().double().cpu() for t in (q, k, v)), causal=True)
    torch.testing.assert_close(out.float().cpu().double(), expected, rtol=0, atol=0.03)
    module = selfattn.SelfAttention(16, 32, 2, bias=True).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(torch.randn(2, 9, 16, device=CUDA))
    assert y.dtype == torch.bfloat16


def test_gradcheck_float64():
    # float64 takes the warp-per-row kernels; Nq != Nk and D != Dv, causal and not.
    for causal in (False, True):
        q, k, v = sample_inputs(1, 2, 17, 19, 6, 5, dtype=torch.float64, device=CUDA, requires_grad=True)
        assert torch.autograd.gradcheck(lambda q, k, v: selfattn.attention(q, k, v, causal=causal), (q, k, v))
    x = torch.randn(2, 9, 8, dtype=torch.float64, device=CUDA, requires_grad=True)
    w = torch.randn(3 * 8, 8, dtype=torch.float64, device=CUDA, requires_grad=True)
    b = torch.randn(3 * 8, dtype=torch.float64, device=CUDA, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: selfattn.self_attention(x, w, b, num_heads=2, causal=True), (x, w, b))


def test_opcheck():
    q, k, v = sample_inputs(2, 3, 17, 19, 8, device=CUDA, requires_grad=True)
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, True, 0.3))
    out, lse = ops.attention_fwd(q, k, v, True, 0.3)
    torch.library.opcheck(ops.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, True, 0.3))
    x = torch.randn(2, 17, 12, device=CUDA, requires_grad=True)
    w = torch.randn(48, 12, device=CUDA, requires_grad=True)
    b = torch.randn(48, device=CUDA, requires_grad=True)
    torch.library.opcheck(ops.self_attention_fwd.default, (x, w, b, 2, True, 0.5))
    out, qkv, lse = ops.self_attention_fwd(x, w, b, 2, True, 0.5)
    torch.library.opcheck(ops.self_attention_bwd.default,
                          (torch.randn_like(out), x.detach(), w.detach(), qkv, out.detach(), lse, 2, True, 0.5,
                           [True, True, True, False]))


def test_compile_fullgraph():
    module = selfattn.SelfAttention(32, 64, 4, bias=True, causal=True).to(CUDA)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 50, 32, device=CUDA, requires_grad=True)
    out = compiled(x)
    out.square().sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    expected = module(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_compiled, x.grad, rtol=1e-4, atol=1e-5)


def test_cuda_graph_capture():
    """No host synchronisation inside the ops: forward and backward replay from a CUDA graph."""
    q, k, v = sample_inputs(2, 2, 100, 100, 64, device=CUDA)
    grad_out = torch.randn(2, 2, 100, 64, device=CUDA)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        ops.attention_bwd(grad_out, q, k, v, *ops.attention_fwd(q, k, v, True, 0.125), True, 0.125)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.attention_fwd(q, k, v, True, 0.125)
        grads = ops.attention_bwd(grad_out, q, k, v, out, lse, True, 0.125)
    q.copy_(torch.randn_like(q))  # new inputs in the captured buffers
    graph.replay()
    torch.cuda.synchronize()
    expected_out, expected_lse = ops.attention_fwd(q, k, v, True, 0.125)
    expected_grads = ops.attention_bwd(grad_out, q, k, v, expected_out, expected_lse, True, 0.125)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    """Tensors on cuda:1 run on cuda:1 while cuda:0 is current."""
    with torch.cuda.device(0):
        q, k, v = sample_inputs(2, 2, 40, 40, 32, device="cuda:1")
        check_attention(q, k, v, True)
        out = selfattn.attention(q, k, v)
        assert out.device == torch.device("cuda:1")
        x = torch.randn(2, 9, 16, device="cuda:1")
        module = selfattn.SelfAttention(16, 32, 2).to("cuda:1")
        assert module(x).device == torch.device("cuda:1")


# ---------------------------------------------------------------------------------------------
# Decoding (csrc/cuda/attention_decode.cu): few queries against a long cache, split-K


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, "1", "3"])
@pytest.mark.parametrize("nq,hq,hk", [(1, 32, 8), (4, 8, 1), (1, 4, 4)])
def test_decode(dtype, splits, nq, hq, hk, monkeypatch):
    """Split-K decoding (automatic S, or forced) against float64 with bottom-right causal, its
    backward from the merged lse, and bitwise identical on a second call."""
    if splits is None:
        monkeypatch.delenv("SELFATTN_DECODE_SPLITS", raising=False)
    else:
        monkeypatch.setenv("SELFATTN_DECODE_SPLITS", splits)
    nk, dim = 3000, 128 if dtype != torch.float64 else 64
    q = make_tensor((2, hq, nq, dim), dtype, device=CUDA).requires_grad_()
    k = make_tensor((2, hk, nk, dim), dtype, device=CUDA).requires_grad_()
    v = make_tensor((2, hk, nk, dim), dtype, device=CUDA).requires_grad_()
    grad_out = make_tensor((2, hq, nq, dim), dtype, device=CUDA)
    mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)  # bottom-right causal, dense

    def oracle(q, k, v):
        group = q.shape[1] // k.shape[1]
        s = q @ k.repeat_interleave(group, 1).transpose(-2, -1) * dim ** -0.5
        return torch.softmax(s.masked_fill(~mask.to(s.device), float("-inf")), -1) @ v.repeat_interleave(group, 1)

    def run(fn, *ts):
        out = fn(*ts)
        return [out, *torch.autograd.grad(out, ts, grad_out.to(out.dtype))]

    with nan_filled_allocations():
        got = run(lambda q, k, v: selfattn.attention(q, k, v, causal="bottom_right", enable_gqa=True), q, k, v)
        again = run(lambda q, k, v: selfattn.attention(q, k, v, causal="bottom_right", enable_gqa=True), q, k, v)
    expected = run(oracle, *(t.detach().cpu().double().requires_grad_() for t in (q, k, v)))
    eager = run(oracle, *(t.detach().requires_grad_() for t in (q, k, v)))
    for name, g, e64, ge, a in zip(("out", "dq", "dk", "dv"), got, expected, eager, again):
        assert_close(g.cpu(), e64, ge.cpu(), name)
        assert torch.equal(g, a), name
