#!/usr/bin/env bash
# Style checks, in seconds: ruff (Python lint and import order; configured in pyproject.toml) and
# clang-format (csrc/ and tests/cuda_emulation/; configured in .clang-format). Versions pinned
# so that CI and a developer's machine agree on the formatting.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "ruff==0.17.6" "clang-format==23.1.5"
python -m ruff check .
git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cuda_emulation/*.h' 'tests/cuda_emulation/*.cpp' \
  | xargs clang-format --dry-run --Werror
echo "style: ruff and clang-format clean"
