#!/usr/bin/env bash
# One-shot GPU check for an NVIDIA H200 machine (torch 2.11+cu130, triton 3.6, nvcc 13, python 3.12, no internet).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine ($OUT given by the tool)
#   bash benchmarks/gpu_check.sh --dry-run                # here, on the CPU: same stages, tiny sizes
#
# Stages, in priority order, each under a hard `timeout` and the whole under CBD_CHECK_BUDGET_S
# (default 450 s, inside the 8-minute target); a failed stage is recorded and the next one runs;
# a stage that no longer fits the budget is recorded as skipped:
#   env       nvidia-smi, versions
#   build     TORCH_CUDA_ARCH_LIST=9.0 CBD_FAST_FORCE_CUDA=1 pip install --no-build-isolation -e .
#   info      python -m cbd_fast.info (which backends were built / are usable)
#   gputests  pytest -m gpu tests/
#   loop      bench_loop: ResNet-50 224 px bs 256 K 5: floor, naive, strong, cbd_fast   (the targets)
#   ops_nt_xent, ops_pgd   the op benchmarks (bench_nt_xent.py, bench_pgd.py), one stage each
#   options   bench_loop: the GPU options one at a time (channels_last off, CUDA graph, value_and_grad,
#             the clean-forward reuse prototype)
#   vit       bench_loop: ViT-B/16 bs 128 K 5: floor, naive, strong, cbd_fast
#   compile   bench_loop: torch.compile of the encoder (strong+compile, cbd_fast+compile)
#   summary   benchmarks/run_gpu_check.py: summary.md + summary.json from everything above
# Files written under $OUT (5, one level): log.txt, summary.md (the short table, also printed last),
# summary.json (stages, ratios, agreement, op medians), loop.json (pytest-benchmark JSON of the
# target comparison, usable with --benchmark-compare) and bench_raw.json ({stage: pytest-benchmark
# JSON} for every benchmark stage).
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 2
DRY=0
if [[ "${1:-}" == "--dry-run" || "${CBD_DRY_RUN:-0}" == "1" ]]; then DRY=1; fi
OUT=${OUT:-/tmp/cbd_gpu_check_out}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d /tmp/cbd_check.XXXXXX)
PY=${PYTHON:-python3}
BUDGET=${CBD_CHECK_BUDGET_S:-$((DRY ? 1200 : 450))} # the CPU rehearsal is slower, not shorter
RESERVE=20 # kept for the summary stage
START=$(date +%s)
LOG="$OUT/log.txt"
STAGES="$SCRATCH/stages.tsv"
: >"$LOG"
: >"$STAGES"
export PYTHONUNBUFFERED=1 OUT SCRATCH PY
export PYTHONDONTWRITEBYTECODE=1

elapsed() { echo $(($(date +%s) - START)); }

# stage NAME LIMIT_S CMD...: run CMD under timeout, append output to the log, record rc and seconds.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - $(elapsed) - RESERVE))
    if ((left < 20)); then
        printf '%s\tskipped\t0\tbudget (%ss left)\n' "$name" "$left" >>"$STAGES"
        echo "== stage $name: SKIPPED (budget)" | tee -a "$LOG"
        return 0
    fi
    ((DRY)) && limit=$((limit * 3))
    ((limit > left)) && limit=$left
    echo "== stage $name (limit ${limit}s, t=$(elapsed)s): $*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    local what=ok
    if ((rc == 124 || rc == 137)); then what=timeout; elif ((rc != 0)); then what=failed; fi
    printf '%s\t%s\t%s\trc=%s\n' "$name" "$what" "$dt" "$rc" >>"$STAGES"
    tail -n 4 "$LOG" | sed 's/^/   | /'
    echo "== stage $name: $what (rc=$rc, ${dt}s)" | tee -a "$LOG"
    return 0
}

bench_loop() { # bench_loop JSON_NAME CASES LOOPS (exported: `timeout` runs it through bash -c)
    local name=$1 cases=$2 loops=$3
    mkdir -p "$SCRATCH/$name"
    env CBD_BENCH_CASES="$cases" CBD_BENCH_LOOPS="$loops" CBD_BENCH_OUT="$SCRATCH/$name" \
        "$PY" -m pytest benchmarks/bench_loop.py -q -p no:cacheprovider -rA \
        -k "not detects_a_difference and not refuses_speedup" \
        --benchmark-json="$SCRATCH/$name.json" --benchmark-columns=median,iqr,min,rounds
}
export -f bench_loop

