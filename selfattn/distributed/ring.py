"""Ring attention (context parallelism): the sequence split across the ranks of a process group,
keys and values passed around the ring by point-to-point ops, partial results merged by their lse.

Each rank holds a chunk of q, k and v (the same rows of each). For W ranks and a local chunk of n
rows, ``layout="contiguous"`` gives rank r the global rows [r·n, (r+1)·n); ``layout="zigzag"``
cuts the sequence into 2W pieces of n/2 rows and gives rank r pieces r and 2W−1−r, so that under
causal attention every rank has the same work (zhuzilin/ring-flash-attention's zigzag).

Forward, on rank r: W steps; at step s the rank holds the k/v chunk of rank (r − s) mod W, posts
its send to r + 1 and the receive of the next chunk from r − 1 (``batch_isend_irecv``), computes
its queries against the chunk it holds, then waits. Every (query piece, key piece) pair is one
``attention_fwd`` call whose band is placed by ``diagonal_offset`` = (global row of the query
piece) − (global row of the key piece), so causal and sliding-window masks mean what they mean on
the full sequence; a pair the band hides entirely is skipped, a pair it leaves whole runs without
a band. Partial outputs are merged by lse in a fixed order (exact; a part with lse −inf is empty).

Backward: the same ring. ``attention_bwd`` with the *global* out and lse of the rank's queries
gives the exact partial dq, dk, dv of one pair, added at once into dq (which stays) and into the
accumulator of the chunk held (float32 for low precision); each chunk's dk/dv accumulator travels
with the ring behind its k/v, one step late, and arrives home after W sends. Sums run in ring
order: deterministic. Memory per rank is a fixed number of chunks (see the note above
``_ring_forward``): O(n), 1/W of the sequence. Only point-to-point ops move k/v and their gradients; the one
collective is an all-reduce of a few integers that checks the ranks agree on shapes and dtype.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import masks
from .._args import accumulate_dtype, require_tensor, resolve_scale
from .._op_table import OPS
from ..ops import _score_mods

__all__ = ["ring_attention", "split_sequence", "unsplit_sequence"]

LAYOUTS = ("contiguous", "zigzag")

_UNBOUNDED = 1 << 62  # a window side of -1, as a number the band arithmetic can use


# ---------------------------------------------------------------------------------------------
# Where each rank's rows sit in the sequence


def _pieces(rank: int, world_size: int, rows: int, layout: str) -> List[Tuple[int, int, int]]:
    """(local start, length, global start) of each contiguous piece of a rank's chunk."""
    if layout == "contiguous":
        return [(0, rows, rank * rows)]
    half = rows // 2
    return [(0, half, rank * half), (half, half, (2 * world_size - 1 - rank) * half)]


def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"selfattn.distributed: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def split_sequence(x: Tensor, world_size: int, rank: int, *, layout: str = "contiguous", dim: int = -2) -> Tensor:
    """Rank ``rank``'s chunk of the full sequence ``x`` (along ``dim``), as ``ring_attention``
    expects it: a view for "contiguous", two pieces concatenated (a copy) for "zigzag"."""
    _check_layout(layout)
    size = x.shape[dim]
    parts = world_size if layout == "contiguous" else 2 * world_size
    if size % parts != 0:
        raise ValueError(f"selfattn.distributed.split_sequence: the sequence length ({size}) must be divisible "
                         f"by {parts} for layout={layout!r} over {world_size} ranks")
    if not 0 <= rank < world_size:
        raise ValueError(f"selfattn.distributed.split_sequence: rank must be in [0, {world_size}), got {rank}")
    chunks = x.chunk(parts, dim)
    if layout == "contiguous":
        return chunks[rank]
    return torch.cat([chunks[rank], chunks[parts - 1 - rank]], dim)


def unsplit_sequence(parts: List[Tensor], *, layout: str = "contiguous", dim: int = -2) -> Tensor:
    """The full sequence from every rank's chunk, in rank order (what ``split_sequence`` undoes)."""
    _check_layout(layout)
    if layout == "contiguous":
        return torch.cat(parts, dim)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


# ---------------------------------------------------------------------------------------------
# One (query piece, key piece) pair: its band, or None when nothing in it is visible


