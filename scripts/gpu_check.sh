#!/usr/bin/env bash
# The GPU check: run once on a machine with a CUDA GPU, from a fresh copy of the repository,
# with torch (a CUDA build), nvcc and ninja installed and no network.
#
#   bash scripts/gpu_check.sh            # a budget of GPU_CHECK_BUDGET_S = 470 s in all
#
# Not yet run on a GPU: the kernels are compiled for sm_80/sm_90 and tested in the CPU emulation
# (tests/test_cuda_emulation.py). The overall budget and the step caps below are allowances, not
# measured durations.
#
# Steps, each with its own timeout inside one overall budget (a hang costs its step, not the
# run), each reported and none stopping the others:
#   1. environment (nvidia-smi, torch, nvcc)
#   2. build for this GPU's arch only (pip editable install, or setup.py build_ext --inplace)
#   3. pytest tests/test_cuda.py tests/test_cuda_jvp.py (test_decode: the split-K decoding kernel)
#   4. benchmarks, short timings (--quick: 2 ms samples, 7 interleaved rounds, no memory):
#      a. FlashAttention's shapes (--sweep fa: bf16, batch·seqlen = 16384, heads·head_dim = 2048,
#         head_dim 64 and 128, seqlen 512..8192, causal and not), forward and backward,
#         selfattn next to SDPA with each backend forced in turn (flash, efficient, cuDNN);
#      b. the fused layer (projections + attention) in bf16 against F.linear + SDPA;
#      c. decoding (Nq = 1, Hq = 32, Hk = 8, D = 128, bf16, long caches): the split-K kernel against
#         SDPA and selfattn's ordinary kernels (--sweep decode --device cuda);
#   5. compute-sanitizer memcheck and racecheck on scripts/sanitize_case.py
#   6. the CPU test suite, if time is left
# and prints a summary last, ending with the benchmarks' TFLOP/s tables. Logs go to
# $GPU_CHECK_LOGS (default gpu_check_logs/).
set -u

BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # the whole run, seconds
START=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
LOGS=${GPU_CHECK_LOGS:-$ROOT/gpu_check_logs}
mkdir -p "$LOGS"
PYTHON=${PYTHON:-python}
PIP=${PIP:-"$PYTHON -m pip"}  # (PIP=false skips the editable install, e.g. for a dry run)

declare -a SUMMARY=()
note() { SUMMARY+=("$(printf '%-22s %s' "$1" "$2")"); }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
# Seconds a step may take: its own cap, but never eating the time reserved for the steps after it.
allow() {  # allow CAP RESERVE
  local t=$(( $(left) - $2 ))
  (( t > $1 )) && t=$1
  (( t < 10 )) && t=10  # over budget: still a short try, so the step reports rather than vanishes
  echo $t
}
banner() { echo; echo "=== [$(elapsed)s] $*"; }

# ---------------------------------------------------------------------------------------------
banner "1. environment"
nvidia-smi 2>&1 | head -20
$PYTHON - <<'EOF' 2>&1
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPUs", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
EOF
command -v nvcc >/dev/null && nvcc --version | tail -2
command -v ninja >/dev/null && echo "ninja $(ninja --version)"
ARCH=$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
if [[ -z "$ARCH" ]]; then
  note "GPU" "NONE VISIBLE: torch.cuda.is_available() is False"
  ARCH=9.0
else
  note "GPU" "$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null) (sm_${ARCH/./})"
fi

# ---------------------------------------------------------------------------------------------
banner "2. build for sm_${ARCH/./} only"
BUILD_OK=0
t0=$(date +%s)
export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16} SELFATTN_CUDA=1
# --no-index/--no-deps: no network here, and torch is installed already.
timeout "$(allow 300 170)" $PIP install --no-build-isolation --no-deps --no-index -e . \
  >"$LOGS/build.log" 2>&1
