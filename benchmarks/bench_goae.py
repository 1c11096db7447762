"""GOAE encoder speed: milliseconds per image for one forward pass (the whole inversion of a photo
when GUIDE's encoder is used instead of 300 optimisation steps).

Rows: the fp32 eager encoder in eval mode (the reference: what `load_encoder` returns) at batch 1
and a larger batch; on CUDA also the encoder under the execution plan's fast-path autocast
(bf16), with its largest W+ difference from fp32 in `extra`. The official configuration (Swin-V2
256², embed 128, depths [2, 2, 18, 2], 111M parameters) is timed on CUDA; on a CPU the default is
the tiny configuration (embed 32, depths [2, 2, 2, 2]), `--config official` to time the real one.
Random weights: speed does not depend on their values. `median_ms` is per call; `extra` gives
ms per image.

    python -m benchmarks.bench_goae [--quick] [--config tiny|official] [--batch-sizes 1,8]
                                   [--weights encoder_FFHQ.pt] [--budget-s S]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import make_row, parse_args, peak_memory_mb, reset_peak, time_fn, write_rows  # noqa: E402
from guide_fast.inversion.goae import OFFICIAL, GOAEConfig, GOAEncoder, load_encoder  # noqa: E402
from guide_fast.plan import ExecutionPlan  # noqa: E402


def _encoder(config: GOAEConfig, device: torch.device, weights: str | None) -> GOAEncoder:
    if weights:
        return load_encoder(weights, device=device, config=config)
    torch.manual_seed(0)
    return GOAEncoder(config).to(device).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--config", choices=("tiny", "official"), default=None,
                    help="encoder size (default: official on CUDA, tiny on a CPU)")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8 on CUDA, 1,2 on a CPU)")
    ap.add_argument("--weights", default=None, help="time the real encoder_FFHQ.pt instead of random weights")
    ap.add_argument("--budget-s", type=float, default=None, help="stop adding rows after about this many seconds")
    args = parse_args(ap, argv)

    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.config or ("official" if device.type == "cuda" else "tiny")
    config = OFFICIAL if name == "official" else GOAEConfig.tiny()
    batch_sizes = ([int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
                   else [1, 8] if device.type == "cuda" else [1, 2])
    repeats = (5 if args.quick else 20) if device.type == "cuda" else (3 if args.quick else 8)
    enc = _encoder(config, device, args.weights)
    n_params = sum(p.numel() for p in enc.parameters())
    fast = ExecutionPlan.resolve(device, path="fast")
    variants = [("reference", "fp32", None)]
    if fast.autocast_dtype is not None:
        variants.append(("fast", str(fast.autocast_dtype).replace("torch.", ""), fast))

    rows = []
    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        x = (torch.rand(b, 3, config.img_size, config.img_size, generator=gen) * 2 - 1).to(device)
        with torch.inference_mode():
            w_ref = enc(x)
        for path, dtype, plan in variants:
            if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                print(f"budget of {args.budget_s} s spent; stopping", file=sys.stderr)
                break

            def call(plan=plan):
                with torch.inference_mode():
                    if plan is None:
                        return enc(x)
                    with plan.autocast():
                        return enc(x)

            reset_peak(device)
            timing = time_fn(call, warmup=2, repeats=repeats, device=device)
            extra = f"{timing['median_ms'] / b:.2f} ms/image; config {name} ({n_params / 1e6:.1f}M params); eval mode"
            if plan is not None:
                extra += f"; max |w - w_fp32| = {float((call().float() - w_ref).abs().max()):.3g}"
            rows.append(make_row("goae", "encode", path=path, shape=f"{b}x3x{config.img_size}x{config.img_size}",
                                 dtype=dtype, timing=timing, peak_mb=peak_memory_mb(device), extra=extra,
                                 device=device))
            write_rows(rows[-1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
