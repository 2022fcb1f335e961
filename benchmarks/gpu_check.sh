#!/usr/bin/env bash
# One-shot GPU check on an NVIDIA H200 (torch 2.11+cu130, triton 3.6, Python 3.12, nvcc 13,
# pytest-benchmark; no internet: nothing is downloaded). Under 8 minutes from a fresh machine.
#
#   bash benchmarks/gpu_check.sh                   # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run         # on a CPU (CI): the script's logic, no GPU work
#   options: --strict-targets  missed benchmark targets fail the verdict too
#            --loop            afterwards, outside the 8-minute budget: the ResNet-50 loop benchmark
#            --ttp             afterwards, outside the budget: time-to-purify on a random ResNet-50
#                              (1,024 images, 1 epoch; purify vs plain fine-tuning vs a paper epoch)
#
# Stages, in order, each under a hard `timeout` (seconds) and all under CBD_CHECK_BUDGET_S (450 s);
# a stage that fails is recorded and the next one runs; one that no longer fits is recorded as skipped:
#   env        nvidia-smi, versions, tools present
#   xdist      pytest-xdist: already importable, or installed from a local wheel (pip --no-index) if
#              one is available; otherwise the tests run serially
#   build      TORCH_CUDA_ARCH_LIST=9.0 CBD_FAST_FORCE_CUDA=1 pip install --no-build-isolation -e .
#              (setup.py build_ext --inplace when pip is missing or fails)
#   registered the extension loads and the dispatcher holds a CUDA kernel for every op
#              (benchmarks/run_gpu_check.py registered): the check FAILS otherwise
#   gputests   pytest -m gpu tests/ (xdist -n 4 when present), JUnit XML; covers tests/ops/test_gpu_extra.py:
#              non-default stream, CUDA-graph capture/replay, torch.compile(fullgraph=True), a
#              > 2^31-element pgd_step bit-exact, cuda vs triton at 2N=131072 D=512 bf16 vs float64
#   sanitizer  compute-sanitizer memcheck and racecheck on a small run of both backends (when present)
#   bench      bench_nt_xent.py fwd+bwd ratio at 2N=8192 D=512 bf16 (target >= 2x eager) and
#              bench_pgd.py bandwidth (target >= 85% of a copy): TARGET PASS/FAIL lines
#   summary    benchmarks/run_gpu_check.py summarize: CHECK/TARGET lines and one final line,
#              "FINAL: PASS|FAIL (...)", computed from the test counts (see run_gpu_check.py)
# Results (log.txt, stages.tsv, registered.json, gpu_tests.xml/.log, bench_*.json, sanitizer_*.log,
# fallbacks.jsonl, summary.json, summary.md) go to benchmarks/results/gpu_check_<gpu-name>_<date>/
# (CBD_CHECK_RESULTS overrides), and are copied to $OUT when it is set. Exit status: 0 for PASS.
#
# --dry-run (CI, no GPU): checks the stage plan against the budget, runs run_gpu_check.py selftest
# (pytest-count parsing, skip classification, the verdict on canned inputs), check-files (every
# referenced file and GPU test exists: pytest --collect-only -m gpu), walks the stage list printing
# each command with its time limit, and summarizes a canned passing run. Writes under $TMPDIR.
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 2
DRY=0
LOOP=0
TTP=0
STRICT=()
for arg in "$@"; do
    case $arg in
    --dry-run) DRY=1 ;;
    --loop) LOOP=1 ;;
    --ttp) TTP=1 ;;
    --strict-targets) STRICT=(--strict-targets) ;;
    -h | --help)
        sed -n '2,36p' "$0"
        exit 0
        ;;
    *)
        echo "gpu_check.sh: unknown argument $arg (see --help)" >&2
        exit 2
        ;;
    esac
done
[[ "${CBD_DRY_RUN:-0}" == "1" ]] && DRY=1

PY=${PYTHON:-python3}
BUDGET=${CBD_CHECK_BUDGET_S:-450}
RESERVE=10 # seconds kept for the summary
# stage:limit (seconds); the limits plus RESERVE must fit BUDGET, and BUDGET 8 minutes
PLAN="env:10 xdist:10 build:160 registered:15 gputests:140 sanitizer:60 bench:45"
START=$(date +%s)
DATE=$(date -u +%Y%m%d-%H%M%S)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/cbd_gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

if ((DRY)); then
    GPU_NAME=cpu-dry-run
    RES=${CBD_CHECK_RESULTS:-${TMPDIR:-/tmp}/cbd_gpu_check_dry/gpu_check_${GPU_NAME}_${DATE}}
