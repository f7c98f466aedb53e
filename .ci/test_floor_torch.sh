#!/usr/bin/env bash
# The oldest torch selfattn supports (TORCH_FLOOR in selfattn/_settings.py): the README's install
# command builds against it, and the tests marked `floor` pass (attention, masks, GQA, varlen, the
# layer, autograd, torch.compile: CPU only).
#
#   bash .ci/test_floor_torch.sh     # 2 idle cores: torch 3.5-5.5 min (once), build 3.5, tests 1
#
# torch 2.6.0 from PyPI, as most users have it (the CUDA 12.4 build with its nvidia-* wheels,
# ~3.5 GB), and setuptools at requirements.txt's floor, in a venv of their own
# (SELFATTN_FLOOR_DIR/venv, default $TMPDIR/selfattn-floor; kept and reused): not over this
# Python's packages, whose torch differs. The checkout's files are copied to SELFATTN_FLOOR_DIR/src
# and installed from there, so the editable install's selfattn/_C*.so lands in the copy and the
# checkout's own build is left alone. Where the CUDA toolkit's major version differs from torch
# 2.6's CUDA 12 (CI's nvcc 13.0), the build must say that it builds the CPU kernels only, which is
# checked here; with a CUDA 12 toolkit SELFATTN_CUDA=0 keeps the job CPU-only.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PYTHON=${PYTHON:-python}
FLOOR_TORCH=2.6.0
FLOOR_SETUPTOOLS=64.0.3  # requirements.txt's floor (its last patch release)
work=${SELFATTN_FLOOR_DIR:-${TMPDIR:-/tmp}/selfattn-floor}
env=$work/venv
src=$work/src
mkdir -p "$work"

if ! "$env/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$FLOOR_TORCH')" 2>/dev/null; then
  rm -rf "$env"
  "$PYTHON" -m venv "$env"
  # No pip cache: the wheels are installed once into the kept venv, and would take 3.5 GB more.
  # (numpy with torch, which warns on import without it)
  "$env/bin/python" -m pip install -q --no-cache-dir "torch==$FLOOR_TORCH" "setuptools==$FLOOR_SETUPTOOLS" numpy
fi
"$env/bin/python" -c "import torch, setuptools; print('test_floor_torch: torch', torch.__version__, '| CUDA', torch.version.cuda, '| setuptools', setuptools.__version__)"
echo "test_floor_torch: torch ready after $((SECONDS - start)) s"

# The checkout's files (tracked, and untracked ones git does not ignore) replace the copy's; its
# build/ stays, so that a rerun recompiles only what changed.
mkdir -p "$src"
find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -C "$src" -xf -
cd "$src"

# The toolkit the build would find (as selfattn/_settings.py looks: CUDA_HOME, nvcc on PATH,
# /usr/local/cuda) and its major version against torch's CUDA.
nvcc=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
nvcc=${nvcc:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
toolkit_major=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p' || true)
torch_major=$("$env/bin/python" -c "import torch; print((torch.version.cuda or '').split('.')[0])")
expect_cpu_only=""
unset SELFATTN_JIT SELFATTN_SANITIZE SELFATTN_TEST_EMULATION SELFATTN_CUDA
if [[ -n $toolkit_major && -n $torch_major && $toolkit_major != "$torch_major" ]]; then
  expect_cpu_only="selfattn: building the CPU kernels only: the CUDA toolkit at"
else
  export SELFATTN_CUDA=0
fi
export MAX_JOBS=${MAX_JOBS:-2}

# The README's install command; -v shows what setup.py says (pip hides it otherwise).
log=$work/build.log
if ! ("$env/bin/python" -m pip install -q -r requirements.txt &&
      "$env/bin/python" -m pip install -v --no-build-isolation -e .) >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "test_floor_torch: the README's install command failed against torch $FLOOR_TORCH (log: $log)" >&2
  exit 1
fi
grep -E "^ *selfattn: " "$log" | sed 's/^ *//' || true
if [[ -n $expect_cpu_only ]] && ! grep -q "$expect_cpu_only" "$log"; then
  echo "test_floor_torch: CUDA toolkit $toolkit_major against torch's CUDA $torch_major, but the build did" \
       "not say it builds the CPU kernels only (log: $log)" >&2
  exit 1
fi
echo "test_floor_torch: built after $((SECONDS - start)) s"

# Against that build (compiled, no CUDA), the tests marked `floor`.
export SELFATTN_EXPECT_BUILD=compiled SELFATTN_EXPECT_CUDA=0
"$env/bin/python" -m pytest -q -p no:cacheprovider -m floor
echo "test_floor_torch: ok in $((SECONDS - start)) s"
