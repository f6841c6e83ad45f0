#!/usr/bin/env bash
# One-shot check of pynas on a lent GPU machine (NVIDIA H100/H200): environment, build, GPU tests,
# GPU benchmarks, result table. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh             # full check (dry run when torch sees no GPU)
#     bash benchmarks/gpu_check.sh --dry-run   # plumbing test: skip GPU steps, run a tiny CPU bench
#
# Writes (at most 7 files) under $OUT (default ./gpu_check_out):
#     env.txt  build.log  tests.log  bench.log  results.jsonl  table.md  summary.txt
# Each step runs under its own `timeout`; the whole stays within GPU_CHECK_BUDGET seconds
# (default 500, so under 9 minutes with the kill grace): a step gets min(its own limit, what is left after
# reserving a minimum for the steps after it). The GPU tests run in parallel (pytest-xdist, where installed):
# cold Triton compiles dominate them. The last thing printed is the summary: each
# step's status and the result table. Exit 0 when every step that ran passed, else 1.
# No network is used: the build is `pip install --no-deps --no-build-isolation --no-index -e .`.
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_BUDGET (seconds).

set -u

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 1; }
OUT="$(cd "$OUT" && pwd)"
BUDGET="${GPU_CHECK_BUDGET:-500}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

ENV_TXT="$OUT/env.txt"
BUILD_LOG="$OUT/build.log"
TESTS_LOG="$OUT/tests.log"
BENCH_LOG="$OUT/bench.log"
RESULTS="$OUT/results.jsonl"
TABLE="$OUT/table.md"
SUMMARY="$OUT/summary.txt"
# A rerun into the same folder must not mix with the last run's files (only ours are removed).
rm -f "$ENV_TXT" "$BUILD_LOG" "$TESTS_LOG" "$BENCH_LOG" "$RESULTS" "$TABLE" "$SUMMARY"

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
# System pythons marked "externally managed" (PEP 668) refuse pip installs; older pips ignore this.
export PIP_BREAK_SYSTEM_PACKAGES=1
# Real GPU kernels, never the Triton interpreter, on the GPU machine.
unset TRITON_INTERPRET

STEP_NAMES=()
STEP_STATUS=()
STEP_LOGS=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }

# record NAME STATUS [LOG]; STATUS "ok", "skipped: ..." or anything else (= failure)
record() {
    STEP_NAMES+=("$1")
    STEP_STATUS+=("$2")
    STEP_LOGS+=("${3:-}")
    case "$2" in
        ok*|skipped*) ;;
        *) FAILED=1 ;;
    esac
    say "$1: $2"
}

# limit_for CAP RESERVE: seconds for a step, at most CAP, leaving RESERVE seconds for later steps.
limit_for() {
    local cap=$1 reserve=$2 left
    left=$(( DEADLINE - $(date +%s) - reserve ))
    (( left < cap )) && cap=$left
    (( cap < 10 )) && cap=10
    echo "$cap"
}

