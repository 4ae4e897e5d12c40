#!/usr/bin/env bash
# The GPU check of e3fast: one script for a GPU machine, about 8 minutes at most.
#
#   bash benchmarks/gpu_check.sh      # from the repository root; results in $OUT, default ./gpu-results
#
# Stages, each run even if an earlier one failed (a failed build only removes the CUDA backend):
#   1. environment  nvidia-smi, versions, toolchain                       -> $OUT/env.log
#   2. build        the extension with its CUDA kernels, in place          -> $OUT/build.log
#                   (E3FAST_CUDA=1, arch from the GPU, MAX_JOBS=16)
#   3. tests        pytest over the GPU test files                         -> $OUT/tests.log
#   4. benchmark    benchmarks/gpu_bench.py --out $OUT                     -> $OUT/gpu_bench.{json,md}, bench.log
#   5. summary      the status of every stage                              -> $OUT/summary.md, gpu_check.json
# Eight files at most in $OUT. Every stage has a timeout and the whole check a deadline
# (E3FAST_GPU_CHECK_SECONDS, default 465): the build may use what leaves 60% of it, the tests what
# leaves 43%, the benchmark the rest but 30 s (the summary and the kill margins). With less time
# on the machine, lower E3FAST_GPU_CHECK_SECONDS: every stage shrinks with it. Nothing is
# installed; no prompt is ever shown.
#
# Without a GPU visible to torch, or with E3FAST_GPU_CHECK_SMOKE=1, it runs as a smoke test of
# itself: the CPU extension is built instead, and the benchmark runs with --device cpu --quick.
# E3FAST_GPU_CHECK_SMOKE=0 forces the GPU mode (to see how it reports failures on a machine without one).
#
# Environment: PYTHON (default python, else python3), OUT, E3FAST_GPU_CHECK_SMOKE, E3FAST_GPU_CHECK_SECONDS,
# E3FAST_BUILD_SECONDS (default 180), E3FAST_TESTS_SECONDS (default 120),
# E3FAST_BENCH_SECONDS (default 240; smoke 120), E3FAST_CUDA_ARCH (default: the GPU's compute
# capability), MAX_JOBS (default 16), E3FAST_GPU_TESTS (test files, default: see gpu_test_files),
# E3FAST_GPU_TEST_MAXFAIL (default 10; 1 is pytest -x), E3FAST_BENCH_BACKENDS (e3fast backends the
# benchmark measures, e.g. "cuda"; default all usable, the reference always), E3FAST_GIT_COMMIT (recorded where the
# checkout has no .git).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu-results}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check: cannot create $OUT" >&2; exit 1; }
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python
    command -v python > /dev/null || PYTHON=python3
fi
OUT_FILES=(env.log build.log tests.log bench.log gpu_bench.json gpu_bench.md summary.md gpu_check.json)
for name in "${OUT_FILES[@]}"; do rm -f "${OUT:?}/$name"; done  # no stale results from an earlier check
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 DEBIAN_FRONTEND=noninteractive
unset TRITON_INTERPRET  # Triton must run on the GPU here, not in its interpreter

STATE=$(mktemp -d)  # stage records, environment and pytest's XML for the summary (not results themselves)
trap 'rm -rf "$STATE"' EXIT
TOTAL_SECONDS=${E3FAST_GPU_CHECK_SECONDS:-465}
START=$SECONDS
MODE=gpu

seconds_left() { echo $((TOTAL_SECONDS - (SECONDS - START))); }
smaller() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# record_stage NAME STATUS SECONDS DETAIL: one line of $STATE/stages.tsv for the summary.
record_stage() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ')" >> "$STATE/stages.tsv"
    echo "gpu_check: $1: $2 ($3 s) $4"
}

# trim_log LOG: keep the first 300 and last 1500 lines of a log longer than 2000. Logs are
# written straight into $OUT, so a check killed from outside still leaves them there.
trim_log() {
    local lines
    lines=$(wc -l < "$1")
    if [ "$lines" -gt 2000 ]; then
        { head -n 300 "$1"; echo "... ($((lines - 1800)) lines left out) ..."; tail -n 1500 "$1"; } > "$STATE/trimmed"
        mv -f "$STATE/trimmed" "$1"
    fi
}

# run_limited SECONDS LOG COMMAND...: the command under `timeout`, its output appended to LOG.
# It runs in the background so that a TERM or INT sent to this script can stop it (on_signal):
# `timeout` puts the command in a process group of its own, which a signal to ours would miss.
CHILD=
CURRENT_STAGE=start
STAGE_START=$SECONDS
run_limited() {
    local limit=$1 log=$2 code
    shift 2
    timeout -k 10 "$limit" "$@" >> "$log" 2>&1 &
    CHILD=$!
    wait "$CHILD"
    code=$?
    CHILD=
    return $code
}

