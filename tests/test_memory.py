"""No N x N matrix is ever materialized: peak memory of forward + backward at N = 16384, measured in
a fresh process (an N x N float32 matrix there is 1 GiB)."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import selfattn

    def resident_mib():
        # (VmRSS, VmHWM): the resident set now, and its peak since the last reset (or since start).
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

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
        leaves = (q, k, v)
    else:
        layer = selfattn.SelfAttention(64, 64, num_heads=1, bias=True)
        x = torch.randn(1, n, 64, requires_grad=True)
        run = lambda: layer(x)
        leaves = (x, layer.in_proj_weight, layer.in_proj_bias)
    grad = torch.randn(1, 1, n, 64) if kind == "attention" else torch.randn(1, n, 64)
    resettable = reset_peak()
    rss_before, peak_before = resident_mib()
    out = run()
    out.backward(grad.view_as(out))
    _, peak_after = resident_mib()
    # What the run leaves allocated (its output and the gradients): the growth must show it.
    held_mib = sum(t.nbytes for t in (out, *(leaf.grad for leaf in leaves))) / 2**20
    print(json.dumps({"resettable": resettable, "rss_before_mib": rss_before, "peak_before_mib": peak_before,
                      "peak_after_mib": peak_after, "held_mib": held_mib,
                      "finite": bool(torch.isfinite(out).all())}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("kind", ["attention", "layer"])
def test_forward_backward_peak_memory_at_16k(kind):
    result = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    if stats["resettable"]:
        # The reset took: the peak starts again from the resident set of the moment.
        assert stats["peak_before_mib"] - stats["rss_before_mib"] < 1, f"the peak reset did not take: {stats}"
    # Growth from the resident set before the run, so never less than the run's own: where the reset
    # is refused, an earlier peak (the imports) counts too and can only make the check stricter.
    growth = stats["peak_after_mib"] - stats["rss_before_mib"]
    print(f"{kind}: peak RSS growth {growth:.0f} MiB over {stats['rss_before_mib']:.0f} MiB resident "
          f"before the run (peak reset: {stats['resettable']})")
    assert stats["finite"]
    assert growth >= stats["held_mib"], f"growth {growth:.0f} MiB misses the {stats['held_mib']:.0f} MiB the run holds"
    unreset = "" if stats["resettable"] else (
        f"; the peak reset was refused, so this counts a peak of {stats['peak_before_mib']:.0f} MiB from before the run")
    assert growth < 256, f"peak RSS grew by {growth:.0f} MiB (an N x N float32 matrix is 1024 MiB){unreset}"
