#!/usr/bin/env bash
# Run the e3fast CPU benchmarks and write benchmarks/results/<machine-slug>-<date>.{json,md}.
#
# Settings: every benchmark gets at least 3 timed rounds and up to 2 s of rounds (fast ops get
# many); pytest-benchmark's first, calibration call serves as the warm-up and is not timed; the
# garbage collector is off while timing. About 10-15 minutes on 2 cores at the default size.
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