if ((DRY)); then
    # CPU rehearsal: tiny sizes, the CPU's loops; the build is skipped unless CBD_CHECK_BUILD=1.
    export CBD_BENCH_DEVICE=cpu CBD_BENCH_ROUNDS=2
    OPS_ENV=(CBD_BENCH_QUICK=1)
    R50="fmnist_cnn:32:2"
    VIT="fmnist_cnn:16:1"
    CORE="floor,naive,strong,cbd_fast"
    OPTIONS="strong-cl,strong+graph,strong+vg,strong+reuse,cbd_fast-cl"
    COMPILE="strong,strong+compile"
else
    R50="resnet50:256:5"
    VIT="vit_b16:128:5:6"
    CORE="floor,naive,strong,cbd_fast"
    OPTIONS="strong,strong-cl,strong+graph,strong+vg,strong+reuse,cbd_fast,cbd_fast-cl"
    OPS_ENV=(CBD_BENCH_ROUNDS=10)
    COMPILE="strong,strong+compile,cbd_fast,cbd_fast+compile"
fi

stage env 30 bash -c "nvidia-smi || true; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'; $PY -c 'import triton; print(\"triton\", triton.__version__)' || true; nvcc --version | tail -n 2 || true; nproc; free -g | head -2"

if ((DRY == 0)) || [[ "${CBD_CHECK_BUILD:-0}" == "1" ]]; then
    if ((DRY)); then
        stage build 300 flock /tmp/cbd_build.lock "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -q
    else
        stage build 200 env TORCH_CUDA_ARCH_LIST=9.0 CBD_FAST_FORCE_CUDA=1 MAX_JOBS="$(nproc)" \
            "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -q
        # if pip failed, an in-place build still gives the tests an extension
        if ! "$PY" -c "import cbd_fast._C" >/dev/null 2>&1; then
            stage build_inplace 150 env TORCH_CUDA_ARCH_LIST=9.0 CBD_FAST_FORCE_CUDA=1 MAX_JOBS="$(nproc)" \
                "$PY" setup.py build_ext --inplace
        fi
    fi
fi

stage info 30 "$PY" -c "import cbd_fast, cbd_fast.ops._ext as e; print('extension', e.load() is not None, 'cuda', e.has_cuda(), e.load_error()); import cbd_fast.app.info as i; i.main() if hasattr(i, 'main') else None"

stage gputests 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs tests/

stage loop 150 bash -c 'bench_loop "$@"' _ loop "$R50" "$CORE"

for op in nt_xent pgd; do
    if [[ -f benchmarks/bench_$op.py ]]; then
        stage "ops_$op" 60 env "${OPS_ENV[@]}" "$PY" -m pytest "benchmarks/bench_$op.py" -q -p no:cacheprovider \
            -rfEs --benchmark-json="$SCRATCH/ops_$op.json" --benchmark-columns=median,iqr,min,rounds \
            --benchmark-max-time=0.5
    else
        printf 'ops_%s\tskipped\t0\tno benchmarks/bench_%s.py\n' "$op" "$op" >>"$STAGES"
    fi
done

stage options 100 bash -c 'bench_loop "$@"' _ options "$R50" "$OPTIONS"

stage vit 90 bash -c 'bench_loop "$@"' _ vit "$VIT" "$CORE"

stage compile 150 bash -c 'bench_loop "$@"' _ compile "$R50" "$COMPILE"

# the summary always runs (RESERVE seconds kept for it)
echo "== stage summary (t=$(elapsed)s)" | tee -a "$LOG"
timeout -k 5 30 "$PY" benchmarks/run_gpu_check.py summarize --scratch "$SCRATCH" --out "$OUT" \
    --stages "$STAGES" --elapsed "$(elapsed)" --dry-run "$DRY" >>"$LOG" 2>&1 ||
    echo "summary failed (rc=$?)" | tee -a "$LOG"
[[ -s "$SCRATCH/loop.json" ]] && cp "$SCRATCH/loop.json" "$OUT/loop.json"
cat "$OUT/summary.md" 2>/dev/null || cat "$STAGES"
rm -rf "$SCRATCH"
echo "== done in $(elapsed)s; files under $OUT:"
find "$OUT" -maxdepth 2 -type f -printf '   %P (%s bytes)\n'