def _pair_band(q_start: int, nq: int, k_start: int, nk: int, causal: bool, left: int, right: int):
    """The ops' (causal, window_left, window_right, diagonal_offset) for queries at global rows
    [q_start, q_start + nq) against keys at [k_start, k_start + nk); None when the band hides
    every pair, and no band at all (False, -1, -1, offset) when it hides none (the offset still
    places ALiBi's distances)."""
    offset = q_start - k_start  # local query i sits at local key position i + offset
    lo = _UNBOUNDED if left == -1 else left
    hi = 0 if causal else (_UNBOUNDED if right == -1 else right)
    # Row i sees local keys [i + offset - lo, i + offset + hi]; over all rows, a strip from
    # offset - lo to nq - 1 + offset + hi, which meets [0, nk) unless it lies wholly outside.
    if nq == 0 or nk == 0 or nq - 1 + offset + hi < 0 or offset - lo > nk - 1:
        return None
    if offset + nq - 1 - lo <= 0 and offset + hi >= nk - 1:
        return (False, -1, -1, offset)
    return (causal, left, right, offset)


def _pairs(rank: int, src: int, world_size: int, rows: int, layout: str, causal: bool, left: int, right: int):
    """[(query piece's local slice, key piece's local slice, band)] for the chunks of ``rank``
    (queries) and ``src`` (keys and values), the pairs the band hides left out."""
    pairs = []
    for q_local, nq, q_global in _pieces(rank, world_size, rows, layout):
        for k_local, nk, k_global in _pieces(src, world_size, rows, layout):
            band = _pair_band(q_global, nq, k_global, nk, causal, left, right)
            if band is not None:
                pairs.append((slice(q_local, q_local + nq), slice(k_local, k_local + nk), band))
    return pairs


# ---------------------------------------------------------------------------------------------
# The ring