# run_step NAME CAP RESERVE LOG CMD...: run CMD with its output appended to LOG under a timeout.
LAST_RC=0
run_step() {
    local name=$1 cap=$2 reserve=$3 log=$4 limit t0 rc status
    shift 4
    limit=$(limit_for "$cap" "$reserve")
    say "$name: running (limit ${limit}s): $*"
    {
        echo "### $name: $*"
        echo "### limit ${limit}s, started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >>"$log"
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" >>"$log" 2>&1 </dev/null
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    echo "### $name: exit status $rc after ${dt}s" >>"$log"
    if (( rc == 0 )); then
        status="ok (${dt}s)"
    elif (( rc == 124 || rc == 137 )); then
        status="FAILED: timed out after ${limit}s (exit $rc)"
    else
        status="FAILED: exit status $rc after ${dt}s"
    fi
    LAST_RC=$rc
    record "$name" "$status" "$log"
}

skip_step() {  # skip_step NAME LOG REASON
    echo "### $1: skipped: $3" >>"$2"
    record "$1" "skipped: $3" "$2"
}

# ------------------------------------------------------------------ 0. is there a GPU?
GPU_REASON=""
if (( DRY_RUN )); then
    GPU_REASON="--dry-run given"
else
    probe=$(timeout -k 5 90 "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"; print(torch.cuda.get_device_name(0))' 2>&1)
    if [[ $? -ne 0 ]]; then
        DRY_RUN=1
        GPU_REASON="no usable CUDA GPU: $(printf '%s' "$probe" | tail -n 1)"
        # A GPU that nvidia-smi sees but torch cannot use is a failure, not a dry run.
        if command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
            record "cuda probe" "FAILED: nvidia-smi lists a GPU but torch cannot use it: $(printf '%s' "$probe" | tail -n 1)"
        fi
    else
        say "GPU: $(printf '%s' "$probe" | tail -n 1)"
    fi
fi
if (( DRY_RUN )); then
    say "DRY RUN ($GPU_REASON): build, GPU tests and GPU benchmarks are skipped; a tiny CPU bench runs instead"
fi

# ------------------------------------------------------------------ a. environment
env_facts() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "cpus: $(nproc 2>/dev/null || echo '?')"
    echo "mode: $( (( DRY_RUN )) && echo "dry run ($GPU_REASON)" || echo "GPU")"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout') $(git status --porcelain 2>/dev/null | grep -q . && echo '(uncommitted changes)')"
    echo
    echo "## nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi -L
        timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory,power.limit --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo
    echo "## nvcc"
    if command -v nvcc >/dev/null 2>&1; then nvcc --version; else echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"; fi
    echo
    echo "## python"
    "$PY" - <<'PYEOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
except Exception as exc:
    print("torch: not importable:", exc)
    sys.exit(1)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
for mod in ("pytest", "hypothesis", "expecttest", "tqdm", "matplotlib", "numpy", "setuptools", "ninja", "pytest_benchmark"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception:
        print(f"{mod}: missing")
PYEOF
}
export -f env_facts
export DRY_RUN GPU_REASON PY
run_step "environment" 60 440 "$ENV_TXT" bash -c env_facts

# ------------------------------------------------------------------ b. build
if (( DRY_RUN )); then
    skip_step "build" "$BUILD_LOG" "no GPU (dry run)"
    skip_step "pynas.info" "$BUILD_LOG" "no GPU (dry run)"
else
    ARCH=$(timeout 60 "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null | tail -n 1)
    [[ "$ARCH" =~ ^[0-9]+\.[0-9]+$ ]] || ARCH="9.0"
    say "building for TORCH_CUDA_ARCH_LIST=$ARCH"
    run_step "build" 200 260 "$BUILD_LOG" \
        env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    run_step "pynas.info" 45 250 "$BUILD_LOG" "$PY" -m pynas.info
fi

# ------------------------------------------------------------------ c. GPU tests
if (( DRY_RUN )); then
    skip_step "gpu tests" "$TESTS_LOG" "no GPU (dry run)"
else
    # 8 workers: most of this step is Triton compiling each kernel specialisation on first use
    XDIST=()
    "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
    run_step "gpu tests" 200 175 "$TESTS_LOG" \
        "$PY" -m pytest -q -rs --maxfail=100 ${XDIST[@]+"${XDIST[@]}"} -m gpu tests -p no:cacheprovider
fi

# ------------------------------------------------------------------ d. benchmarks
if (( DRY_RUN )); then
    skip_step "gpu bench" "$BENCH_LOG" "no GPU (dry run)"
    run_step "cpu smoke bench" 120 30 "$BENCH_LOG" \
        "$PY" -m pynas bench --device cpu --size cpu --benchmarks mixed_sum --repeats 3 --no-progress --out "$RESULTS"
else
    # Micro benchmarks first (every provider, torch.compile included), then the search iterations without
    # torch.compile: compiling a whole DARTS network (or the RNN's 35 x 8 unrolled nodes) alone would take
    # the rest of the budget.
    run_step "gpu micro bench" 75 100 "$BENCH_LOG" \
        "$PY" -m pynas bench --device cuda --size gpu --benchmarks micro --no-progress --out "$RESULTS" \
        --compile-timeout 40 --providers reference,compiled,pynas,pynas-cuda,pynas-triton
    run_step "gpu cnn bench" 75 45 "$BENCH_LOG" \
        "$PY" -m pynas bench --device cuda --size gpu --benchmarks cnn --repeats 3 --no-progress --out "$RESULTS" \
        --providers reference,pynas,pynas-cuda,pynas-triton
    run_step "gpu rnn bench" 60 10 "$BENCH_LOG" \
        "$PY" -m pynas bench --device cuda --size gpu --benchmarks rnn --repeats 3 --no-progress --out "$RESULTS" \
        --providers reference,pynas,pynas-cuda,pynas-triton
fi

# ------------------------------------------------------------------ e. table
if [[ -s "$RESULTS" ]]; then
    # stdout is the table; stderr (warnings) goes to the bench log
    limit=$(limit_for 60 0)
    say "report: running (limit ${limit}s)"
    timeout -k 5 "$limit" "$PY" benchmarks/report.py "$RESULTS" >"$TABLE" 2>>"$BENCH_LOG"
    rc=$?
    if (( rc == 0 )); then record "report" "ok" "$BENCH_LOG"; else record "report" "FAILED: exit status $rc" "$BENCH_LOG"; fi
else
    echo "(no results: $RESULTS is missing or empty)" >"$TABLE"
    record "report" "FAILED: no results to report ($RESULTS missing or empty)" "$BENCH_LOG"
fi

# ------------------------------------------------------------------ summary
{
    for i in "${!STEP_NAMES[@]}"; do
        case "${STEP_STATUS[$i]}" in
            ok*|skipped*) ;;
            *)
                log="${STEP_LOGS[$i]}"
                if [[ -n "$log" && -f "$log" ]]; then
                    echo "---- last lines of $(basename "$log") (step '${STEP_NAMES[$i]}' failed) ----"
                    tail -n 40 "$log"
                    echo
                fi
                ;;
        esac
    done
    echo "================ gpu_check summary ================"
    if (( DRY_RUN )); then echo "mode: DRY RUN ($GPU_REASON)"; else echo "mode: GPU ($(grep -m1 '^cuda:0' "$ENV_TXT" 2>/dev/null || echo '?'))"; fi
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-16s %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}"
    done
    echo "total: $(elapsed)s of a ${BUDGET}s budget; files in $OUT"
    echo
    cat "$TABLE" 2>/dev/null
    echo
    if (( FAILED )); then echo "RESULT: FAILED"; else echo "RESULT: PASSED"; fi
} | tee "$SUMMARY"

exit "$FAILED"