rc=$?
# The library must sit in the tree (an editable build puts it there): without it, `import
# selfattn` would start a JIT build of its own.
if (( rc != 0 )) || ! ls selfattn/_C*.so >/dev/null 2>&1; then
  echo "pip install: rc $rc, library in tree: $(ls selfattn/_C*.so 2>/dev/null || echo none)"
  tail -5 "$LOGS/build.log"
  echo "falling back to: setup.py build_ext --inplace"
  timeout "$(allow 300 170)" $PYTHON setup.py build_ext --inplace >>"$LOGS/build.log" 2>&1
  rc=$?
fi
BUILD_S=$(( $(date +%s) - t0 ))
INFO=$($PYTHON -c "import selfattn; print(selfattn.build_info())" 2>&1 | tail -1)
echo "$INFO"
if (( rc == 0 )) && [[ "$INFO" == *"CUDA "[0-9]* ]]; then
  BUILD_OK=1
  note "build" "ok in ${BUILD_S}s: $INFO"
else
  tail -30 "$LOGS/build.log"
  note "build" "FAILED (rc $rc, ${BUILD_S}s): $INFO -- see $LOGS/build.log"
fi

# ---------------------------------------------------------------------------------------------
pytest_line() {  # the "N passed, M failed ... in Xs" line of a pytest log
  grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$1" | tail -1 | sed -E 's/=//g; s/^ +| +$//g'
}

banner "3. pytest tests/test_cuda.py tests/test_cuda_jvp.py"
if (( BUILD_OK )); then
  timeout "$(allow 180 260)" $PYTHON -m pytest -q -rfE -p no:cacheprovider tests/test_cuda.py tests/test_cuda_jvp.py \
    >"$LOGS/test_cuda.log" 2>&1
  rc=$?
  tail -25 "$LOGS/test_cuda.log"
  line=$(pytest_line "$LOGS/test_cuda.log")
  (( rc == 124 )) && line="TIMED OUT after $(elapsed)s ${line}"
  note "tests/test_cuda.py" "$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc $rc)"): ${line:-no summary}"
else
  note "tests/test_cuda.py" "not run (no build)"
fi

# ---------------------------------------------------------------------------------------------
banner "4. benchmarks"
declare -a TABLES=()
bench_step() {  # bench_step NAME CAP RESERVE ARGS...: one benchmark run, its TFLOP/s table kept
  local name=$1 cap=$2 reserve=$3
  shift 3
  local log="$LOGS/bench_$name.log"
  timeout "$(allow "$cap" "$reserve")" $PYTHON -m selfattn.bench --device cuda --quick --no-memory --no-plot \
    --json "$LOGS/bench_$name.json" "$@" >"$log" 2>&1
  local rc=$?
  tail -25 "$log"
  if (( rc == 0 )); then
    note "bench $name" "ok -- $log"
    # The last section of the report: every implementation's TFLOP/s, one line per case.
    TABLES+=("" "--- bench $name ($*)")
    while IFS= read -r l; do TABLES+=("$l"); done < <(sed -n '/^## Summary: [GT]FLOP\/s/,$p' "$log" | grep -v '^\s*$')
  else
    note "bench $name" "$([[ $rc == 124 ]] && echo "TIMED OUT" || echo "FAILED (rc $rc)"): $(tail -1 "$log")"
  fi
}
if (( ! BUILD_OK )); then
  note "benchmarks" "not run (no build)"
