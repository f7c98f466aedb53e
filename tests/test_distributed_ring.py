"""selfattn.distributed.ring_attention on 2 and 4 gloo ranks against attention on the whole
sequence: an explicit float64 softmax with the dense mask built here, and single-process
selfattn.attention. Each rank draws the full inputs from a shared seed, runs the ring on its chunk
and compares its rows of the output and gradients; one spawn per world size runs every case.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tests.distributed_harness import case_results, run_cases, run_ranks

# (name, (B, Hq, Hk, rows per rank, D, Dv), causal, window, layout, kv_heads_per_pass)
CASES = [
    (f"{layout}-{'causal' if causal else 'full'}", (2, 2, 2, 6, 8, 8), causal, None, layout, None)
    for layout in ("contiguous", "zigzag") for causal in (False, True)
] + [
    ("zigzag-causal-gqa-dv", (1, 4, 2, 10, 8, 6), True, None, "zigzag", None),
    ("zigzag-causal-gqa-one-pass", (1, 4, 2, 10, 8, 6), True, None, "zigzag", 2),  # all heads in one pass
    ("contiguous-full-uneven-passes", (2, 3, 3, 6, 4, 4), False, None, "contiguous", 2),  # passes of 2 and 1
    ("contiguous-causal-window", (1, 2, 2, 6, 4, 4), True, (4, 0), "contiguous", None),
    ("zigzag-window-both-sides", (1, 2, 2, 8, 4, 4), False, (3, 2), "zigzag", None),
    ("contiguous-causal-long", (1, 1, 1, 80, 16, 16), True, None, "contiguous", None),  # more than a 64-row tile
]


def dense_reference(q, k, v, causal, window, scale):
    """softmax(scale q kᵀ + mask) v in float64 with the global mask written out; GQA by repeating."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    n = q.shape[-2]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    visible = torch.ones(n, n, dtype=torch.bool)
    if causal:
        visible &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no key gives 0
    return weights @ v


def _full_inputs(shape, world_size, seed, dtype=torch.float64):
    batch, hq, hk, rows, dim, dim_v = shape
    gen = torch.Generator().manual_seed(seed)
    n = rows * world_size
    q = torch.randn(batch, hq, n, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, hk, n, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, hk, n, dim_v, generator=gen, dtype=dtype)
    grad_out = torch.randn(batch, hq, n, dim_v, generator=gen, dtype=dtype)
    return q, k, v, grad_out


def _check_case(shape, causal, window, layout, per_pass, seed, rank, world_size):
    import selfattn
    from selfattn.distributed import ring_attention, split_sequence

    q, k, v, grad_out = _full_inputs(shape, world_size, seed)
    scale = 1.0 / math.sqrt(shape[4])
    gqa = shape[1] != shape[2]

    # The oracles, on the whole sequence, on every rank.
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = dense_reference(*leaves, causal, window, scale)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    single = [t.clone().requires_grad_() for t in (q, k, v)]
    single_out = selfattn.attention(*single, causal=causal, window=window, enable_gqa=gqa)
    single_grads = torch.autograd.grad(single_out, single, grad_out)

    def mine(t):
        return split_sequence(t, world_size, rank, layout=layout)

    local = [mine(t).clone().requires_grad_() for t in (q, k, v)]
    out, lse = ring_attention(*local, causal=causal, window=window, layout=layout, enable_gqa=gqa,
                              return_lse=True, kv_heads_per_pass=per_pass)
    grads = torch.autograd.grad(out, local, mine(grad_out))
    tol = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(out, mine(expected), **tol)
    torch.testing.assert_close(out, mine(single_out), **tol)
    for got, want, ref, name in zip(grads, expected_grads, single_grads, "qkv"):
        torch.testing.assert_close(got, mine(want), **tol, msg=lambda m: f"grad {name}: {m}")
        torch.testing.assert_close(got, mine(ref), **tol, msg=lambda m: f"grad {name} vs selfattn: {m}")
    _, single_lse = torch.ops.selfattn.attention_fwd(q, k, v, causal=causal, scale=scale,
                                                     window_left=-1 if window is None else window[0],
                                                     window_right=-1 if window is None else window[1])
    torch.testing.assert_close(lse, mine(single_lse.unsqueeze(-1)).squeeze(-1), **tol)


