"""Which tensors are alive at the peak of one ring-attention call (forward + backward), and who made them.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=W scripts/ring_live_buffers.py [N [H [P]]]

Same problem as ``scripts/ring_measure.py`` (zigzag, causal, float32, B = 1, H heads, D = 64, N / W rows
per rank, P kv heads per pass, default 1). A TorchDispatchMode records the storage of every tensor an
op returns during the call (the receive buffers, the accumulators, each kernel call's outputs) with
the op and the line of
``selfattn/distributed/ring.py`` that ran it; after each op it sums the storages still alive and keeps
the list at the largest sum. Rank 0 prints that list in units of one chunk (one (B, H, N / W, D) float32
tensor). Not counted: q, k, v and the output gradient (made before the call), and what the kernels
allocate and free inside one call (peak RSS, ring_measure.py, sees that).
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import selfattn.distributed as sd
from ring_measure import B, D, setup  # (this script's folder is on sys.path)


def _where() -> str:
    """The innermost line of ring.py on the stack (or of the caller, when ring.py is not on it)."""
    frames = traceback.extract_stack()
    for frame in reversed(frames):
        if frame.filename.endswith("ring.py"):
            return f"ring.py:{frame.lineno} {frame.line.strip()[:70]}"
    return "outside ring.py"


class _LiveStorages(TorchDispatchMode):
    def __init__(self, inputs):
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}  # made before the call: not counted
        self.live = {}  # storage key -> (weak ref, bytes, label)
        self.peak_bytes, self.peak = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        label = None
        for t in outputs:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.inputs and (key not in self.live or self.live[key][0].expired()):
                    label = label or f"{func.__name__}  @ {_where()}"
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes(), label)
        self.live = {k: e for k, e in self.live.items() if not e[0].expired()}
        total = sum(e[1] for e in self.live.values())
        if total > self.peak_bytes:
            self.peak_bytes, self.peak = total, [(e[1], e[2]) for e in self.live.values()]
        return result


def main():
    rank, world, n_total, H, per_pass, rows, q, k, v, grad = setup(4096)
    chunk = B * H * rows * D * 4
    mode = _LiveStorages([q, k, v, grad])
    with mode:
        sd.ring_attention(q, k, v, causal=True, layout="zigzag", kv_heads_per_pass=per_pass).backward(grad)
    dist.barrier()
    if rank == 0:
        print(f"N = {n_total}, H = {H}, world size {world}, kv heads per pass {per_pass or 1}: one chunk = {chunk / 2**20:.2f} MiB; tensors alive at "
              f"the peak, {mode.peak_bytes / chunk:.2f} chunks ({mode.peak_bytes / 2**20:.1f} MiB):")
        for nbytes, label in sorted(mode.peak, reverse=True):
            if nbytes >= chunk / 64:
                print(f"  {nbytes / chunk:5.2f}  {label}")
        small = sum(n for n, _ in mode.peak if n < chunk / 64)
        print(f"  {small / chunk:5.2f}  (smaller tensors together)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