else
  # 40 timing groups of 6 contestants (selfattn, SDPA default and forced flash / efficient /
  # cuDNN, the GEMM), each warmed up for 40 ms; capped at 150 s.
  bench_step fa 150 150 --sweep fa
  # The fused layer at FlashAttention's token count, head dims 128 and 64; capped at 60 s.
  bench_step layer 60 110 --level layer --dtype bfloat16 --impls linear+sdpa --modes fwd,fwd+bwd \
    --shapes 8x2048x2048x16,8x2048x2048x32
  # The masked variants (key padding, varlen, GQA, sliding window, random mask), float32, each
  # against selfattn without it and SDPA given the same inputs; capped at 60 s.
  bench_step masks 60 50 --sweep masks
  # Decoding: its own runner (selfattn/bench/decode.py, its own options); capped at 45 s.
  log="$LOGS/bench_decode.log"
  timeout "$(allow 45 40)" $PYTHON -m selfattn.bench --sweep decode --device cuda --dtype bfloat16 --rounds 7 \
    --cases 1x8192,1x32768,8x4096 >"$log" 2>&1
  rc=$?
  tail -20 "$log"
  if (( rc == 0 )); then
    note "bench decode" "ok -- $log"
    TABLES+=("" "--- bench decode (bf16, Nq = 1)")
    while IFS= read -r l; do TABLES+=("$l"); done < <(sed -n '/^| B | Nk/,$p' "$log")  # the final table
  else
    note "bench decode" "$([[ $rc == 124 ]] && echo "TIMED OUT" || echo "FAILED (rc $rc)"): $(tail -1 "$log")"
  fi
fi

# ---------------------------------------------------------------------------------------------
banner "5. compute-sanitizer"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
for tool in memcheck racecheck; do
  if (( ! BUILD_OK )); then
    note "sanitizer $tool" "not run (no build)"
    continue
  fi
  if [[ -z "$SANITIZER" ]]; then
    note "sanitizer $tool" "not run: compute-sanitizer not found"
    continue
  fi
  reserve=$([[ $tool == memcheck ]] && echo 60 || echo 10)
  # No caching allocator: each tensor its own cudaMalloc, so an access past a tensor's end is
  # caught by memcheck instead of landing in a neighbouring block of the pool. PYTHONPATH: the
  # tree's selfattn, built in place (a script's own folder, not the root, starts its sys.path).
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(allow 120 $reserve)" "$SANITIZER" --tool "$tool" \
    --error-exitcode 99 $PYTHON scripts/sanitize_case.py >"$LOGS/sanitizer_$tool.log" 2>&1
  rc=$?
  tail -6 "$LOGS/sanitizer_$tool.log"
  result=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$LOGS/sanitizer_$tool.log" | tail -1 | sed 's/=* *//')
  ran=$(grep -c "sanitize_case: .* cases ran" "$LOGS/sanitizer_$tool.log")
  case $rc in
    0) status="ok" ;;
    124) status="TIMED OUT" ;;
    99) status="ERRORS FOUND" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  (( ran == 0 && rc == 0 )) && status="INCOMPLETE (the case did not finish)"
  note "sanitizer $tool" "$status: ${result:-no summary line} -- $LOGS/sanitizer_$tool.log"
done

# ---------------------------------------------------------------------------------------------
banner "6. CPU test suite (if time is left)"
cpu_time=$(allow 600 10)
if (( ! BUILD_OK )); then
  note "CPU tests" "not run (no build)"
elif (( cpu_time < 45 )); then
  note "CPU tests" "skipped: ${cpu_time}s left in the budget"
else
  timeout "$cpu_time" $PYTHON -m pytest -q -x -p no:cacheprovider tests --ignore=tests/test_cuda.py --ignore=tests/test_cuda_jvp.py \
    >"$LOGS/test_cpu.log" 2>&1
  rc=$?
  tail -5 "$LOGS/test_cpu.log"
  line=$(pytest_line "$LOGS/test_cpu.log")
  (( rc == 124 )) && line="TIMED OUT after ${cpu_time}s (partial: ${line:-none})"
  note "CPU tests" "$([[ $rc == 0 ]] && echo ok || echo "rc $rc"): ${line:-no summary}"
fi

# ---------------------------------------------------------------------------------------------
echo
echo "=================================== GPU CHECK SUMMARY ($(elapsed)s) ==================================="
for line in "${SUMMARY[@]}"; do echo "$line"; done
for line in "${TABLES[@]}"; do echo "$line"; done
