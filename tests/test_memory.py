"""No N x N matrix is ever materialized: peak memory of forward + backward at N = 16384, measured in
a fresh process (an N x N float32 matrix there is 1 GiB)."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    import selfattn

    def peak_rss_mib():
        # VmHWM: the peak resident set since the last reset (or since start).
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def reset_peak():
        try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    kind = sys.argv[1]
    torch.manual_seed(0)
    n = 16384
    if kind == "attention":
        q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
        run = lambda: selfattn.attention(q, k, v, causal=False)
    else:
        layer = selfattn.SelfAttention(64, 64, num_heads=1, bias=True)
        x = torch.randn(1, n, 64, requires_grad=True)
        run = lambda: layer(x)
    grad = torch.randn(1, 1, n, 64) if kind == "attention" else torch.randn(1, n, 64)
    resettable = reset_peak()
    baseline = peak_rss_mib()
    out = run()
    out.backward(grad.view_as(out))
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak_rss_mib(), "resettable": resettable,
                      "finite": bool(torch.isfinite(out).all())}))
""")


@pytest.mark.parametrize("kind", ["attention", "layer"])
def test_forward_backward_peak_memory_at_16k(kind):
    result = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    growth = stats["peak_mib"] - stats["baseline_mib"]
    print(f"{kind}: peak RSS growth {growth:.0f} MiB over a post-import baseline of {stats['baseline_mib']:.0f} MiB")
    assert stats["finite"]
    assert growth < 256, f"peak RSS grew by {growth:.0f} MiB (an N x N float32 matrix is 1024 MiB)"
