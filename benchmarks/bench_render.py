"""Fused Triton tri-plane renderer vs the PyTorch reference, at FFHQ settings (issue 3).

Settings (docs/eg3d.md §4.9): planes [B, 3, 32, 256, 256], 128x128 rays, 48 + 48 samples, the FFHQ
decoder (32 -> 64 -> 33), one frontal camera per image. For fp32 and bf16 planes, batch 1
and 5, each path is timed forward (no grad) and forward + backward (planes gradient, the
decoder frozen as in GUIDE) with CUDA events: median, p20, p80 ms and peak allocated MB.
Fused rows carry the speed-up over the reference of the same row kind in `extra`, and the
forward rows the ratio to the analytic floor of 0.2-0.5 ms per image (docs/performance.md §3).

Every run also writes the bytes saved for backward per 128x128 image (reference vs fused),
counted with torch.autograd.graph.saved_tensors_hooks. Without a GPU that is all it does:
the fused count then skips the (interpreted) kernel launch, since the saved set is the
launcher's buffers whatever their values, and the row says so.

    python -m benchmarks.bench_render [--quick] [--out DIR_OR_CSV] [--sweep]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

from . import common

BENCH = "render"
RES = 128
PLANE_RES = 256
FLOOR_MS = (0.2, 0.5)  # analytic floor of the fused forward per image (docs/performance.md §3)


def _inputs(batch, dtype, device, seed=0):
    from guide_fast import cameras
    from guide_fast.eg3d.networks import OSGDecoder
    from guide_fast.render import RenderOptions, make_render_draws, sample_rays

    g = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    decoder = OSGDecoder(32, 64, 32).to(device).requires_grad_(False)  # frozen, as in GUIDE
    planes = torch.randn(batch, 3, 32, PLANE_RES, PLANE_RES, generator=g).to(device=device, dtype=dtype)
    c = cameras.frontal_label(batch).to(device)
    origins, dirs = sample_rays(c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3), RES)
    opts = RenderOptions(depth_resolution=48, depth_resolution_importance=48)
    draws = {k: v.to(device) for k, v in make_render_draws(batch, RES * RES, opts, generator=g).items()}
    return planes, decoder, origins.contiguous(), dirs.contiguous(), opts, draws


def _render(backend, planes, decoder, origins, dirs, opts, draws, block_rays=None):
    from guide_fast.render import render_triplanes

    if block_rays is None:
        return render_triplanes(planes, decoder, origins, dirs, options=opts, render_draws=draws, backend=backend,
                                validate=False)
    from guide_fast.kernels import fused_render

    return fused_render(planes, decoder.effective_params(), origins, dirs, draws["stratified"], draws["importance"],
                        opts, block_rays=block_rays)


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves while fn() runs."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(st.data_ptr(), str(t.device))] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def saved_rows(device) -> list[dict]:
    """Saved-for-backward bytes per 128x128 image, fp32 planes, reference and fused."""
    rows = []
    planes, decoder, origins, dirs, opts, draws = _inputs(1, torch.float32, device)
    planes.requires_grad_(True)
    shape = f"1x3x32x{PLANE_RES}x{PLANE_RES} planes, {RES}x{RES} rays, 48+48"
    for path in ("reference", "fused"):
        extra = ""
        restore = None
        if path == "fused" and device.type != "cuda":
            from guide_fast.kernels import triplane_render as tr

            restore = tr.render_forward

            def fake(planes_cl, w0, b0, w1, b1, ro, rd, strat, imp, o, block_rays=None):
                n, r = ro.shape[:2]
                z = lambda *s: torch.zeros(s, device=ro.device)  # noqa: E731
                return (z(n, r, w1.shape[0] - 1), z(n, r, 1), z(n, r, 1), z(n, r),
                        z(n, r, o.depth_resolution_importance), z(2))

            tr.render_forward = fake
            extra = "kernel launch skipped (no GPU): the saved set is the launcher's buffers; "
        try:
            backend = "triton" if path == "fused" else "reference"
            nbytes = saved_bytes(lambda: _render(backend, planes, decoder, origins, dirs, opts, draws))
        except Exception as e:  # noqa: BLE001 - a row records the failure instead of aborting
            rows.append(common.make_row(BENCH, "saved_for_backward", path=path, shape=shape, dtype="fp32",
                                        extra=f"error: {type(e).__name__}: {e}", device=device))
            continue
        finally:
            if restore is not None:
                tr.render_forward = restore
        rows.append(common.make_row(
            BENCH, "saved_for_backward", path=path, shape=shape, dtype="fp32",
            extra=f"{extra}saved_mb={nbytes / 2**20:.1f}; target <= 64 MB/image", device=device))
        gc.collect()
    return rows


def _timed_row(what, path, batch, dtype_name, fn, device, repeats, extra=""):
    shape = f"B={batch} 3x32x{PLANE_RES}^2 planes, {RES}x{RES} rays, 48+48"
    try:
        common.reset_peak(device)
        timing = common.time_fn(fn, warmup=2, repeats=repeats, device=device)
        peak = common.peak_memory_mb(device)
        return common.make_row(BENCH, what, path=path, shape=shape, dtype=dtype_name, timing=timing, peak_mb=peak,
                               extra=extra, device=device), timing["median_ms"]
    except torch.cuda.OutOfMemoryError as e:
        msg = f"OOM: {str(e).splitlines()[0][:120]}"
    except Exception as e:  # noqa: BLE001 - record and go on with the other rows
        msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    gc.collect()
    torch.cuda.empty_cache()
    return common.make_row(BENCH, what, path=path, shape=shape, dtype=dtype_name, extra=msg, device=device), None


def _chosen_configs() -> str:
    """The autotuner's latest choices (kernels/triplane_render.py TUNING_LOG), briefly."""
    from guide_fast.kernels import triplane_render as k

    if not k.autotune_enabled():
        return "default (autotune off)"
    return ", ".join(f"{key[0]}:{v['chosen'][0]}x{v['chosen'][1]}" if v["chosen"] else f"{key[0]}:default"
                     for key, v in list(k.TUNING_LOG.items())[-2:]) or "default"