on_signal() {
    trap - TERM INT
    echo "gpu_check: stopped from outside"
    [ -n "$CHILD" ] && kill -TERM -- "-$CHILD" 2> /dev/null && sleep 3
    [ -n "$CHILD" ] && kill -KILL -- "-$CHILD" 2> /dev/null
    record_stage "$CURRENT_STAGE" killed $((SECONDS - STAGE_START)) "the check was stopped from outside (TERM or INT)"
    write_summary
    exit 143
}
trap on_signal TERM INT

# json_field FILE KEY: one top-level value of a JSON file (empty if there is none).
json_field() {
    "$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or '')" "$1" "$2" 2>/dev/null
}

# exit_status CODE: words for a command's exit code under timeout.
exit_status() {
    case "$1" in
        0) echo ok ;;
        124 | 137) echo timeout ;;
        *) echo "failed" ;;
    esac
}

stage_environment() {
    CURRENT_STAGE=environment STAGE_START=$SECONDS
    local began=$SECONDS
    {
        echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  cores: $(nproc)"
        echo "== nvidia-smi"
        timeout 20 nvidia-smi 2>&1 || echo "(nvidia-smi unavailable)"
        echo "== toolchain"
        (command -v nvcc > /dev/null && nvcc --version | tail -n 2) || echo "nvcc: not on PATH"
        (gcc --version 2>&1 | head -n 1) || true
        echo "ninja $(ninja --version 2>&1)"
        echo "== memory and disk"
        free -g 2>&1 | head -n 2
        df -h "$ROOT" 2>&1 | tail -n 1
        echo "== python"
        timeout 60 "$PYTHON" benchmarks/gpu_check_report.py environment --json "$STATE/env.json" 2>&1
    } > "$OUT/env.log" 2>&1
    local gpu
    gpu=$(json_field "$STATE/env.json" gpu)
    if [ "${E3FAST_GPU_CHECK_SMOKE:-}" = 1 ]; then
        MODE=smoke
        record_stage environment ok $((SECONDS - began)) \
            "smoke mode (E3FAST_GPU_CHECK_SMOKE=1)${gpu:+; GPU present: $gpu}"
    elif [ "${E3FAST_GPU_CHECK_SMOKE:-}" = 0 ]; then
        record_stage environment ok $((SECONDS - began)) "GPU mode forced (E3FAST_GPU_CHECK_SMOKE=0); GPU: ${gpu:-none}"
    elif [ -z "$gpu" ]; then
        MODE=smoke
        record_stage environment ok $((SECONDS - began)) "no GPU visible to torch: smoke mode (CPU)"
    else
        record_stage environment ok $((SECONDS - began)) "$gpu"
    fi
}

gpu_arch() {
    if [ -n "${E3FAST_CUDA_ARCH:-}" ]; then echo "$E3FAST_CUDA_ARCH"; return; fi
    timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' '
}

# A build that failed leaves an older extension in place: move it aside so nothing tests it.
set_aside_stale_extension() {
    local stale
    for stale in e3fast/_C*.so; do
        [ -e "$stale" ] || continue
        mkdir -p build/stale-extension && mv -f "$stale" build/stale-extension/ && echo "moved aside: $stale"
    done
}

stage_build() {
    CURRENT_STAGE=build STAGE_START=$SECONDS
    local began=$SECONDS limit cuda arch code status
    limit=$(smaller "${E3FAST_BUILD_SECONDS:-180}" $(($(seconds_left) - TOTAL_SECONDS * 60 / 100)))
    if [ "$limit" -lt 30 ]; then
        record_stage build skipped 0 "no time left"; return
    fi
    if [ "$MODE" = gpu ]; then
        cuda=1
        arch=$(gpu_arch)
        if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
            export PATH="/usr/local/cuda/bin:$PATH" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
        fi
    else
        cuda=0 arch=unused
    fi
    arch=${arch:-8.0;9.0}  # setup.py's default where the GPU does not say
    echo "E3FAST_CUDA=$cuda E3FAST_CUDA_ARCH=$arch MAX_JOBS=${MAX_JOBS:-16}, limit ${limit} s" > "$OUT/build.log"
    E3FAST_CUDA=$cuda E3FAST_CUDA_ARCH="$arch" MAX_JOBS=${MAX_JOBS:-16} \
        run_limited "$limit" "$OUT/build.log" "$PYTHON" setup.py build_ext --inplace
    code=$?
    status=$(exit_status $code)
    [ "$code" = 0 ] || set_aside_stale_extension >> "$OUT/build.log" 2>&1
    echo "== the extension after the build" >> "$OUT/build.log"
    timeout 60 "$PYTHON" benchmarks/gpu_check_report.py extension --json "$STATE/extension.json" \
        >> "$OUT/build.log" 2>&1
    trim_log "$OUT/build.log"
    local loaded
    loaded=$(json_field "$STATE/extension.json" line)
    record_stage build "$status" $((SECONDS - began)) \
        "E3FAST_CUDA=$cuda arch $arch (exit $code); ${loaded:-extension state unknown}"
}

