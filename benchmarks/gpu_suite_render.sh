#!/usr/bin/env bash
# GPU-suite fragment for the fused tri-plane renderer (issue 3): the parity tests of
# tests/test_kernel_render.py on the GPU, then benchmarks/bench_render.py.
#   usage: benchmarks/gpu_suite_render.sh OUT_DIR      (run from the repository root)
# Writes OUT_DIR/test_kernel_render.log, OUT_DIR/bench_render.log and OUT_DIR/render.csv.
# PYTHON selects the interpreter (default python3); BENCH_RENDER_ARGS adds flags (e.g. --quick).
# About 1-2 min of Triton compilation, 1 min of tests and 1-2 min of benchmark on an H100/H200.
set -uo pipefail
out="${1:?usage: $0 OUT_DIR}"
mkdir -p "$out"
py="${PYTHON:-python3}"
status=0
"$py" -m pytest -q -rs --durations=10 tests/test_kernel_render.py 2>&1 | tee "$out/test_kernel_render.log" || status=1
# shellcheck disable=SC2086  # BENCH_RENDER_ARGS is a list of flags
"$py" -m benchmarks.bench_render --out "$out/render.csv" ${BENCH_RENDER_ARGS:-} 2>&1 | tee "$out/bench_render.log" || status=1
exit $status
