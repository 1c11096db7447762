#!/usr/bin/env bash
# GPU suite for the identity networks (issue 4): the identity / perceptual tests (the CUDA graph
# and TensorRT tests run only here; tests needing facenet-pytorch, lpips or scikit-image skip
# themselves with a reason when those are absent) and the throughput benchmark.
#
#   benchmarks/gpu_suite_identity.sh DIR      # logs, junit XML and results.csv go to DIR
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_suite_identity.sh DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."

status=0
"$PY" - <<'PY' 2>&1 | tee "$OUT/identity_env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
for m in ("onnx", "onnxruntime", "onnxscript", "tensorrt", "facenet_pytorch", "lpips", "skimage"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "absent:", type(exc).__name__)
PY

"$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_identity_scorer.py tests/test_identity_backbones.py tests/test_identity_align.py tests/test_perceptual.py \
    --junitxml="$OUT/identity_tests.xml" 2>&1 | tee "$OUT/identity_tests.log" || status=1

GUIDE_FAST_RESULTS_DIR="$OUT" "$PY" benchmarks/bench_identity.py --quick 2>&1 | tee "$OUT/bench_identity.log" || status=1
exit $status
