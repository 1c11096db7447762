"""Distributed unlearning (guide_fast.unlearn.distributed): step time with the identities sharded
over ranks, and the cost of the step's one all-reduce.

Always: the bytes all-reduced per step (fp32 trainable gradients + losses + status slots) for the
FFHQ 512/128 layout, counted on the meta device (no weights are built).
CPU (default off CUDA): tiny preset, N identities (default 2): the step time of one process
against two gloo ranks on loopback (spawned here, N/2 identities each), and the time of the
step's flat all-reduce between the two ranks, against bucketed all-reduces of the same buffer.
GPU (on CUDA): ffhq512-128, one card: the per-identity step time of the one-process engine and of
the sharded engine in a world of ONE NCCL rank (the same fast step, split around the all-reduce),
and the all-reduce time of the FFHQ gradient buffer with NCCL world size 1. That last figure is
NCCL's launch and local-copy overhead: no byte crosses a link, so it is NOT a scaling figure
(more than one GPU was not measured).

    python -m benchmarks.bench_distributed [--quick] [--identities 2] [--steps 4]
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import make_row, parse_args, time_session_steps, write_rows

BENCH = "distributed"


def trainable_numel(preset: str) -> int:
    """Trainable (backbone.synthesis) parameter count of a preset, built on the meta device."""
    from guide_fast.eg3d.generator import PRESETS, TriPlaneGenerator

    with torch.device("meta"):
        gen = TriPlaneGenerator(PRESETS[preset]())
    return sum(p.numel() for _, p in gen.trainable_synthesis_parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nets(preset: str, device):
    from guide_fast.eg3d.generator import build_generator
    from guide_fast.identity import IdentityLoss, build_backbone
    from guide_fast.perceptual import LPIPS

    gen = build_generator(preset, seed=0, device=device)
    return gen, IdentityLoss(build_backbone("ir_se50", seed=0)).to(device), LPIPS.random(0).to(device)


def _stats(times: list) -> dict:
    times = sorted(times)
    k = len(times)
    return {"median_ms": statistics.median(times), "p20_ms": times[int(0.2 * (k - 1))],
            "p80_ms": times[int(0.8 * (k - 1))]}


def time_session(nets, n: int, steps: int, device, process_group=None, cfg_kwargs=None) -> tuple[dict, object]:
    """Prepare a session over N identities (sharded when a group is given), run the warm-up steps
    (incl. graph capture on CUDA), then time `steps` steps. -> (timing, session)."""
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    gen, id_loss, lpips = nets
    cfg = UnlearnConfig(**(cfg_kwargs or {}))
    warm = cfg.warmup_steps + 1 if device.type == "cuda" else 1  # CUDA: the eager steps, the capture, one replay
    cfg.iterations = warm + steps
    session = Unlearner(gen, id_loss, lpips, cfg, process_group=process_group).prepare(seeds=list(range(1, n + 1)))
    return time_session_steps(session, warm, steps), session


def time_allreduce(reducer, repeats: int, bucket_mb: float = 0.0) -> dict:
    """The step's all-reduce alone (flat, or in bucket_mb pieces), synchronised each time."""
    import torch.distributed as dist

    reducer.bucket_elems = int(bucket_mb * 2 ** 20 / 4) if bucket_mb > 0 else 0
    times = []
    for i in range(repeats + 2):
        dist.barrier(group=reducer.ctx.group)
        if reducer.flat.is_cuda:
            torch.cuda.synchronize(reducer.flat.device)
        t = time.perf_counter()
        reducer.all_reduce()
        if reducer.flat.is_cuda:
            torch.cuda.synchronize(reducer.flat.device)
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    reducer.bucket_elems = 0
    return _stats(times)


