"""Where the fast unlearning step spends its GPU time, without Nsight Systems.

The GPU machines this project gets have Nsight Compute but not always Nsight Systems, so this
script uses torch.profiler (CUPTI) instead: it runs the fast step eagerly (a graph replay hides
the phases), maps the engine's NVTX ranges onto profiler ranges, and prints
  1. GPU time per engine phase (mapping, backbone, render, superres, lpips, identity, backward,
     optimizer; docs/performance.md §4),
  2. the top kernels by GPU time, and the top convolution shapes (which network they belong to
     is readable from the channel counts: SR 128/64 ch at 256-512 px, LPIPS-VGG 64-512 ch,
     the backbone 512-96 ch up to 256 px),
  3. an A/B of the memory format (NCHW vs channels_last) for the three conv networks at one
     step's batch (5 images), forward + backward, bf16 autocast.

    python -m profiling.step_breakdown [--preset ffhq512-128] [--steps 3] [--no-ab]
"""
from __future__ import annotations

import argparse
import sys

import torch

PHASES = ("mapping", "backbone", "render", "superres", "lpips", "identity", "backward", "optimizer")


class _ProfilerRanges:
    """Stands in for torch.cuda.nvtx: every engine range becomes a torch.profiler range."""

    def __init__(self):
        self.stack = []
        self.names = set()

    def range_push(self, name):
        self.names.add(name)
        rf = torch.profiler.record_function(name)
        rf.__enter__()
        self.stack.append(rf)

    def range_pop(self):
        self.stack.pop().__exit__(None, None, None)


def _time(fn) -> float:
    from benchmarks.common import time_fn

    return time_fn(fn, warmup=3, repeats=10)["median_ms"]


