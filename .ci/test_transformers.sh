#!/usr/bin/env bash
# The Hugging Face transformers integration's tests (tests/test_transformers.py) against
# transformers 4.57.x and the newest 5.x the package index serves.
#
# Each version gets a virtual environment of its own that sees this Python's packages
# (--system-site-packages: torch, pytest, selfattn) and adds only transformers and what it needs
# on top, so this Python's own packages are left as they are; torch is pinned to the installed
# version and checked afterwards, never installed, upgraded or removed. The environments are kept
# (SELFATTN_TRANSFORMERS_ENVS, default $TMPDIR/selfattn-transformers) and reused by the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
envs=${SELFATTN_TRANSFORMERS_ENVS:-${TMPDIR:-/tmp}/selfattn-transformers}
mkdir -p "$envs"
torch_version=$(python -c "import torch; print(torch.__version__)")
echo "torch==${torch_version%%+*}" > "$envs/constraints.txt"

run_against() {  # $1: a name for the environment, $2: the transformers requirement
  local env="$envs/$1"
  [ -x "$env/bin/python" ] || python -m venv --system-site-packages "$env"
  "$env/bin/python" -m pip install -q --upgrade --upgrade-strategy only-if-needed \
    -c "$envs/constraints.txt" "$2"
  local now
  now=$("$env/bin/python" -c "import torch; print(torch.__version__)")
  if [ "$now" != "$torch_version" ]; then
    echo "test_transformers: installing $2 changed torch ($torch_version -> $now)" >&2
    exit 1
  fi
  echo "test_transformers: transformers $("$env/bin/python" -c "import transformers; print(transformers.__version__)")"
  "$env/bin/python" -m pytest -q -p no:cacheprovider tests/test_transformers.py
}

run_against transformers-4.57 "transformers==4.57.*"
run_against transformers-5 "transformers>=5"
echo "test_transformers: done in $((SECONDS - start)) s"
