#!/usr/bin/env bash
# The GPU suite: GPU parity tests, then every benchmark, in at most about 8 minutes on one H100/H200.
# Writes everything under $OUT (the device tool's output folder) or the folder given as $1.
#   GUIDE_FAST_COMMIT=$(git rev-parse --short=12 HEAD) bash benchmarks/gpu_suite.sh /tmp/gpu_out
# The GPU machine lacks facenet-pytorch, lpips and nvtx: they travel as wheels in .whl/ (git-ignored;
# carry it), made here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl facenet-pytorch==2.6.0 lpips==0.1.4 nvtx
# and installed with --no-deps into /tmp/site. The project is installed editable, offline, without deps.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/guide_fast_gpu}}"
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
export GUIDE_FAST_RESULTS_DIR="$OUT/results"
export GUIDE_FAST_COMMIT="${GUIDE_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
PY=${PYTHON:-python3}
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
status=0

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { echo "editable install failed"; tail -5 "$OUT/install.log"; }
if ! $PY -c "import guide_fast.kernels" 2>/dev/null; then
  # bare checkout fallback: make kernels/ importable as guide_fast.kernels
  ln -sfn ../kernels guide_fast/kernels && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'PY' | tee "$OUT/versions.txt"
import torch, triton, guide_fast, guide_fast.kernels
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
PY

step "GPU parity tests"
timeout 180 $PY -m pytest -q -rs -p no:cacheprovider \
  tests/test_kernel_render.py tests/test_gpu_engine.py tests/test_identity_scorer.py tests/test_perceptual.py \
  2>&1 | tee "$OUT/pytest_gpu.log" || status=1

run_bench() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  step "benchmark $name"
  if [ -f "benchmarks/$name.py" ]; then
    timeout "$limit" $PY -m "benchmarks.$name" "$@" 2>&1 | tee "$OUT/$name.log" || { echo "($name exited non-zero or timed out)"; status=1; }
  else
    echo "(benchmarks/$name.py not present)"
  fi
}
run_bench bench_render 60 --quick
run_bench bench_identity 40 --quick
run_bench bench_unlearn 130 --budget-s 115
run_bench bench_eval 40 --quick

if command -v ncu >/dev/null 2>&1 && [ -f profiling/ncu_render.sh ]; then
  step "Nsight Compute: one fused render kernel"
  timeout 40 bash profiling/ncu_render.sh "$OUT/ncu" 2>&1 | tail -40 | tee "$OUT/ncu.log" || echo "(ncu step failed or timed out)"
fi

step "summary"
if [ -f benchmarks/run.py ]; then
  $PY -m benchmarks.run --summarize-only 2>&1 | tail -60 || true
fi
column -s, -t < "$OUT/results/results.csv" 2>/dev/null | cut -c1-220 | tail -60 || cat "$OUT/results/results.csv"
echo "suite finished in $(( $(date +%s) - t0 ))s, status $status"
exit $status
