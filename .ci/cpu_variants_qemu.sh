#!/usr/bin/env bash
# The built library on CPUs this machine is not: imports it and runs a small forward + backward
# against float64 under qemu's user-mode emulation of an AVX2 CPU without AVX-512 (Haswell) and
# of an x86-64 CPU without AVX (Nehalem), where the DEFAULT and AVX2 copies of the CPU kernels
# must be chosen, and no instruction outside them may run (a SIGILL would end the process).
#
#   bash .ci/cpu_variants_qemu.sh       # needs qemu-x86_64 (Debian: qemu-user); minutes
#
# Not in .ci/run (CI's machine has no qemu-user): run it by hand after changing the dispatch.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-x86_64 >/dev/null || { echo "cpu_variants_qemu: needs qemu-x86_64 (apt-get install qemu-user)" >&2; exit 2; }
PYTHON=$(python -c "import sys; print(sys.executable)")

check='
import os, torch, selfattn
torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 70, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
out = selfattn.attention(q, k, v, causal=True)
grads = torch.autograd.grad(out.sum(), (q, k, v))
q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
ref_grads = torch.autograd.grad(ref.sum(), (q64, k64, v64))
error = max(float((a - e).abs().max()) for a, e in zip((out,) + grads, (ref,) + ref_grads))
assert error < 1e-10, error
try:
    torch.ops.selfattn._cpu_capability("avx512")
    refused = "no"
except RuntimeError as e:
    refused = "yes" if "this CPU lacks" in str(e) else str(e)
print("chosen", selfattn.build_info().cpu_capability, "| aten", torch.backends.cpu.get_cpu_capability(),
      "| env", os.environ.get("SELFATTN_CPU_CAPABILITY", "-"), "| error", error, "| avx512 refused", refused)
'

status=0
run() {  # cpu, expected copy, extra environment
  local cpu=$1 expected=$2
  shift 2
  local out
  if out=$(env "$@" qemu-x86_64 -cpu "$cpu" "$PYTHON" -c "$check" 2>&1); then
    echo "$cpu $*: ${out##*$'\n'}"
    [[ ${out##*$'\n'} == "chosen $expected "* && $out == *"avx512 refused yes"* ]] || { echo "  expected $expected" >&2; status=1; }
  else
    echo "$cpu $*: FAILED" >&2; echo "$out" | tail -20 >&2; status=1
  fi
}
run Haswell AVX2
run Haswell AVX2 SELFATTN_CPU_CAPABILITY=avx512   # asks for what the CPU lacks: warned, AVX2
run Haswell DEFAULT ATEN_CPU_CAPABILITY=default
run Nehalem DEFAULT
exit $status
