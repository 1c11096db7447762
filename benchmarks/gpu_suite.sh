#!/usr/bin/env bash
# The GPU suite: GPU parity tests, then every benchmark, in at most about 8 minutes on one H100/H200.
# Writes everything under $OUT (the device tool's output folder) or the folder given as $1.
#   GUIDE_FAST_COMMIT=$(git rev-parse --short=12 HEAD) bash benchmarks/gpu_suite.sh /tmp/gpu_out
# From the device tool (one call, about 8 minutes; carry .whl):
#   run(command="GUIDE_FAST_COMMIT=$(git rev-parse --short=12 HEAD) bash benchmarks/gpu_suite.sh", timeout_s=600,
#       carry=[".whl"])
# Time budget: SUITE_BUDGET_S (default 560 s) for the whole suite; each part has its own budget
# (below, in seconds) and is cut to what is left; a part that cannot start with 20 s left is
# skipped and said so in suite.log (run those in a second call: GPU_SUITE_PARTS="..."). Order =
# priority: the issue-12 headline rows first (unlearn-headline: (b) cold process, then (a) loop
# and (c) warm service: ~2 x (1000 x step + set-up), ~300 s at today's ~122 ms/step), evaluation
# at the real 5000 pairs (compile off, then on with what time is left), the per-step rows
# (reference, fast, fast+compile, noise shared/separate, N=4), the renderer, then the tests. At
# today's step time not every part fits one 10-minute call; the faster the step, the more do.
# The GPU machine lacks facenet-pytorch, lpips and nvtx: they travel as wheels in .whl/ (git-ignored;
# carry it), made here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl facenet-pytorch==2.6.0 lpips==0.1.4 nvtx
# and installed with --no-deps into /tmp/site. The project is installed editable, offline, without deps.
# GPU_SUITE_PARTS picks and orders the parts (default, in this order):
#   unlearn-headline eval unlearn-micro render engine-tests render-tests skip skip-tests goae distributed identity
#   identity-tests ncu
# optional: unlearn (the former all-in-one bench_unlearn run; UNLEARN_BUDGET_S, default 115 s) and
# profile (step breakdown of the compiled step). HEADLINE_COMPILE=on|off|auto sets the headline
# runs' --compile; COMPILE_ABLATION=all adds the reduce-overhead row; UNLEARN_ARGS adds flags to the
# per-step rows. A second call for what the first skipped, e.g.
#   GPU_SUITE_PARTS="unlearn-micro render engine-tests render-tests skip skip-tests" bash benchmarks/gpu_suite.sh
# The device tool returns at most 8 files from $OUT: the suite leaves exactly three there,
# suite.log (everything printed), results.csv (the benchmark rows) and logs.tgz (per-part logs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/guide_fast_gpu}}"
LOGS=$(mktemp -d /tmp/guide_fast_logs.XXXX)
mkdir -p "$OUT"
exec > >(tee "$OUT/suite.log") 2>&1
export PYTHONUNBUFFERED=1
export GUIDE_FAST_RESULTS_DIR="$OUT"
export GUIDE_FAST_COMMIT="${GUIDE_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
PY=${PYTHON:-python3}
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
status=0

# GPU_SUITE_DRY_RUN=1: on any machine, check every part's command (the benchmarks' flags through
# GUIDE_FAST_CHECK_ARGS, the test files and -k selections through pytest --collect-only, the
# shell fragments through bash -n) and run nothing: tests/test_gpu_suite.py does this in CI
DRY=${GPU_SUITE_DRY_RUN:-0}
step "environment"
if [[ $DRY == 1 ]]; then
  echo "dry run: checking the parts' commands only"
else
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 || { echo "editable install failed"; tail -5 "$LOGS/install.log"; }
if ! $PY -c "import guide_fast.kernels" 2>/dev/null; then
  # bare checkout fallback: make kernels/ importable as guide_fast.kernels
  ln -sfn ../kernels guide_fast/kernels && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'PY' | tee "$LOGS/versions.txt"
import torch, triton, guide_fast, guide_fast.kernels
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
PY
fi

PARTS=${GPU_SUITE_PARTS:-unlearn-headline eval unlearn-micro render engine-tests render-tests skip skip-tests goae distributed identity identity-tests ncu}
SUITE_BUDGET_S=${SUITE_BUDGET_S:-560}
# Inductor's on-disk cache in a fixed folder: the cold process and the warm runs share it
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/guide_fast_inductor}
budget() {  # part budget -> seconds to give it (0: skip)
  local want=$1 left=$(( SUITE_BUDGET_S - ($(date +%s) - t0) ))
  if (( left < 20 )); then echo 0; elif (( want > left )); then echo "$left"; else echo "$want"; fi
}

