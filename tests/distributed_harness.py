"""Running a test body on W processes (gloo on the loopback address), in bounded time.

``run_ranks(body, world_size, *args)`` spawns the ranks (OMP_NUM_THREADS=1 each: four spinning
OpenMP ranks on two cores time out otherwise), initialises a gloo group with a timeout (a peer
that hangs makes the others raise), runs ``body(rank, world_size, *args)`` on each, destroys the
group, and returns the ranks' results in rank order. An exception on any rank, or a rank still
running after ``timeout`` seconds (all are then killed), fails the caller with the ranks'
tracebacks. ``body`` must be a module-level function (spawn pickles it by name).

A suite runs many cases in one spawn (starting a rank costs seconds on these machines): a body
returns {case: None or an error string}, and ``case_results`` turns one failure into one
pytest failure per case.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, results, body, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
        try:
            results.put((rank, "ok", body(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: B902 - reported to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(body, world_size: int, *args, timeout: float = 120.0):
    """body(rank, world_size, *args) on ``world_size`` gloo ranks; their return values in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before they import torch
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, results, body, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    deadline = time.monotonic() + timeout
    outcome = {}
    try:
        while len(outcome) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{world_size} ranks: no result from ranks "
                                   f"{sorted(set(range(world_size)) - set(outcome))} after {timeout:.0f} s")
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
                outcome[rank] = (status, value)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outcome and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)  # let a last message through the queue
                    while not results.empty():
                        rank, status, value = results.get()
                        outcome[rank] = (status, value)
                    if any(r not in outcome for r in dead):
                        raise RuntimeError(f"ranks {dead} died (exit codes "
                                           f"{[procs[r].exitcode for r in dead]}) without a result") from None
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"rank {r}:\n{value}" for r, (status, value) in sorted(outcome.items()) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [outcome[r][1] for r in range(world_size)]


def run_cases(cases, *args):
    """{name: None or 'error text'} from calling each (name, fn) of ``cases`` with ``args``: one
    failing case does not stop the others (each rank must still take part in every case's
    collectives, so a failing case should fail on every rank, or leave nothing in flight)."""
    results = {}
    for name, fn in cases:
        try:
            fn(*args)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per case
            results[name] = traceback.format_exc()
    return results


def case_results(per_rank, name: str):
    """Raises if case ``name`` failed on some rank."""
    errors = [f"rank {r}:\n{res[name]}" for r, res in enumerate(per_rank) if res.get(name) is not None]
    if errors:
        raise AssertionError("\n".join(errors))