def timing_rows(device, quick: bool, sweep: bool) -> list[dict]:
    rows = []
    repeats = 5 if quick else 15
    dtypes = [(torch.float32, "fp32"), (torch.bfloat16, "bf16")] + ([] if quick else [(torch.float16, "fp16")])
    for dtype, dtype_name in dtypes:
        for batch in (1, 5):
            planes, decoder, origins, dirs, opts, draws = _inputs(batch, dtype, device, seed=batch)
            g = torch.Generator(device="cpu").manual_seed(7)
            grads = [torch.randn(s, generator=g).to(device) for s in
                     ((batch, RES * RES, 32), (batch, RES * RES, 1), (batch, RES * RES, 1))]
            leaf = planes.detach().clone().requires_grad_(True)
            ref_ms = {}
            for path, backend in (("reference", "reference"), ("fused", "triton")):
                def fwd():
                    with torch.no_grad():
                        return _render(backend, planes, decoder, origins, dirs, opts, draws)

                def fwd_bwd():
                    leaf.grad = None
                    outs = _render(backend, leaf, decoder, origins, dirs, opts, draws)
                    loss = sum((o * go).sum() for o, go in zip(outs, grads))
                    loss.backward()

                for what, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
                    extra = []
                    row, ms = _timed_row(what, path, batch, dtype_name, fn, device, repeats)
                    if path == "reference" and ms is not None:
                        ref_ms[what] = ms
                    if path == "fused" and ms is not None:
                        if ref_ms.get(what):
                            extra.append(f"speedup_vs_reference={ref_ms[what] / ms:.1f}x")
                        if what == "forward":
                            per_image = ms / batch
                            extra.append(f"ms_per_image={per_image:.3f}; floor_ratio={per_image / FLOOR_MS[1]:.1f}-"
                                         f"{per_image / FLOOR_MS[0]:.1f}x (analytic floor 0.2-0.5 ms/image)")
                        else:
                            extra.append("planes grad only (decoder frozen)")
                        extra.append(f"launch={_chosen_configs()}")
                    if extra:
                        row["extra"] = "; ".join(filter(None, [row["extra"]] + extra))
                    rows.append(row)
            del planes, leaf, draws
            gc.collect()
            torch.cuda.empty_cache()
    # the autotuned fused rows above against the default launch config (GUIDE_FAST_RENDER_AUTOTUNE=0)
    planes, decoder, origins, dirs, opts, draws = _inputs(5, torch.bfloat16, device, seed=5)
    leaf = planes.detach().clone().requires_grad_(True)
    os.environ["GUIDE_FAST_RENDER_AUTOTUNE"] = "0"
    try:
        def fwd_bwd_default():
            leaf.grad = None
            outs = _render("triton", leaf, decoder, origins, dirs, opts, draws)
            sum(o.sum() for o in outs).backward()

        row, _ = _timed_row("forward+backward", "fused (default launch config, no autotune)", 5, "bf16",
                            fwd_bwd_default, device, repeats)
        rows.append(row)
    finally:
        os.environ.pop("GUIDE_FAST_RENDER_AUTOTUNE", None)
    if sweep:
        # block rays x warps x pipeline stages, through the launcher's environment overrides
        planes, decoder, origins, dirs, opts, draws = _inputs(1, torch.float32, device, seed=3)
        leaf = planes.detach().clone().requires_grad_(True)
        configs = [(16, 4, 1, ""), (16, 4, 1, "128"), (16, 2, 1, ""), (32, 4, 1, ""), (32, 8, 1, ""),
                   (16, 4, 3, "")]
        for block, warps, stages, maxnreg in configs:
            os.environ.update(GUIDE_FAST_RENDER_BLOCK=str(block), GUIDE_FAST_RENDER_WARPS=str(warps),
                              GUIDE_FAST_RENDER_STAGES=str(stages), GUIDE_FAST_RENDER_MAXNREG=maxnreg)
            label = f"fused block={block} warps={warps} stages={stages}" + (f" maxnreg={maxnreg}" if maxnreg else "")

            def fwd():
                with torch.no_grad():
                    return _render("triton", planes, decoder, origins, dirs, opts, draws)

            def fwd_bwd():
                leaf.grad = None
                outs = _render("triton", leaf, decoder, origins, dirs, opts, draws)
                sum(o.sum() for o in outs).backward()

            for what, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
                row, _ = _timed_row(what, label, 1, "fp32", fn, device, repeats)
                rows.append(row)
        for key in ("GUIDE_FAST_RENDER_BLOCK", "GUIDE_FAST_RENDER_WARPS", "GUIDE_FAST_RENDER_STAGES",
                    "GUIDE_FAST_RENDER_MAXNREG"):
            os.environ.pop(key, None)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (5 instead of 15)")
    ap.add_argument("--out", default=None,
                    help="results CSV file, or a directory for results.csv (default: GUIDE_FAST_RESULTS_DIR "
                         "or benchmarks/results)")
    ap.add_argument("--sweep", action="store_true", help="also time the fused path at block_rays 16/32/64")
    args = common.parse_args(ap, argv)

    filename = "results.csv"  # the file benchmarks/run.py collects
    if args.out:
        out = Path(args.out)
        if out.suffix == ".csv":
            common.RESULTS_DIR, filename = out.parent, out.name
        else:
            common.RESULTS_DIR = out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        # The fused path is counted with its launch skipped; importing the kernels needs no GPU
        # in interpreter mode, which must be chosen before they are defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = saved_rows(device)
    if device.type == "cuda":
        rows += timing_rows(device, args.quick, args.sweep)
    else:
        print("no GPU: reporting the saved-for-backward bytes only; GPU timings not measured", file=sys.stderr)
        rows.append(common.make_row(BENCH, "forward, forward+backward (B=1, 5; fp32, bf16)", path="reference, fused",
                                    shape=f"3x32x{PLANE_RES}^2 planes, {RES}x{RES} rays, 48+48",
                                    extra="not measured: no GPU on this machine", device=device))
    path = common.write_rows(rows, filename)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