def _scored_reference(q, k, v, causal, scale, softcap, slopes, sinks):
    """The float64 oracle with the score modifications written out: tanh cap, the ALiBi bias from
    global positions, the sink as an extra column that is dropped after the softmax."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    n = q.shape[-2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores - slopes.double().view(1, -1, 1, 1) * (i - j).abs()
    if causal:
        scores = scores.masked_fill(j > i, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    return weights @ v


def _check_score_mods(layout, causal, rank, world_size):
    """softcap, ALiBi over global positions and sinks through the ring; sinks.grad summed over the
    ranks is the whole sequence's."""
    import torch.distributed as dist

    from selfattn.distributed import ring_attention, split_sequence

    shape = (1, 4, 2, 6, 8, 8)
    q, k, v, grad_out = _full_inputs(shape, world_size, 11)
    gen = torch.Generator().manual_seed(12)
    slopes = torch.rand(4, generator=gen)  # float32, as the op takes them
    sinks = torch.randn(4, generator=gen, dtype=torch.float64) * 2
    scale = 1.0 / math.sqrt(shape[4])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    expected = _scored_reference(*leaves[:3], causal, scale, 1.5, slopes, leaves[3])
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    def mine(t):
        return split_sequence(t, world_size, rank, layout=layout)

    local = [mine(t).clone().requires_grad_() for t in (q, k, v)] + [sinks.clone().requires_grad_()]
    out = ring_attention(*local[:3], causal=causal, layout=layout, enable_gqa=True, softcap=1.5,
                         alibi_slopes=slopes, sinks=local[3])
    grads = torch.autograd.grad(out, local, mine(grad_out))
    tol = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(out, mine(expected), **tol)
    for got, want, name in zip(grads[:3], expected_grads[:3], "qkv"):
        torch.testing.assert_close(got, mine(want), **tol, msg=lambda m: f"grad {name}: {m}")
    sinks_grad = grads[3].clone()
    dist.all_reduce(sinks_grad)
    torch.testing.assert_close(sinks_grad, expected_grads[3], **tol)


class _CountPointToPoint:
    """Counts torch.distributed.isend / irecv calls (both the package's and distributed_c10d's
    names, which batch_isend_irecv compares against)."""

    def __init__(self):
        self.counts = {"isend": 0, "irecv": 0}

    def __enter__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self._saved = {name: getattr(c10d, name) for name in self.counts}
        for name, original in self._saved.items():
            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)
            setattr(c10d, name, counted)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, original in self._saved.items():
            setattr(c10d, name, original)
            setattr(dist, name, original)


def _check_only_point_to_point(rank, world_size):
    """CommDebugMode sees one all-reduce (the check that the ranks agree) and no all-gather of any
    kind, forward or backward; k/v and their gradients move by isend/irecv, as many as the ring
    needs, per pass (one per kv head by default): forward k, v on W - 1 steps; backward k, v on
    W - 1 steps and dk, dv on W."""
    from torch.distributed.tensor.debug import CommDebugMode

    from selfattn.distributed import ring_attention

    q, k, v = (t.requires_grad_() for t in _full_inputs((1, 2, 2, 4, 4, 4), 1, 7)[:3])
    with CommDebugMode() as comm, _CountPointToPoint() as p2p:
        ring_attention(q, k, v, causal=True, layout="zigzag").sum().backward()
    counts = {str(op): n for op, n in comm.get_comm_counts().items()}
    assert not [op for op in counts if "gather" in op or "all_to_all" in op or "broadcast" in op], counts
    assert sum(counts.values()) == 1 and "allreduce" in str(counts), counts
    expected = k.shape[1] * (2 * (world_size - 1) * 2 + 2 * world_size)
    assert p2p.counts == {"isend": expected, "irecv": expected}, p2p.counts


