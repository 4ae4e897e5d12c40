#!/usr/bin/env bash
# Run the e3fast CPU benchmarks and write benchmarks/results/<machine-slug>-<date>.{json,md}.
#
# Settings: the whole-network benchmarks run one warm-up call, then exactly 3 timed rounds; the
# op benchmarks are calibrated by pytest-benchmark (its first call is the warm-up) and get as many
# rounds as fit in 2 s, at least 3. The garbage collector is off while timing. Each benchmark
# then makes one more call under the profiler for its peak memory. Expect 10-15 minutes on a quiet
# 2-core machine at the default size.
#
# Environment: PYTHON (default: python), E3FAST_BENCH_SIZE (default 64), E3FAST_BENCH_THREADS,
# E3FAST_BENCH_ROUNDS (default 3), E3FAST_BENCH_MAX_TIME (seconds, default 2),
# E3FAST_BENCH_RESULTS (output folder, default benchmarks/results).
# Extra arguments go to pytest, e.g. `benchmarks/run_cpu.sh -k unet`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
results_dir="${E3FAST_BENCH_RESULTS:-benchmarks/results}"
mkdir -p "$results_dir"
stem="$results_dir/$("$PYTHON" benchmarks/summarize.py --stem)"

unset TRITON_INTERPRET  # the interpreted Triton backend would take hours at these sizes
"$PYTHON" -m pytest benchmarks -q -p no:cacheprovider \
    --benchmark-min-rounds="${E3FAST_BENCH_ROUNDS:-3}" \
    --benchmark-max-time="${E3FAST_BENCH_MAX_TIME:-2}" \
    --benchmark-disable-gc \
    --benchmark-json="$stem.json" \
    "$@"
"$PYTHON" benchmarks/summarize.py "$stem.json" -o "$stem.md"