def memory_format_ab(gen, lpips, batch=5):
    """fwd+bwd ms of SR, LPIPS and the backbone in NCHW and channels_last (bf16 autocast)."""
    from guide_fast import ExecutionPlan

    dev = next(gen.parameters()).device
    bf16 = ExecutionPlan.resolve(dev, precision="bf16")  # the fast path's autocast, from the one plan
    cfg = gen.config
    res = gen.neural_rendering_resolution
    ws = gen.mapping(torch.randn(batch, cfg.z_dim, device=dev), torch.zeros(batch, 25, device=dev)).detach()
    feat0 = torch.randn(batch, cfg.decoder_output_dim, res, res, device=dev)
    img0 = torch.rand(batch, 3, 512, 512, device=dev) * 2 - 1
    rows = []
    was_training = gen.training
    gen.train()  # the engine's mode: non-fused modulated convs (eg3d/ops.py)
    trainable = [p for _, p in gen.trainable_synthesis_parameters()]
    flags = [p.requires_grad for p in trainable]
    for p in trainable:
        p.requires_grad_(True)
    for fmt in (torch.contiguous_format, torch.channels_last):
        gen.to(memory_format=fmt)
        lpips.to(memory_format=fmt)
        feat = feat0.contiguous(memory_format=fmt).requires_grad_(True)
        img = img0.contiguous(memory_format=fmt).requires_grad_(True)

        def sr():
            with bf16.autocast(cache_enabled=False):
                out = gen.superresolution(feat[:, :3], feat, ws, noise_mode="none")
            out.float().square().mean().backward()

        def lp():
            with bf16.autocast(cache_enabled=False):
                out = lpips(img, img0.contiguous(memory_format=fmt))
            out.float().sum().backward()

        def bb():
            with bf16.autocast(cache_enabled=False):
                out = gen.planes(ws, noise_mode="const", validate=False)
            out.float().square().mean().backward()

        name = "channels_last" if fmt is torch.channels_last else "NCHW"
        rows.append((name, _time(sr), _time(lp), _time(bb)))
    gen.to(memory_format=torch.contiguous_format)
    lpips.to(memory_format=torch.contiguous_format)
    gen.zero_grad(set_to_none=True)
    gen.train(was_training)
    for p, flag in zip(trainable, flags):
        p.requires_grad_(flag)
    print(f"\nmemory format A/B, batch {batch}, bf16 autocast, fwd+bwd ms:")
    print(f"  {'format':14s} {'superres':>9s} {'lpips':>9s} {'backbone':>9s}")
    for name, a, b, c in rows:
        print(f"  {name:14s} {a:9.2f} {b:9.2f} {c:9.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ffhq512-128")
    ap.add_argument("--identities", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-ab", action="store_true", help="skip the memory-format A/B")
    ap.add_argument("--compile", choices=["on", "off"], default="off",
                    help="profile the compiled step (guide_fast/compiled.py): which kernels Inductor left unfused")
    ap.add_argument("--noise-passes", choices=["shared", "separate"], default="shared")
    ap.add_argument("--skip-path", choices=["reference", "triton"], default="reference",
                    help="the synthesis skip paths: official operators or the fused kernel (kernels/skip_path.py)")
    from benchmarks.common import parse_args

    args = parse_args(ap, argv)
    import guide_fast.profiling as prof
    from guide_fast import UnlearnConfig, Unlearner
    from guide_fast.eg3d.generator import build_generator
    from guide_fast.identity import IdentityLoss, build_backbone
    from guide_fast.perceptual import LPIPS

    on_cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if on_cuda else "cpu")  # CPU: a smoke test of the script (no GPU times)
    torch.backends.cudnn.benchmark = True
    gen = build_generator(args.preset, seed=0, device=dev)
    id_loss = IdentityLoss(build_backbone("ir_se50", seed=0)).to(dev)
    lpips = LPIPS.random(0).to(dev)
    cfg = UnlearnConfig(iterations=10**6, cuda_graph=False, log_every=10**9, compile=args.compile,
                        noise_passes=args.noise_passes, skip_path=args.skip_path)
    session = Unlearner(gen, id_loss, lpips, cfg).prepare(seeds=list(range(args.identities)))
    for _ in range(3):
        session.step()
    session.synchronize()

    recorder = _ProfilerRanges()
    original = prof._backend
    prof._backend = lambda: ("torch", recorder)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA],
                                    record_shapes=True) as p:
            for _ in range(args.steps):
                session.step()
            session.synchronize()
    finally:
        prof._backend = original

    events = p.key_averages()
    # the ranges also appear as GPU-side spans of device type CUDA: keep them out of kernel sums
    is_kernel = lambda e: e.device_type == torch.autograd.DeviceType.CUDA and e.key not in recorder.names  # noqa: E731
    kernel_total = sum(e.self_device_time_total for e in events if is_kernel(e))
    print(f"\nfast step, {args.preset}, N={args.identities}, eager: {kernel_total / 1e3 / args.steps:.1f} ms of "
          "kernel time per step")
    print("GPU time per phase (ms/step; backward kernels run on the autograd thread and count under 'backward'"
          " only when launched from it):")
    by_name = {e.key: e for e in events}
    for ph in PHASES:
        e = by_name.get(ph)
        if e is not None:
            print(f"  {ph:10s} {e.device_time_total / 1e3 / args.steps:8.2f}   (x{e.count // args.steps} per step)")
    print("\ntop kernels (ms/step, calls/step):")
    kernels = sorted((e for e in events if is_kernel(e)), key=lambda e: -e.self_device_time_total)
    for e in kernels[:30]:
        print(f"  {e.self_device_time_total / 1e3 / args.steps:8.2f} {e.count // args.steps:5d}  {e.key[:150]}")
    print("\ntop operators with shapes (self GPU ms/step):")
    shaped = sorted(p.key_averages(group_by_input_shape=True), key=lambda e: -e.self_device_time_total)
    for e in [e for e in shaped if e.device_type != torch.autograd.DeviceType.CUDA][:40]:
        shapes = str(e.input_shapes)[:120]
        print(f"  {e.self_device_time_total / 1e3 / args.steps:8.2f} {e.count // args.steps:5d}  {e.key[:40]:40s} {shapes}")
    if not args.no_ab and on_cuda:
        memory_format_ab(gen, lpips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