run_tests() {  # name, timeout, test files...
  if [[ $DRY == 1 ]]; then
    local name=$1; shift 2
    if $PY -m pytest -q --collect-only -p no:cacheprovider "$@" >"$LOGS/collect_$name.log" 2>&1; then
      echo "tests ok: $name ($(grep -c '::' "$LOGS/collect_$name.log") selected)"
    else echo "TESTS BROKEN: $name: $*"; tail -5 "$LOGS/collect_$name.log"; status=1; fi
    return
  fi
  local name=$1 limit; limit=$(budget "$2"); shift 2
  if (( limit == 0 )); then echo "SKIPPED (suite budget spent): tests $name"; status=1; return; fi
  step "GPU tests: $name (budget ${limit}s)"
  timeout "$limit" $PY -m pytest -q -rs --durations=8 -p no:cacheprovider "$@" 2>&1 | tee "$LOGS/pytest_$name.log" \
    || { echo "($name tests failed or timed out)"; status=1; }
}
run_bench() {  # name, timeout, args...
  if [[ $DRY == 1 ]]; then
    local name=$1; shift 2
    GUIDE_FAST_CHECK_ARGS=1 $PY -m "benchmarks.$name" "$@" >/dev/null 2>"$LOGS/args_$name.log" \
      && echo "arguments ok: $name $*" || { echo "ARGUMENTS BROKEN: $name $*"; tail -3 "$LOGS/args_$name.log"; status=1; }
    return
  fi
  local name=$1 limit; limit=$(budget "$2"); shift 2
  if (( limit == 0 )); then echo "SKIPPED (suite budget spent): benchmark $name $*"; status=1; return; fi
  step "benchmark $name $* (budget ${limit}s)"
  PART_BUDGET_S=$limit timeout "$limit" $PY -m "benchmarks.$name" "$@" 2>&1 | tee "$LOGS/$name.log" || { echo "($name exited non-zero or timed out)"; status=1; }
}
for part in $PARTS; do
  case $part in
    # (b) cold process, (a) loop, (c) warm service at paper settings (--compile: HEADLINE_COMPILE, default auto)
    unlearn-headline) run_bench bench_unlearn 340 --budget-s 330 --headline yes --micro no \
                        --compile "${HEADLINE_COMPILE:-auto}" ;;
    # per-step rows: reference, fast, fast with the skip-path kernel, noise separate, fast+compile
    # (default and reduce-overhead), N=4
    unlearn-micro) run_bench bench_unlearn 150 --budget-s 140 --headline no --identities 1,4 --ablations none \
                     --kernel-ablation yes --compile-ablation "${COMPILE_ABLATION:-yes}" --noise-ablation yes --quick ${UNLEARN_ARGS:-} ;;
    unlearn) run_bench bench_unlearn $(( ${UNLEARN_BUDGET_S:-115} + 30 )) --budget-s "${UNLEARN_BUDGET_S:-115}" ${UNLEARN_ARGS:-} ;;
    engine-tests) run_tests engine 150 tests/test_gpu_engine.py tests/test_compile.py -k "gpu or cuda" ;;
    render-tests) run_tests render 90 tests/test_kernel_render.py ;;
    render) run_bench bench_render 45 --quick ;;
    # the fused skip-path kernel (kernels/skip_path.py): its benchmark, then its parity tests on the GPU
    skip) run_bench bench_skip 30 --quick ;;
    skip-tests) run_tests skip 90 tests/test_kernel_skip.py ;;
    identity-tests) run_tests identity 90 tests/test_identity_scorer.py tests/test_perceptual.py ;;
    identity) run_bench bench_identity 40 --quick ;;
    # the real 5000-pair FID_pre + ID over 11 views; then folded up-convs + skip kernel, and compile on
    eval) run_bench bench_eval 140 --full-run --operators-ablation --compile-ablation --budget-s 130 --quick ;;
    goae) run_tests goae 60 tests/test_goae.py -k cuda; run_bench bench_goae 45 --quick --budget-s 30 ;;
    # one card: K = 1 per-identity step time, one-process vs the sharded engine in an NCCL world
    # of one, and the all-reduce of the FFHQ gradients with world size 1 (not a scaling figure)
    distributed) run_bench bench_distributed 150 --quick ;;
    # optional (not in the default list): per-phase time and top kernels of the compiled step, to
    # see what Inductor leaves for a hand-written kernel (the skip path has one: kernels/skip_path.py)
    profile) step "step breakdown, compiled"
      if [[ $DRY == 1 ]]; then
        GUIDE_FAST_CHECK_ARGS=1 $PY -m profiling.step_breakdown --compile on --no-ab >/dev/null || status=1; continue
      fi
      timeout "$(budget 120)" $PY -m profiling.step_breakdown --compile on --no-ab 2>&1 | tee "$LOGS/step_breakdown_compiled.log" \
        || echo "(step breakdown failed or timed out)" ;;
    ncu)
      if [[ $DRY == 1 ]]; then bash -n profiling/ncu_render.sh && echo "shell ok: ncu" || status=1; continue; fi
      if command -v ncu >/dev/null 2>&1; then
        step "Nsight Compute: one fused render kernel"
        timeout 40 bash profiling/ncu_render.sh "$LOGS/ncu" 2>&1 | tail -40 | tee "$LOGS/ncu.log" || echo "(ncu step failed or timed out)"
      fi ;;
    *) echo "unknown GPU_SUITE_PARTS entry: $part (known: unlearn-headline unlearn-micro unlearn engine-tests render-tests render skip skip-tests identity-tests identity eval goae distributed profile ncu)"; status=1 ;;
  esac
done

if [[ $DRY == 1 ]]; then echo "dry run finished, status $status"; exit $status; fi
step "summary"
column -s, -t < "$OUT/results.csv" 2>/dev/null | cut -c1-240 || true
tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null || true
echo "suite finished in $(( $(date +%s) - t0 ))s, status $status"
exit $status
