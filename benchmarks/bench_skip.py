"""The fused skip-path kernel (kernels/skip_path.py) vs the official operators, at FFHQ sizes.

The skip path of a synthesis block is upsample2d(img) + clamp(torgb_conv(x) + b) (docs/eg3d.md
§3.1-3.2). Both paths get the same ToRGB output `raw` and image; the ToRGB convolution itself is
not timed (it is the same cuDNN call either way). Cases, batch 5 (one identity's trainable
renders):
  * backbone b256: img [5, 96, 128, 128] fp32, raw [5, 96, 256, 256] bf16 (the step's autocast);
  * backbone b128: img [5, 96, 64, 64],    raw [5, 96, 128, 128] bf16;
  * super-resolution block1: img [5, 3, 256, 256], raw [5, 3, 512, 512] fp16, clamp 256.
The reference runs under the same bf16 autocast as the fast step (its depthwise FIR convolution
is then a bf16 convolution, as in the step). Each path is timed forward (no grad) and
forward + backward (gradients of img, raw and the bias) with CUDA events; fused rows carry the
speed-up over the reference row of the same kind and the output's bytes per millisecond.
On a CPU there is nothing to time (the kernel runs only in the Triton interpreter there): the
script writes one row saying so.

    python -m benchmarks.bench_skip [--quick]
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from . import common

BENCH = "skip_rgb"
CASES = (
    # name, channels, output resolution, raw dtype, clamp
    ("backbone b256", 96, 256, torch.bfloat16, None),
    ("backbone b128", 96, 128, torch.bfloat16, None),
    ("superres block1", 3, 512, torch.float16, 256.0),
)
BATCH = 5


def _inputs(channels: int, res: int, dtype: torch.dtype, device, seed: int = 0):
    from guide_fast.eg3d import ops

    g = torch.Generator(device="cpu").manual_seed(seed)
    img = torch.randn(BATCH, channels, res // 2, res // 2, generator=g).to(device)
    raw = (torch.randn(BATCH, channels, res, res, generator=g) * 2).to(device=device, dtype=dtype)
    bias = torch.randn(channels, generator=g).to(device)
    return img, raw, bias, ops.setup_filter().to(device)


def _runner(fused: bool, backward: bool, img, raw, bias, f, clamp, device):
    from guide_fast.eg3d import ops

    img = img.clone().requires_grad_(backward)
    raw = raw.clone().requires_grad_(backward)
    bias = bias.clone().requires_grad_(backward)
    grad = torch.randn(raw.shape, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def run():
        with autocast, torch.set_grad_enabled(backward):
            out = ops.skip_rgb(img, raw, bias, f, clamp=clamp, fused=fused)
        if backward:
            torch.autograd.backward(out, grad)
            img.grad = raw.grad = bias.grad = None
        return out

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = common.parse_args(ap, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        common.write_rows([common.make_row(BENCH, "forward, forward+backward", path="reference, fused",
                                           extra="not measured: no GPU on this machine (the kernel runs only in the "
                                                 "Triton interpreter here; tests/test_kernel_skip.py checks its parity)",
                                           device=device)])
        return 0
    repeats = 10 if args.quick else 30
    rows = []
    for name, channels, res, dtype, clamp in CASES:
        img, raw, bias, f = _inputs(channels, res, dtype, device)
        shape = f"{name}: img {list(img.shape)} fp32, raw {list(raw.shape)}"
        for backward in (False, True):
            what = "forward+backward" if backward else "forward"
            ms = {}
            for fused in (False, True):
                common.reset_peak(device)
                timing = common.time_fn(_runner(fused, backward, img, raw, bias, f, clamp, device),
                                        warmup=3, repeats=repeats, device=device)
                ms[fused] = timing["median_ms"]
                extra = f"clamp={clamp}"
                if fused:
                    out_bytes = raw.numel() * 4
                    extra += (f"; speedup_vs_reference={ms[False] / ms[True]:.1f}x; "
                              f"output_GB_per_s={out_bytes / (ms[True] * 1e-3) / 1e9:.0f}")
                rows.append(common.make_row(BENCH, what, path="fused" if fused else "reference", shape=shape,
                                            dtype=str(dtype).replace("torch.", ""), timing=timing,
                                            peak_mb=common.peak_memory_mb(device), extra=extra, device=device))
        del img, raw, bias
        torch.cuda.empty_cache()
    common.write_rows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
