"""Dropout's overhead: selfattn and SDPA at (4, 8, 1024, 64) float32, p = 0.1 vs p = 0, forward and
forward+backward; interleaved rounds, per-round ratios, median [min-max] of ROUNDS."""
import statistics, sys, time
import torch, torch.nn.functional as F
import selfattn

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 9
torch.manual_seed(0)
q, k, v = (torch.randn(4, 8, 1024, 64, requires_grad=True) for _ in range(3))
g = torch.randn(4, 8, 1024, 64)

def sa(p): return lambda: selfattn.attention(q, k, v, dropout_p=p)
def sdpa(p): return lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p)

def timed(fn, backward):
    t0 = time.perf_counter()
    if backward:
        out = fn(); out.backward(g)
    else:
        with torch.no_grad(): fn()
    return time.perf_counter() - t0

impls = {"selfattn p=0": sa(0.0), "selfattn p=0.1": sa(0.1), "sdpa p=0": sdpa(0.0), "sdpa p=0.1": sdpa(0.1)}
for backward in (False, True):
    for fn in impls.values(): timed(fn, backward)  # warm-up
    times = {n: [] for n in impls}
    for _ in range(ROUNDS):
        for n, fn in impls.items():
            times[n].append(timed(fn, backward))
    label = "fwd+bwd" if backward else "fwd"
    for n in impls:
        print(f"{label:8s} {n:16s} median {statistics.median(times[n])*1e3:8.1f} ms  [{min(times[n])*1e3:.1f}-{max(times[n])*1e3:.1f}]")
    for base in ("selfattn", "sdpa"):
        r = [a / b for a, b in zip(times[f"{base} p=0.1"], times[f"{base} p=0"])]
        print(f"{label:8s} {base} p=0.1 / p=0: median {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]")
    r = [a / b for a, b in zip(times["selfattn p=0.1"], times["sdpa p=0.1"])]
    print(f"{label:8s} selfattn p=0.1 / sdpa p=0.1: median {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]")