# ------------------------------------------------------------------------------------ CPU: gloo
def _cpu_rank(rank: int, world: int, port: int, n: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        nets = _nets("tiny", "cpu")
        timing, session = time_session(nets, n, steps, torch.device("cpu"))
        reducer = session.reducer
        result = {"step": timing, "bytes": reducer.bytes_per_step, "flat": time_allreduce(reducer, 20),
                  "bucket": time_allreduce(reducer, 20, bucket_mb=reducer.bytes_per_step / 2 ** 20 / 4)}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def cpu_rows(n: int, steps: int) -> list:
    import torch.multiprocessing as mp

    rows = []
    torch.set_num_threads(1)
    one, _ = time_session(_nets("tiny", "cpu"), n, steps, torch.device("cpu"), process_group=False)
    shape = f"tiny N={n}"
    rows.append(make_row(BENCH, "step, 1 process", path="fast", shape=shape, dtype="fp32", timing=one,
                         extra=f"per identity {one['median_ms'] / n:.1f} ms; 1 thread; load average "
                               f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", device="cpu"))
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_cpu_rank, args=(2, _free_port(), n, steps, out), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 900
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise RuntimeError("the two gloo ranks did not finish in 900 s")
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]
    two = ranks[0]
    rows.append(make_row(BENCH, "step, 2 gloo ranks (loopback)", path="fast", shape=shape, dtype="fp32",
                         timing=two["step"], device="cpu",
                         extra=f"{n // 2}+{n - n // 2} identities; speed-up {one['median_ms'] / two['step']['median_ms']:.2f}x "
                               f"vs 1 process; 1 thread per rank; load average {os.getloadavg()[0]:.1f} on "
                               f"{os.cpu_count()} cores (shared with other work)"))
    kib = two["bytes"] / 2 ** 10
    rows.append(make_row(BENCH, "all-reduce flat, 2 gloo ranks", path="fast", shape=f"tiny {kib:.0f} KiB",
                         dtype="fp32", timing=two["flat"], device="cpu", extra=f"{two['bytes']} bytes per step"))
    rows.append(make_row(BENCH, "all-reduce 4 buckets, 2 gloo ranks", path="fast", shape=f"tiny {kib:.0f} KiB",
                         dtype="fp32", timing=two["bucket"], device="cpu",
                         extra="the same buffer in 4 async all-reduces (the flat one is the engine's)"))
    return rows


# ------------------------------------------------------------------------------------- GPU: NCCL
def gpu_rows(identities: list, steps: int) -> list:
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device())
    nets = _nets("ffhq512-128", device)
    rows = []
    for n in identities:
        one, _ = time_session(nets, n, steps, device, process_group=False)
        rows.append(make_row(BENCH, "step, 1 process (no group)", path="fast", shape=f"ffhq512-128 N={n}",
                             dtype="bf16", timing=one, extra=f"per identity {one['median_ms'] / n:.1f} ms",
                             device=device))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120), device_id=device)
    try:
        for n in identities:
            timing, session = time_session(nets, n, steps, device)
            rows.append(make_row(BENCH, "step, sharded engine, NCCL world size 1", path="fast",
                                 shape=f"ffhq512-128 N={n}", dtype="bf16", timing=timing, device=device,
                                 extra=f"per identity {timing['median_ms'] / n:.1f} ms; two graphs around an "
                                       f"eager all-reduce; graph={session.use_graph}"))
        reducer = session.reducer
        mib = reducer.bytes_per_step / 2 ** 20
        ar = time_allreduce(reducer, 50)
        rows.append(make_row(BENCH, "all-reduce flat, NCCL world size 1 (NOT a scaling figure)", path="fast",
                             shape=f"ffhq512-128 {mib:.1f} MiB", dtype="fp32", timing=ar, device=device,
                             extra="one rank: NCCL's launch and local copy only, no byte crosses a link"))
    finally:
        dist.destroy_process_group()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", default=None, help="N (CPU, default 2) or a comma list (GPU, default 1,4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 4 on the CPU, 10 on a GPU)")
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parse_args(ap, argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    numel = trainable_numel("ffhq512-128")
    from guide_fast.unlearn.distributed import gradient_bytes

    rows = []
    for n, k in ((1, 1), (16, 8)):
        b = gradient_bytes(numel, n, k)
        rows.append(make_row(BENCH, "bytes all-reduced per step", shape=f"ffhq512-128 N={n} K={k}", dtype="fp32",
                             extra=f"{b} bytes = {b / 2 ** 20:.1f} MiB ({numel} trainable weights + {4 + n + k} "
                                   f"loss/status values); ring all-reduce moves 2(K-1)/K of it per rank",
                             device="cpu"))
    write_rows(rows)
    if on_gpu:
        ids = [int(x) for x in (args.identities or "1,4").split(",")]
        steps = args.steps or (5 if args.quick else 10)
        write_rows(gpu_rows(ids, steps))
    else:
        n = int(args.identities or 2)
        steps = args.steps or (2 if args.quick else 4)
        write_rows(cpu_rows(n, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
