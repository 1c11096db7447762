"""Run the fused tri-plane render kernels at FFHQ settings for Nsight Compute.

Settings (docs/eg3d.md §4.9, as benchmarks/bench_render.py): planes [B, 3, 32, 256, 256], 128x128
rays per image, 48 + 48 samples per ray, the FFHQ decoder (32 -> 64 -> 33). --warmup renders
(Triton compilation and autotuning) run before torch.cuda.profiler.start(), so `ncu
--profile-from-start off` sees only the measured launches, inside the NVTX range "render" (and
"render_backward" with --backward).

    python -m profiling.profile_render [--batch B] [--dtype fp32|bf16] [--backward] [--warmup W] [--repeats R]
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

RES = 128
PLANE_RES = 256


def _nvtx_range(name: str):
    try:
        from guide_fast.profiling import nvtx_range

        return nvtx_range(name)
    except ImportError:
        return contextlib.nullcontext()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="plane dtype (the fast path uses bf16)")
    ap.add_argument("--backward", action="store_true", help="also run the backward kernel (planes gradient)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="measured launches inside the capture range")
    ap.add_argument("--backend", choices=["triton", "reference"], default="triton")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_render.py needs a CUDA device (Nsight Compute profiles GPU kernels)", file=sys.stderr)
        return 2
    from guide_fast import cameras
    from guide_fast.eg3d.networks import OSGDecoder
    from guide_fast.render import RenderOptions, make_render_draws, render_triplanes, sample_rays

    device = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    decoder = OSGDecoder(32, 64, 32).to(device).requires_grad_(False)  # frozen, as in GUIDE
    planes = torch.randn(args.batch, 3, 32, PLANE_RES, PLANE_RES, generator=g).to(device=device, dtype=dtype)
    planes.requires_grad_(args.backward)
    c = cameras.pose_label(torch.zeros(args.batch), -0.2).to(device)
    origins, dirs = sample_rays(c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3), RES)
    opts = RenderOptions()
    draws = {k: v.to(device) for k, v in make_render_draws(args.batch, RES * RES, opts, generator=g).items()}

    def run():
        feats, depth, _ = render_triplanes(planes, decoder, origins.contiguous(), dirs.contiguous(), options=opts,
                                           render_draws=draws, backend=args.backend, validate=False)
        if args.backward:
            with _nvtx_range("render_backward"):
                feats.float().square().mean().backward()
        return feats

    for _ in range(args.warmup):
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()  # cudaProfilerStart: ncu --profile-from-start off starts here
    for _ in range(args.repeats):
        with _nvtx_range("render"):
            run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"[profile_render] {args.repeats} x render of {args.batch} image(s) at {RES}x{RES}, 48+48 samples, "
          f"{args.dtype} planes, backend {args.backend}{', with backward' if args.backward else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
