#!/usr/bin/env bash
# GPU-suite fragment for evaluation (issue 7): tests/test_fid.py and tests/test_evaluate.py on
# the GPU, then benchmarks/bench_eval.py (FFHQ preset: ID over 11 views + FID_pre on up to 5000
# paired samples, reference vs fast per pair, the host Fréchet distance).
#   usage: benchmarks/gpu_suite_eval.sh OUT_DIR      (run from the repository root)
# Writes OUT_DIR/test_eval.log, OUT_DIR/bench_eval.log and OUT_DIR/eval.csv.
# PYTHON selects the interpreter (default python3); BENCH_EVAL_ARGS adds flags (e.g. --quick,
# --budget-s 60). About 1 min of tests and 2-3 min of benchmark (incl. Triton compilation).
set -uo pipefail
out="${1:?usage: $0 OUT_DIR}"
mkdir -p "$out"
py="${PYTHON:-python3}"
status=0
"$py" -m pytest -q -rs --durations=10 tests/test_fid.py tests/test_evaluate.py 2>&1 | tee "$out/test_eval.log" || status=1
# shellcheck disable=SC2086  # BENCH_EVAL_ARGS is a list of flags
"$py" -m benchmarks.bench_eval --out "$out/eval.csv" ${BENCH_EVAL_ARGS:-} 2>&1 | tee "$out/bench_eval.log" || status=1
exit $status