def _check_peak_live_tensors(rank, world_size):
    """The tensors alive at once during one call (forward + backward), counted op by op (not RSS:
    exact, not timed): at most out, dq, dk, dv and, per pass of one kv head out of 4, a quarter
    of the ring's k/v chunk, the next one, the dk/dv accumulator and one pair's outputs (DESIGN.md),
    i.e. 4 + 7.5 / 4 chunks; a ring over all heads at once would hold about 8."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    from selfattn.distributed import ring_attention

    q, k, v, grad = (t.requires_grad_(i < 3) for i, t in enumerate(_full_inputs((1, 4, 4, 64, 16, 16), 1, 5)))
    before = {t.untyped_storage().data_ptr() for t in (q, k, v, grad)}

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak = {}, 0  # storage address -> (weak ref, bytes) of the op outputs alive

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
                if storage is not None and storage.data_ptr() not in before:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            self.live = {key: ref for key, ref in self.live.items() if not ref[0].expired()}
            self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
            return result

    with Live() as live:
        ring_attention(q, k, v, causal=True, layout="zigzag").backward(grad)
    chunks = live.peak / (q.numel() * q.element_size())
    assert 4 <= chunks <= 4 + 7.5 / 4 + 0.25, f"{chunks:.2f} chunks alive at the peak"


def _check_bad_inputs(rank, world_size):
    import torch.distributed as dist

    from selfattn.distributed import ring_attention

    q = torch.randn(1, 2, 4 + 2 * rank, 4, dtype=torch.float64)  # chunks of unequal length
    with pytest.raises(ValueError, match="same shape and dtype.*q N"):
        ring_attention(q, q, q)
    dtype = torch.float64 if rank == 0 else torch.float32
    q = torch.randn(1, 2, 4, 4, dtype=dtype)
    with pytest.raises(ValueError, match="same shape and dtype.*differ in dtype"):
        ring_attention(q, q, q)
    q = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="same kv_heads_per_pass.*differ in kv_heads_per_pass"):
        ring_attention(q, q, q, kv_heads_per_pass=1 + rank)
    with pytest.raises(ValueError, match="kv_heads_per_pass must be a positive int"):
        ring_attention(q, q, q, kv_heads_per_pass=0)
    # A group of one rank (every rank must create every group): plain attention.
    singles = [dist.new_group([r]) for r in range(world_size)]
    q, k, v = _full_inputs((1, 2, 2, 6, 4, 4), 1, 11)[:3]
    import selfattn
    torch.testing.assert_close(ring_attention(q, k, v, group=singles[rank], causal=True, layout="zigzag"),
                               selfattn.attention(q, k, v, causal=True), rtol=0, atol=0)
    # A group without this rank.
    with pytest.raises(ValueError, match="not a member of group"):
        ring_attention(q, k, v, group=singles[(rank + 1) % world_size])
    with pytest.raises(ValueError, match="even chunk length"):
        ring_attention(q[..., :5, :], k[..., :5, :], v[..., :5, :], layout="zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, k, v, layout="striped")


def _suite(rank, world_size):
    cases = [(name, functools.partial(_check_case, shape, causal, window, layout, per_pass, seed))
             for seed, (name, shape, causal, window, layout, per_pass) in enumerate(CASES)]
    cases += [(f"score-mods-{layout}-{'causal' if causal else 'full'}",
               functools.partial(_check_score_mods, layout, causal))
              for layout, causal in (("zigzag", True), ("contiguous", False))]
    cases.append(("only-point-to-point", _check_only_point_to_point))
    cases.append(("bad-inputs", _check_bad_inputs))
    cases.append(("peak-live-tensors", _check_peak_live_tensors))
    return run_cases(cases, rank, world_size)


@functools.lru_cache(maxsize=None)
def _suite_results(world_size):
    return run_ranks(_suite, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", [c[0] for c in CASES] + ["score-mods-zigzag-causal", "score-mods-contiguous-full",
                                                                  "only-point-to-point", "bad-inputs",
                                                                  "peak-live-tensors"])
def test_ring_attention(world_size, case):
    case_results(_suite_results(world_size), case)


def test_split_unsplit_round_trip():
    from selfattn.distributed import split_sequence, unsplit_sequence

    x = torch.arange(2 * 3 * 16).reshape(2, 3, 16).float()
    for layout in ("contiguous", "zigzag"):
        parts = [split_sequence(x, 4, r, layout=layout, dim=-1) for r in range(4)]
        assert torch.equal(unsplit_sequence(parts, layout=layout, dim=-1), x)
    # zigzag: rank r holds pieces r and 2W-1-r of 2W
    assert split_sequence(torch.arange(8), 2, 0, layout="zigzag", dim=0).tolist() == [0, 1, 6, 7]
    assert split_sequence(torch.arange(8), 2, 1, layout="zigzag", dim=0).tolist() == [2, 3, 4, 5]


def test_import_selfattn_leaves_distributed_unloaded():
    import subprocess
    import sys

    code = ("import sys, selfattn; assert 'selfattn.distributed' not in sys.modules; "
            "selfattn.distributed.ring_attention; assert 'selfattn.distributed.tensor_parallel' not in sys.modules; "
            "selfattn.distributed.SelfAttentionParallel; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
