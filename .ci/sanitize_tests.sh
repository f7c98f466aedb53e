#!/usr/bin/env bash
# The CPU ops' tests under AddressSanitizer and UndefinedBehaviorSanitizer:
#
#   bash .ci/sanitize_tests.sh          # a few minutes on 2 cores, most of it the build
#
# JIT-builds csrc/ (CPU only) with SELFATTN_SANITIZE=1 in a cache folder of its own, then runs
# the tests with the sanitizer runtime preloaded (Python itself is not instrumented). The first
# report stops the process; any report, or any failing test, fails the script. (The CUDA
# kernels' counterpart is compute-sanitizer on scripts/sanitize_case.py, on a GPU.)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PYTHON=${PYTHON:-python}
LOG=${SANITIZE_LOG:-$(mktemp -t selfattn-sanitize.XXXXXX.log)}

libasan=$(gcc -print-file-name=libasan.so)
if [[ ! -e $libasan ]]; then
  echo "sanitize_tests: needs gcc's libasan.so (gcc -print-file-name=libasan.so says: $libasan)" >&2
  exit 2
fi

export SELFATTN_JIT=1 SELFATTN_SANITIZE=1 SELFATTN_CUDA=0
export MAX_JOBS=${MAX_JOBS:-2}
# What tests/test_build.py checks the build against, should it be selected: this JIT build.
export SELFATTN_EXPECT_BUILD=jit SELFATTN_EXPECT_CUDA=0
unset SELFATTN_TEST_EMULATION
# CPython does not free everything at exit by design: leaks are not reported.
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# libstdc++ too: ASan intercepts C++ throws, and finds the real __cxa_throw only if libstdc++ is
# loaded when it starts (python is a C program).
export LD_PRELOAD="$libasan $(gcc -print-file-name=libstdc++.so)${LD_PRELOAD:+ $LD_PRELOAD}"

echo "sanitize_tests: building (the compiler runs with the sanitizer runtime preloaded too)"
$PYTHON -c "import selfattn; print(selfattn.build_info())" 2>&1 | tee "$LOG"
grep -q "sanitizers address+undefined" "$LOG" || { echo "sanitize_tests: the sanitizer build was not loaded" >&2; exit 1; }
echo "sanitize_tests: build ready after $((SECONDS - start)) s"

# Every forward and backward test of the CPU ops (all dtypes, odd shapes, strided views, the
# fused layer, opcheck, float64 gradcheck) and the bad-input and edge-size tests: about half a
# minute here. Not torch.compile: its time goes to compiling generated code, not to our library.
# test_dispatch.py runs every copy of the CPU kernels (DEFAULT, AVX2, AVX512) this CPU can run;
# not its fresh-process test, which would load the sanitizer build again per process.
tests=(tests/test_attention.py tests/test_self_attention.py tests/test_inputs.py tests/test_ops.py
       tests/test_bad_inputs.py tests/test_masks.py tests/test_dispatch.py)
set +e
# --capture=sys: a report is written to file descriptor 2, which must not be a capture file.
$PYTHON -m pytest -q -p no:cacheprovider --capture=sys "${tests[@]}" -k "not compile and not follows_aten" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
set -e

# A report ends the process; pytest's own exit code cannot tell that from a failed test.
if grep -qE "Sanitizer|runtime error:" "$LOG"; then
  echo "sanitize_tests: FAILED, sanitizer report in $LOG" >&2
  exit 1
fi
if (( rc != 0 )); then
  echo "sanitize_tests: FAILED, pytest exit code $rc ($LOG)" >&2
  exit "$rc"
fi
echo "sanitize_tests: ok in $((SECONDS - start)) s"
