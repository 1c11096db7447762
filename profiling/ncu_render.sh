#!/usr/bin/env bash
# Nsight Compute on the fused tri-plane render kernel (forward, and backward with --backward).
#
#   usage: profiling/ncu_render.sh [OUT_PREFIX] [profile_render.py args ...]
#   e.g.   profiling/ncu_render.sh profiling/out/render_fwd --dtype bf16
#          profiling/ncu_render.sh profiling/out/render_bwd --backward
#
# --profile-from-start off: only launches after cudaProfilerStart (profile_render.py calls it
# after the warm-up, so no compilation or autotuning launch is profiled); --kernel-name keeps
# the fused render kernels; --nvtx records the NVTX range of each launch ("render" /
# "render_backward"). Environment: NCU (binary), PYTHON, NCU_SET (default full),
# LAUNCHES (default 2), KERNEL (a kernel-name filter), NCU_EXTRA (more ncu flags, e.g.
# '--nvtx-include render/' to keep only launches inside the "render" push/pop range).
# Writes OUT_PREFIX.ncu-rep (open it in ncu-ui) and OUT_PREFIX.summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-profiling/out/render_kernel}"
shift || true
ncu_bin="${NCU:-$(command -v ncu || ls -1 /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu \
  /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1 || true)}"
if [ -z "$ncu_bin" ] || [ ! -x "$ncu_bin" ]; then
  echo "ncu (Nsight Compute) not found: install it or set NCU=/path/to/ncu" >&2
  exit 127
fi
mkdir -p "$(dirname "$out")"
# shellcheck disable=SC2086  # NCU_EXTRA is a list of flags
"$ncu_bin" --profile-from-start off --nvtx \
  --kernel-name "${KERNEL:-regex:triplane_render_(forward|backward)_kernel}" \
  --launch-count "${LAUNCHES:-2}" --set "${NCU_SET:-full}" --import-source yes \
  ${NCU_EXTRA:-} --force-overwrite --export "$out" \
  "${PYTHON:-python3}" -m profiling.profile_render "$@"
"$ncu_bin" --import "$out.ncu-rep" --print-summary per-kernel | tee "$out.summary.txt"
echo "wrote $out.ncu-rep and $out.summary.txt"
