#!/usr/bin/env bash
# Nsight Systems timeline of the unlearning step: N steady-state steps, warm-up excluded.
#
#   usage: profiling/nsys_unlearn.sh [OUT_PREFIX] [profile_step.py args ...]
#   e.g.   profiling/nsys_unlearn.sh profiling/out/step_graph --steps 10
#          profiling/nsys_unlearn.sh profiling/out/step_eager --no-cuda-graph --steps 5
#
# profile_step.py calls cudaProfilerStart after its warm-up (Triton compilation, cuDNN
# autotuning, CUDA-graph capture) and cudaProfilerStop after --steps steps; with
# --capture-range=cudaProfilerApi nsys records only that window. --cuda-graph-trace=node shows
# each kernel of a replayed graph (default nsys shows one block per graph launch).
# Writes OUT_PREFIX.nsys-rep and OUT_PREFIX.stats.txt (NVTX and kernel summaries).
# NSYS selects the binary (nsys is not on the PATH of every machine); PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-profiling/out/unlearn_step}"
shift || true
nsys_bin="${NSYS:-$(command -v nsys || ls -1 /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys \
  /usr/local/cuda-*/bin/nsys 2>/dev/null | tail -n 1 || true)}"
if [ -z "$nsys_bin" ] || [ ! -x "$nsys_bin" ]; then
  echo "nsys (Nsight Systems) not found: install it or set NSYS=/path/to/nsys" >&2
  exit 127
fi
mkdir -p "$(dirname "$out")"
"$nsys_bin" profile \
  --trace=cuda,nvtx,osrt \
  --capture-range=cudaProfilerApi --capture-range-end=stop \
  --cuda-graph-trace=node \
  --sample=none --cpuctxsw=none \
  --force-overwrite=true --output "$out" \
  "${PYTHON:-python3}" -m profiling.profile_step "$@"
# Report names of Nsight Systems 2023.2+; older releases call them nvtxsum / gpukernsum.
"$nsys_bin" stats --force-export=true --format table \
  --report nvtx_sum --report nvtx_gpu_proj_sum --report cuda_gpu_kern_sum \
  "$out.nsys-rep" | tee "$out.stats.txt" \
  || "$nsys_bin" stats --format table --report nvtxsum --report gpukernsum "$out.nsys-rep" | tee "$out.stats.txt"
echo "wrote $out.nsys-rep and $out.stats.txt"
