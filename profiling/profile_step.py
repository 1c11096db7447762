"""Profile the unlearning step: warm-up outside the capture range, N steady-state steps inside.

Builds the engine exactly as `guide-fast unlearn` does (random-weight loss networks: the cost
of a step does not depend on the weights), runs --warmup steps (Triton compilation, cuDNN
autotuning, the CUDA-graph capture of the fast path all happen there), then brackets --steps
steps with torch.cuda.profiler.start() / stop(), i.e. cudaProfilerStart / cudaProfilerStop: the
capture range of `nsys profile --capture-range=cudaProfilerApi` and of `ncu --profile-from-start
off`. The steady-state steps sit inside an NVTX range "steady_state", one "iteration_<i>" range per
step; the engine's own per-phase ranges (see README.md) nest inside.

    python -m profiling.profile_step [--preset ffhq512-128|tiny] [--generator CKPT] [--identities N]
        [--warmup W] [--steps N] [--path fast|reference] [--no-cuda-graph] [--precision auto|fp32|bf16]
    python -m profiling.profile_step --list-ranges    # print the NVTX ranges one step emits (any device)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter

import torch


def _nvtx_range(name: str):
    """The project's helper (guide_fast.profiling.nvtx_range); a no-op if it is missing."""
    try:
        from guide_fast.profiling import nvtx_range

        return nvtx_range(name)
    except ImportError:
        return contextlib.nullcontext()


class _RangeRecorder:
    """Stands in for torch.cuda.nvtx while --list-ranges runs: records push/pop as paths."""

    def __init__(self):
        self.stack, self.seen = [], Counter()

    def range_push(self, name):
        self.stack.append(name)
        self.seen["/".join(self.stack)] += 1

    def range_pop(self):
        self.stack.pop()


def build_session(args, device):
    from guide_fast import UnlearnConfig, Unlearner
    from guide_fast.identity import IdentityLoss, build_backbone
    from guide_fast.perceptual import LPIPS

    if args.generator:
        from guide_fast.checkpoints import load_generator

        gen = load_generator(args.generator, device=device)
    else:
        from guide_fast.eg3d.generator import build_generator

        gen = build_generator(args.preset, seed=0, device=device)
    id_loss = IdentityLoss(build_backbone("ir_se50", seed=0)).to(device)
    lpips = LPIPS.random(0).to(device)
    config = UnlearnConfig(iterations=args.warmup + args.steps + 1, path=args.path, precision=args.precision,
                           cuda_graph=not args.no_cuda_graph, warmup_steps=min(2, max(args.warmup - 1, 0)),
                           log_every=10**9)
    unlearner = Unlearner(gen, id_loss, lpips, config)
    return unlearner.prepare(seeds=list(range(args.identities)))


def list_ranges(args, device) -> int:
    """Run warm-up + one step eagerly with a recorder in place of the NVTX backend and print the
    range paths the step emits (the names Nsight Systems will show)."""
    import guide_fast.profiling as prof

    recorder = _RangeRecorder()
    original = prof._backend
    prof._backend = lambda: ("torch", recorder)  # nvtx_range looks its backend up on every call
    try:
        args.no_cuda_graph = True  # a graph replay emits no NVTX ranges: record an eager step
        session = build_session(args, device)
        with _nvtx_range("step_under_test"):
            session.step()
        session.synchronize()
    finally:
        prof._backend = original
    print("NVTX ranges emitted by one eager step (path: count):")
    for path, count in sorted(recorder.seen.items()):
        print(f"  {path}: {count}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Profile N steady-state unlearning steps (cudaProfilerApi capture range).")
    ap.add_argument("--preset", default=None, help="generator preset with random weights (default ffhq512-128 on "
                    "CUDA, tiny on CPU)")
    ap.add_argument("--generator", default=None, help="a real checkpoint instead of a preset")
    ap.add_argument("--identities", type=int, default=1, help="identities unlearned at once (N)")
    ap.add_argument("--warmup", type=int, default=5, help="steps before the capture range (>= 4 with a CUDA graph: "
                    "2 eager warm-up steps, the capture, one replay)")
    ap.add_argument("--steps", type=int, default=10, help="steady-state steps inside the capture range")
    ap.add_argument("--path", choices=["fast", "reference"], default="fast")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--no-cuda-graph", action="store_true", help="run the fast step eagerly, so that the per-phase "
                    "NVTX ranges show in the timeline (a graph replay emits none)")
    ap.add_argument("--list-ranges", action="store_true", help="print the NVTX ranges of one step and exit")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("ffhq512-128" if device.type == "cuda" else "tiny")
    if args.list_ranges:
        args.warmup, args.steps = 0, 1
        return list_ranges(args, device)
    if device.type == "cuda" and args.path == "fast" and not args.no_cuda_graph and args.warmup < 4:
        ap.error("--warmup must be >= 4 with the CUDA graph (2 eager steps, capture, first replay)")

    t0 = time.perf_counter()
    session = build_session(args, device)
    print(f"[profile_step] {args.preset if not args.generator else args.generator}, N={args.identities}, "
          f"path {args.path}, renderer {session.plan.renderer}, precision {session.plan.precision}, "
          f"cuda graph {session.use_graph}, setup {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        session.step()
    session.synchronize()
    print(f"[profile_step] warm-up: {args.warmup} steps in {time.perf_counter() - t0:.1f}s (outside the capture range)",
          flush=True)

    on_cuda = device.type == "cuda"
    if on_cuda:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.profiler.start()  # cudaProfilerStart: nsys/ncu begin capturing here
        start.record()
    t0 = time.perf_counter()
    with _nvtx_range("steady_state"):
        for i in range(args.steps):
            with _nvtx_range(f"iteration_{i}"):
                session.step()
    if on_cuda:
        stop.record()
        session.synchronize()
        torch.cuda.profiler.stop()  # cudaProfilerStop: capture ends
        ms = start.elapsed_time(stop) / args.steps
    else:
        session.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / args.steps
    session.read_losses()  # host read-back after the range; also fails loudly on a non-finite loss
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB" if on_cuda else ""
    print(f"[profile_step] {args.steps} steady-state steps: {ms:.2f} ms/step{peak} "
          f"(inside the capture range{'' if on_cuda else '; CPU: no profiler range'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