class _Ring:
    """The ranks of ``group`` and the point-to-point exchange with the neighbours."""

    def __init__(self, group):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world_size)

    def exchange(self, tensors: List[Tensor], tag: int = 0) -> Tuple[List[Tensor], list]:
        """Posts sending ``tensors`` to the next rank and receiving their like from the previous
        one; returns the receive buffers and the requests to wait on. Tags tag, tag + 1, … keep
        two exchanges in flight at once (k/v and their gradients) apart on backends that match
        messages by tag."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(received)]
        return received, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    """Waits for the requests and drops them: a finished request still holds its tensors, which
    would otherwise stay alive until the variable is rebound (2 chunks more at the peak)."""
    for request in requests:
        request.wait()
    requests.clear()


def _merge(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """acc ← the attention over both parts' keys, from each part's output and lse, in place (``out``,
    the new part's, is scaled in place: it is a kernel output nobody else holds). A part with lse
    -inf (no visible key) weighs 0; a row empty in both stays 0 with lse -inf."""
    new_lse = torch.logaddexp(acc_lse, lse)
    finite = torch.where(new_lse == float("-inf"), 0.0, new_lse)  # exp(-inf - 0) = 0, never NaN
    acc_out.mul_(torch.exp(acc_lse - finite).unsqueeze(-1))
    acc_out.add_(out.mul_(torch.exp(lse - finite).unsqueeze(-1)))
    acc_lse.copy_(new_lse)


# Memory per rank, in chunks (one (B, H, n, D) tensor of the rank's n rows; float32 here). One process
# (world size 1) holds out, dq, dk and dv at the backward's peak: 4 chunks. A ring over all heads at once
# would hold, besides out and dq, the k/v chunk it works with (2, received) and that chunk's dk/dv
# accumulator (2; it travels, a rank's own arrives home last), during a step the next k/v chunk received
# while it computes (2), and one (query piece, key piece) pair's kernel outputs (1.5 for zigzag's half
# pieces, 3 for a contiguous chunk): 2 + 6 + pair, twice one process's count (measured: 8 chunks at W = 2,
# where step 0 works with the input k/v). So the ring runs once per group of ``kv_heads_per_pass`` kv
# heads (default 1, with their query heads): the ring's 6 + pair shrink to that group's share,
# g = kv_heads_per_pass / Hk, while out, dq and the final dk, dv (each group's accumulator is copied in
# when it arrives home) stay whole: 4 + (6 + pair)·g at most, e.g. 4.5 chunks of n rows for Hk = 16 — a
# constant times n = N / W, about half of one process's rise at W = 2. Within a pass, each buffer is freed as soon as it is done
# with (a sent chunk once its send completes, a pair's outputs once added, the old k/v once the next has
# arrived): the dk/dv accumulator is received before the step's compute (then the k/v exchange is posted,
# the old accumulator already gone), so a rank holds one accumulator, not a local partial besides one
# in flight each way; at a step's end, sending it and receiving the next hold one more. The ring is in
# lockstep anyway: the k/v of step s and the accumulator of step s come from the same neighbour, finished
# with its step s − 1.


def _head_passes(hq: int, hk: int, per_pass: int):
    """(query heads, kv heads) of each pass: kv heads [s, s + per_pass) with the query heads that read them."""
    group = hq // hk
    return [(slice(s * group, min(s + per_pass, hk) * group), slice(s, min(s + per_pass, hk)))
            for s in range(0, hk, per_pass)]


def _pass_scores(scores: dict, hq: slice) -> dict:
    """The score modifications of the query heads ``hq`` (slopes are per query head)."""
    slopes = scores.get("alibi_slopes")
    if slopes is None:
        return scores
    return {**scores, "alibi_slopes": slopes[hq] if slopes.dim() == 1 else slopes[:, hq]}


def _ring_forward(ring: _Ring, q, k, v, causal, scale, left, right, layout, per_pass, scores, sinks):
    acc_dtype = accumulate_dtype(q.dtype)
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=acc_dtype)
    lse = q.new_full(q.shape[:-1], float("-inf"), dtype=acc_dtype)
    for hq, hk in _head_passes(q.shape[1], k.shape[1], per_pass):
        _ring_forward_pass(ring, q[:, hq], k[:, hk], v[:, hk], out[:, hq], lse[:, hq], causal, scale, left, right,
                           layout, _pass_scores(scores, hq))
    if sinks is not None:
        # The sink enters once, here, merged as a part with lse sinks[h] and output 0.
        with_sink = torch.logaddexp(lse, sinks.to(acc_dtype).view(1, -1, 1))
        out.mul_(torch.exp(lse - with_sink).unsqueeze(-1))  # (a row with lse -inf: 0 · 0)
        lse = with_sink
    return out.to(q.dtype), lse


def _ring_forward_pass(ring: _Ring, q, k, v, out, lse, causal, scale, left, right, layout, scores):
    """One pass of the ring for some heads: their out and lse (views of the whole ones) merged in place."""
    rows = q.shape[-2]
    kv = [k.contiguous(), v.contiguous()]
    for step in range(ring.world_size):
        src = (ring.rank - step) % ring.world_size
        if step + 1 < ring.world_size:
            next_kv, requests = ring.exchange(kv)  # overlapped with this step's compute
        for qs, ks, (band_causal, wl, wr, offset) in _pairs(ring.rank, src, ring.world_size, rows, layout,
                                                             causal, left, right):
            part_out, part_lse = OPS["attention_fwd"].handle(
                q[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :], causal=band_causal, scale=scale,
                window_left=wl, window_right=wr, diagonal_offset=offset, **scores)
            _merge(out[..., qs, :], lse[..., qs], part_out, part_lse)
            del part_out, part_lse  # before the next pair's outputs exist
        if step + 1 < ring.world_size:
            _wait(requests)
            kv, next_kv = next_kv, None  # the chunk just used is freed (its send has completed)


def _ring_backward(ring: _Ring, grad_out, q, k, v, out, lse, causal, scale, left, right, layout, per_pass, scores):
    acc_dtype = accumulate_dtype(q.dtype)
    grad_q = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    passes = _head_passes(q.shape[1], k.shape[1], per_pass)
    if len(passes) == 1:  # the accumulators that arrive home are the gradients
        grad_k, grad_v = _ring_backward_pass(ring, grad_out, q, k, v, out, lse, grad_q, causal, scale, left, right,
                                             layout, scores)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    for hq, hk in passes:
        pass_k, pass_v = _ring_backward_pass(ring, grad_out[:, hq], q[:, hq], k[:, hk], v[:, hk], out[:, hq],
                                             lse[:, hq], grad_q[:, hq], causal, scale, left, right, layout,
                                             _pass_scores(scores, hq))
        grad_k[:, hk], grad_v[:, hk] = pass_k, pass_v
        del pass_k, pass_v
    return grad_q.to(q.dtype), grad_k, grad_v


def _ring_backward_pass(ring: _Ring, grad_out, q, k, v, out, lse, grad_q, causal, scale, left, right, layout,
                        scores):
    """One pass of the ring for some heads: adds into grad_q (a view of the whole one) in place and
    returns the heads' dk, dv (float32 for low precision)."""
    rows = q.shape[-2]
    acc_dtype = grad_q.dtype
    kv = [k.contiguous(), v.contiguous()]
    # The dk/dv accumulator of the chunk held: this rank's own at step 0; afterwards the one the
    # previous rank sent at the end of its step, with every contribution so far.
    grad_kv = [torch.zeros(k.shape, dtype=acc_dtype, device=k.device),
               torch.zeros(v.shape, dtype=acc_dtype, device=v.device)]
    grad_requests = []
    for step in range(ring.world_size):
        src = (ring.rank - step) % ring.world_size
        _wait(grad_requests)  # grad_kv has arrived; the accumulator sent last is freed
        if step + 1 < ring.world_size:
            next_kv, requests = ring.exchange(kv)  # overlapped with this step's compute
        for qs, ks, (band_causal, wl, wr, offset) in _pairs(ring.rank, src, ring.world_size, rows, layout,
                                                             causal, left, right):
            g_q, g_k, g_v = OPS["attention_bwd"].handle(
                grad_out[..., qs, :], q[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :], out[..., qs, :],
                lse[..., qs], causal=band_causal, scale=scale, window_left=wl, window_right=wr,
                diagonal_offset=offset, **scores)[:3]
            grad_q[..., qs, :] += g_q
            grad_kv[0][..., ks, :] += g_k
            grad_kv[1][..., ks, :] += g_v
            del g_q, g_k, g_v  # before the next pair's outputs exist
        if step + 1 < ring.world_size:
            _wait(requests)
            kv, next_kv = next_kv, None
        else:
            kv = None  # done with the last chunk before the last accumulator arrives
        # Pass the accumulator on (W sends: the last brings this rank's own home).
        grad_kv, grad_requests = ring.exchange(grad_kv, tag=2)
    _wait(grad_requests)
    return grad_kv[0], grad_kv[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, ring, causal, scale, left, right, layout, per_pass, scores):
        out, lse = _ring_forward(ring, q, k, v, causal, scale, left, right, layout, per_pass, scores, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.args = (ring, causal, scale, left, right, layout, per_pass, scores)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        ring, causal, scale, left, right, layout, per_pass, scores = ctx.args
        # lse includes the sink, so the blocks' P = exp(s - lse) are the final probabilities and
        # the kernels need no sink; its gradient is the rank's rows' share (as for every weight
        # under sequence parallelism: sum it over the group).
        if ring.world_size == 1:
            grads = OPS["attention_bwd"].handle(grad_out, q, k, v, out, lse, causal=causal, scale=scale,
                                                window_left=left, window_right=right, **scores)[:3]
        else:
            grads = _ring_backward(ring, grad_out, q, k, v, out, lse, causal, scale, left, right, layout, per_pass,
                                   scores)
        grad_sinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            delta = (grad_out.double() * out.double()).sum(-1)
            grad_sinks = -(torch.exp(sinks.double().view(1, -1, 1) - lse.double()) * delta).sum((0, 2))
            grad_sinks = grad_sinks.to(sinks.dtype)
        return (*grads, grad_sinks) + (None,) * 8


# ---------------------------------------------------------------------------------------------
# Checks: every rank must pass the same shapes and dtype, or the point-to-point ops would hang


def _agree_across_ranks(ring: _Ring, q: Tensor, k: Tensor, v: Tensor, per_pass: int) -> None:
    """One all-reduce of a few integers (max of each and of its negation): every rank learns
    whether all passed the same shapes and dtype, so every rank raises together — no hang."""
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    code = dtypes.index(q.dtype) if q.dtype in dtypes else len(dtypes)
    mine = torch.tensor([*q.shape, *k.shape, *v.shape, code, per_pass], dtype=torch.int64)
    both = torch.cat([mine, -mine])
    if dist.get_backend(ring.group) == "nccl":
        both = both.to(q.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=ring.group)
    high, low = both[: mine.numel()].cpu(), -both[mine.numel():].cpu()
    if torch.equal(high, low):
        return
    names = ["q"] * 4 + ["k"] * 4 + ["v"] * 4 + ["dtype", "kv_heads_per_pass"]
    dims = ["B", "H", "N", "D"] * 3 + ["", ""]
    differ = [f"{n} {d}".strip() for n, d, hi, lo in zip(names, dims, high.tolist(), low.tolist()) if hi != lo]
    raise ValueError(f"selfattn.distributed.ring_attention: every rank must pass chunks of the same shape and "
                     f"dtype (equal sequence chunks) and the same kv_heads_per_pass, but the ranks differ in "
                     f"{', '.join(differ)}; this rank has q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                     f"{q.dtype}, kv_heads_per_pass={per_pass}")


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: Optional[dist.ProcessGroup] = None,
                   causal: bool = False, scale: Optional[float] = None, layout: str = "contiguous",
                   window: Optional[tuple] = None, enable_gqa: bool = False, return_lse: bool = False,
                   check_ranks: bool = True, kv_heads_per_pass: Optional[int] = None, softcap: float = 0.0,
                   alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None):
    """Attention over a sequence split across the ranks of ``group``, as ``selfattn.attention``
    would compute it on the whole sequence.

    q (B, Hq, n, D), k (B, Hk, n, D), v (B, Hk, n, Dv): this rank's chunk of n rows (the same n on
    every rank; ``split_sequence`` cuts them). ``layout="contiguous"``: rank r holds global rows
    [r·n, (r+1)·n); ``"zigzag"``: pieces r and 2W−1−r of 2W (balanced work under ``causal``; n
    even). ``causal=True`` is global top-left causal (query i sees keys j <= i over the full
    sequence), ``window=(left, right)`` a global sliding window (-1 unbounded), ``enable_gqa``
    lets Hk divide Hq. Returns this rank's rows of the output, (B, Hq, n, Dv), differentiable in
    q, k and v; with ``return_lse`` also their lse (B, Hq, n), float32 (float64 for float64).

    The ring runs once per group of ``kv_heads_per_pass`` kv heads (default 1; with their query
    heads), so that what it holds beyond the output and the gradients is that group's share of
    a chunk: per rank about 4.5 chunks of n rows at the backward's peak for 16 heads, against 4
    for one process with the whole sequence (notes in the source). More heads per pass: fewer,
    larger kernel calls and messages, more memory (up to about 9.5 chunks with all heads).

    k/v and their gradients move only by point-to-point ops, overlapped with compute;
    ``check_ranks`` (default) first all-reduces a few integers so that ranks whose chunks differ
    in shape or dtype all raise instead of hanging. ``group=None`` is the default group; one rank
    alone computes plain attention.

    ``softcap``, ``alibi_slopes`` (distances between global positions) and ``sinks`` as in
    ``selfattn.attention``; the sink enters once, in the final merge. ``sinks.grad`` is this rank's
    rows' share: sum it over the group, as every weight's gradient under sequence parallelism.
    """
    if not dist.is_initialized():
        raise RuntimeError("selfattn.distributed.ring_attention: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError(f"selfattn.distributed.ring_attention: this process (global rank {dist.get_rank()}) is "
                         f"not a member of group; call it only on the group's ranks")
    _check_layout(layout)
    if not isinstance(causal, bool):
        raise TypeError(f"selfattn.distributed.ring_attention: causal must be a bool, got {type(causal).__name__}")
    left, right = masks.window_sides(window)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"selfattn.distributed.ring_attention: {name} must be a 4-D tensor (B, H, n, D), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if k.shape[-2] != q.shape[-2] or v.shape[-2] != q.shape[-2]:
        raise ValueError(f"selfattn.distributed.ring_attention: q, k and v must hold the same rows of the sequence "
                         f"(equal n), got {q.shape[-2]}, {k.shape[-2]} and {v.shape[-2]}")
    if not enable_gqa and q.shape[1] != k.shape[1]:
        raise ValueError(f"selfattn.distributed.ring_attention: q has {q.shape[1]} heads and k {k.shape[1]}: pass "
                         "enable_gqa=True for grouped-query attention (Hk dividing Hq)")
    if layout == "zigzag" and q.shape[-2] % 2 != 0:
        raise ValueError(f"selfattn.distributed.ring_attention: layout='zigzag' needs an even chunk length (two "
                         f"pieces per rank), got {q.shape[-2]}")
    if kv_heads_per_pass is None:
        kv_heads_per_pass = 1
    if isinstance(kv_heads_per_pass, bool) or not isinstance(kv_heads_per_pass, int) or kv_heads_per_pass < 1:
        raise ValueError(f"selfattn.distributed.ring_attention: kv_heads_per_pass must be a positive int or None, "
                         f"got {kv_heads_per_pass!r}")
    ring = _Ring(group)
    if check_ranks and ring.world_size > 1:
        _agree_across_ranks(ring, q, k, v, kv_heads_per_pass)
    scale = resolve_scale(scale, q.shape[-1])
    if ring.world_size == 1:
        # The whole sequence is here: the layouts coincide (zigzag's two pieces are in order), and
        # with no ring buffers one pass over all heads holds no more than several.
        layout, kv_heads_per_pass = "contiguous", k.shape[1]
    scores = _score_mods(softcap, alibi_slopes, None)  # (the sinks: in the merge, not per block)
    if sinks is not None:
        require_tensor(sinks, "sinks")
        if sinks.dim() != 1 or sinks.shape[0] != q.shape[1]:
            raise ValueError(f"selfattn.distributed.ring_attention: sinks must have shape (Hq,) = [{q.shape[1]}], "
                             f"got {list(sinks.shape)}")
    out, lse = _RingAttention.apply(q, k, v, sinks, ring, causal, scale, left, right, layout, kv_heads_per_pass,
                                    scores)
    return (out, lse) if return_lse else out