else
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    [[ -n "$GPU_NAME" ]] || GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)
    GPU_NAME=$(echo "${GPU_NAME:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]\+/-/g; s/^-//; s/-$//')
    RES=${CBD_CHECK_RESULTS:-benchmarks/results/gpu_check_${GPU_NAME}_${DATE}}
fi
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
LOG="$RES/log.txt"
STAGES="$RES/stages.tsv"
: >"$LOG"
: >"$STAGES"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PY RES
export TRITON_CACHE_DIR="$SCRATCH/triton_cache" # shared by the stages: each kernel compiles once
export CBD_FAST_FALLBACK_LOG="$RES/fallbacks.jsonl"
unset TRITON_INTERPRET CBD_FAST_BACKEND CBD_FAST_DISABLE_EXT
: >"$CBD_FAST_FALLBACK_LOG"

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "$*" | tee -a "$LOG"; }
limit_of() { # limit_of STAGE: its limit in PLAN
    local item
    for item in $PLAN; do [[ "${item%%:*}" == "$1" ]] && echo "${item#*:}" && return 0; done
    echo 0
}

# stage NAME CMD...: run CMD under `timeout` (NAME's limit, clipped to the budget left), log its
# output, record status and seconds in stages.tsv. --dry-run prints the command instead.
stage() {
    local name=$1
    shift
    local limit left t0 rc dt what
    limit=$(limit_of "$name")
    left=$((BUDGET - $(elapsed) - RESERVE))
    if ((left < 5)); then
        printf '%s\tskipped\t0\tbudget (%ss left)\n' "$name" "$left" >>"$STAGES"
        say "== stage $name: SKIPPED (budget: ${left}s left)"
        return 0
    fi
    ((limit > left)) && limit=$left
    if ((DRY)); then
        printf '%s\tdry\t0\tlimit %ss: %s\n' "$name" "$limit" "$*" >>"$STAGES"
        say "== stage $name (limit ${limit}s): would run: $*"
        return 0
    fi
    say "== stage $name (limit ${limit}s, t=$(elapsed)s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    what=ok
    if ((rc == 124 || rc == 137)); then what=timeout; elif ((rc != 0)); then what=failed; fi
    printf '%s\t%s\t%s\trc=%s\n' "$name" "$what" "$dt" "$rc" >>"$STAGES"
    tail -n 3 "$LOG" | sed 's/^/   | /'
    say "== stage $name: $what (rc=$rc, ${dt}s)"
    return 0
}

# ---- stage bodies (exported: `timeout` runs them through bash -c) ------------------------------------

env_report() {
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
        torch.cuda.is_available() and torch.cuda.get_device_name(0))'
    "$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"
    "$PY" -c 'import pytest_benchmark; print("pytest-benchmark", pytest_benchmark.__version__)' || true
    nvcc --version 2>/dev/null | tail -n 2 || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -n 2 || true
    echo "compute-sanitizer: $(sanitizer_bin || echo none)"
    echo "ninja: $(command -v ninja || echo 'none (the build compiles serially)')"
    nproc
    free -g | head -n 2
}

have_xdist() { "$PY" -c 'import xdist' >/dev/null 2>&1; }

get_xdist() { # never fails the check: without xdist the tests run serially
    if have_xdist; then echo "pytest-xdist present"; return 0; fi
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --no-index --no-deps -q pytest-xdist execnet 2>&1 | tail -n 2 ||
            "$PY" -m pip install --no-index --no-deps -q pytest-xdist 2>&1 | tail -n 2 || true
    fi
    have_xdist && echo "pytest-xdist installed from a local wheel" || echo "pytest-xdist unavailable: serial run"
    return 0
}

build_ext() {
    export TORCH_CUDA_ARCH_LIST=9.0 CBD_FAST_FORCE_CUDA=1 MAX_JOBS
    MAX_JOBS=$(nproc)
    if "$PY" -m pip --version >/dev/null 2>&1 &&
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -q; then
        return 0
    fi
    echo "pip install failed or pip is missing: setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace
}

gpu_tests() {
    set -o pipefail
    local par=()
    have_xdist && par=(-n 4 --dist load)
    "$PY" -m pytest -m gpu tests/ -q -rfEs -p no:cacheprovider --junitxml="$RES/gpu_tests.xml" \
        "${par[@]}" 2>&1 | tee "$RES/gpu_tests.log"
}

sanitizer_bin() {
    local c
    for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda-13.0/bin/compute-sanitizer; do
        [[ -n "$c" && -x "$c" ]] && echo "$c" && return 0
    done
    return 1
}

sanitize() { # memcheck and racecheck, half the stage's time each; logs parsed by the summary
    local bin tool each=$1 rc=0
    bin=$(sanitizer_bin) || { echo "compute-sanitizer not found: not run"; return 0; }
    "$PY" benchmarks/run_gpu_check.py workload >/dev/null 2>&1 # compile outside the sanitizer
    for tool in memcheck racecheck; do
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$each" "$bin" --tool "$tool" --error-exitcode 3 \
            "$PY" benchmarks/run_gpu_check.py workload >"$RES/sanitizer_$tool.log" 2>&1 || rc=1
        tail -n 2 "$RES/sanitizer_$tool.log"
    done
    return $rc
}