# The test files worth the GPU's time, quickest first (a stage that runs out of time keeps the most):
# the CUDA kernel tests, the fast backends at the benchmark's sizes, the backend selection, any file
# that parametrizes over the CUDA backends (conftest's CUDA_FAST_BACKENDS), and the Triton kernel
# tests last (their autotuning compiles every configuration: about 2 minutes on an H200).
gpu_test_files() {
    if [ -n "${E3FAST_GPU_TESTS:-}" ]; then echo "$E3FAST_GPU_TESTS"; return; fi
    local files=() file
    for file in tests/test_cuda_ops.py tests/test_gpu_large_volumes.py tests/test_backends.py; do
        [ -e "$file" ] && files+=("$file")
    done
    for file in $(grep -l "CUDA_FAST_BACKENDS" tests/test_*.py 2>/dev/null) tests/test_triton_kernels.py; do
        case " ${files[*]} " in *" $file "*) ;; *) [ -e "$file" ] && files+=("$file") ;; esac
    done
    echo "${files[*]}"
}

stage_tests() {
    CURRENT_STAGE=tests STAGE_START=$SECONDS
    local began=$SECONDS limit files code
    limit=$(smaller "${E3FAST_TESTS_SECONDS:-120}" $(($(seconds_left) - TOTAL_SECONDS * 43 / 100)))
    files=$(gpu_test_files)
    if [ "$limit" -lt 20 ]; then
        record_stage tests skipped 0 "no time left (files: $files)"; return
    fi
    echo "== pytest over: $files (limit ${limit} s)" > "$OUT/tests.log"
    # shellcheck disable=SC2086  # $files is a list of paths
    run_limited "$limit" "$OUT/tests.log" "$PYTHON" -m pytest -v --tb=short -rfEs -p no:cacheprovider \
        --maxfail="${E3FAST_GPU_TEST_MAXFAIL:-10}" --continue-on-collection-errors --durations=15 \
        --junitxml="$STATE/tests.xml" $files
    code=$?
    trim_log "$OUT/tests.log"
    local status counts
    case "$code" in
        0) status=ok ;;
        1) status=failed ;;
        5) status="no tests" ;;
        124 | 137) status=timeout ;;
        *) status="error" ;;
    esac
    counts=$(tail -n 3 "$OUT/tests.log" | grep -E "passed|failed|error|skipped" | tail -n 1 | tr -d '=')
    record_stage tests "$status" $((SECONDS - began)) "pytest exit $code: ${counts:-no summary line}; files: $files"
}

stage_bench() {
    CURRENT_STAGE=bench STAGE_START=$SECONDS
    local began=$SECONDS budget args code
    if [ "$MODE" = gpu ]; then
        budget=$(smaller "${E3FAST_BENCH_SECONDS:-240}" $(($(seconds_left) - 30)))
        args=(--device cuda)
    else
        budget=$(smaller "${E3FAST_BENCH_SECONDS:-120}" $(($(seconds_left) - 30)))
        args=(--device cpu --quick)
    fi
    if [ "$budget" -lt 30 ]; then
        record_stage bench skipped 0 "no time left"; return
    fi
    : > "$OUT/bench.log"
    [ -n "${E3FAST_BENCH_BACKENDS:-}" ] && args+=(--backends "$E3FAST_BENCH_BACKENDS")
    run_limited $((budget + 30)) "$OUT/bench.log" "$PYTHON" benchmarks/gpu_bench.py --out "$OUT" --budget "$budget" \
        "${args[@]}"
    code=$?
    trim_log "$OUT/bench.log"
    local counts
    counts=$("$PYTHON" benchmarks/gpu_check_report.py bench-counts "$OUT/gpu_bench.json" 2>/dev/null)
    local status
    case "$code" in
        0) status=ok ;;
        1) status=partial ;;  # gpu_bench.py stopped early (deadline, restarts); the counts say why
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record_stage bench "$status" $((SECONDS - began)) \
        "budget ${budget} s, exit $code; ${counts:-no results file}"
}

write_summary() {
    if ! timeout 60 "$PYTHON" benchmarks/gpu_check_report.py summary --state "$STATE" --out "$OUT" --mode "$MODE" \
        --seconds $((SECONDS - START)) --budget "$TOTAL_SECONDS"; then
        {
            echo "# e3fast GPU check ($MODE)"
            echo
            echo "The summary script failed; the raw stage records:"
            echo
            echo '```'
            cat "$STATE/stages.tsv"
            echo '```'
        } > "$OUT/summary.md"
    fi
}

# The summary is rewritten after every stage: a check killed from outside still has one.
stage_environment
write_summary
stage_build
write_summary
stage_tests
write_summary
stage_bench
write_summary
echo "gpu_check: done in $((SECONDS - START)) s; results in $OUT"
ls -l "$OUT"