benches() {
    set -o pipefail
    local rc=0
    env CBD_BENCH_ROUNDS=10 CBD_BENCH_PROVIDERS=eager,triton,cuda "$PY" -m pytest benchmarks/bench_nt_xent.py \
        -q -s -p no:cacheprovider -k "test_ratio and fwdbwd and 2N8192" \
        --benchmark-json="$RES/bench_nt_xent.json" 2>&1 | grep -E "TARGET|passed|failed|skipped|rror" || rc=1
    env CBD_BENCH_ROUNDS=10 "$PY" -m pytest benchmarks/bench_pgd.py -q -s -p no:cacheprovider -k gpu_bandwidth \
        --benchmark-json="$RES/bench_pgd.json" 2>&1 | grep -E "TARGET|passed|failed|skipped|rror" || rc=1
    return $rc
}

export -f env_report have_xdist get_xdist build_ext gpu_tests sanitizer_bin sanitize benches

# ---- the run ---------------------------------------------------------------------------------------------

say "== gpu_check $( ((DRY)) && echo '(dry run) ')on $GPU_NAME, results in $RES"
DRY_FAIL=0
if ((DRY)); then
    "$PY" benchmarks/run_gpu_check.py plan --stages "$PLAN" --budget "$BUDGET" --reserve "$RESERVE" 2>&1 | tee -a "$LOG" || DRY_FAIL=1
    ((BUDGET <= 480)) || { say "budget $BUDGET s > 480 s"; DRY_FAIL=1; }
    "$PY" benchmarks/run_gpu_check.py selftest --canned "$RES" 2>&1 | tee -a "$LOG" || DRY_FAIL=1
    "$PY" benchmarks/run_gpu_check.py check-files 2>&1 | tee -a "$LOG" || DRY_FAIL=1
fi

stage env bash -c env_report
stage xdist bash -c get_xdist
stage build bash -c build_ext
stage registered "$PY" benchmarks/run_gpu_check.py registered --out "$RES"
stage gputests bash -c gpu_tests
stage sanitizer bash -c 'sanitize "$1"' _ $(($(limit_of sanitizer) / 2 - 2))
stage bench bash -c benches

say "== stage summary (t=$(elapsed)s)"
summary_args=(--results "$RES" --elapsed "$(elapsed)" "${STRICT[@]}")
((DRY)) && summary_args+=(--dry-run)
timeout -k 5 "$RESERVE" "$PY" benchmarks/run_gpu_check.py summarize "${summary_args[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
((rc == 0 || rc == 1)) || { say "FINAL: FAIL (summary crashed: rc=$rc)"; rc=1; }

if ((LOOP && !DRY)); then # optional, outside the budget
    say "== loop benchmark (outside the 8-minute budget)"
    mkdir -p "$RES/loop"
    timeout -k 10 300 env CBD_BENCH_CASES=resnet50:256:5 CBD_BENCH_LOOPS=floor,naive,strong,cbd_fast \
        CBD_BENCH_OUT="$RES/loop" "$PY" -m pytest benchmarks/bench_loop.py -q -p no:cacheprovider \
        -k "not detects_a_difference and not refuses_speedup" --benchmark-json="$RES/loop.json" >>"$LOG" 2>&1 ||
        say "loop benchmark: failed or timed out (rc=$?)"
fi

if ((TTP && !DRY)); then # optional, outside the budget
    say "== time-to-purify, random ResNet-50 (outside the 8-minute budget)"
    timeout -k 10 420 env CBD_TTP_ENCODER=resnet50 CBD_TTP_IMAGES=1024 CBD_TTP_SET=epochs=1 CBD_BENCH_ROUNDS=1 \
        "$PY" -m pytest benchmarks/bench_time_to_purify.py -q -s -p no:cacheprovider \
        --benchmark-json="$RES/ttp_resnet50.json" >>"$LOG" 2>&1 || say "time-to-purify: failed or timed out (rc=$?)"
fi

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT" && cp -r "$RES"/. "$OUT"/ && say "copied the results to $OUT"
fi
say "== done in $(elapsed)s; files in $RES:"
find "$RES" -maxdepth 2 -type f -printf '   %P (%s bytes)\n' | sort | tee -a "$LOG"
if ((DRY)); then
    if ((DRY_FAIL || rc != 0)); then
        say "gpu_check --dry-run: FAILED (plan, selftest, check-files or the canned summary)"
        exit 1
    fi
    say "gpu_check --dry-run: ok (no GPU work was run)"
    exit 0
fi
exit "$rc"
