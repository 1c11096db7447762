"""Identity scoring throughput: images per second for each available backend at batch 1 and 64.

The network input is a batch of aligned 112x112 faces (align="none"), so the rows time the
backbone call end to end as `IdentityScorer.embed` makes it (host -> device copy, network, result
back on the CPU), with wall-clock timing since every call is synchronous. The torch fp32 eager
row is the reference: every other row records its speed-up over it and the smallest cosine
between its embeddings and the reference ones. With facenet-pytorch installed, one more row
times MTCNN detection + alignment of 512x512 images.

    python benchmarks/bench_identity.py [--quick] [--kind ir101|ir_se50] [--weights FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import make_row, parse_args, peak_memory_mb, reset_peak, time_fn, write_rows  # noqa: E402
from guide_fast.identity import IdentityScorer, available_backends, build_backbone, load_backbone  # noqa: E402


def _configs(device: torch.device, backends: list) -> list:
    """(label, backend, device, kwargs) in the order they are run; the first is the reference."""
    out = [("torch-fp32-eager", "torch", device, {"precision": "fp32", "cuda_graph": False})]
    if device.type == "cuda":
        out.append(("torch-bf16-cudagraph", "torch", device, {"precision": "bf16", "cuda_graph": True}))
    if "onnxruntime" in backends:
        out.append(("onnxruntime", "onnxruntime", None, {}))
    if "tensorrt" in backends and device.type == "cuda":
        out.append(("tensorrt-fp16", "tensorrt", device, {}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repeats; CPU backends use batch 1 and 8")
    ap.add_argument("--kind", choices=("ir101", "ir_se50"), default="ir101",
                    help="network (random weights unless --weights); default ir101, the evaluation network")
    ap.add_argument("--weights", default=None, help="an official weight file instead of random weights")
    ap.add_argument("--backends", default=None, help="comma-separated subset of torch,onnxruntime,tensorrt")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,64)")
    ap.add_argument("--no-align", action="store_true", help="skip the MTCNN alignment row")
    args = parse_args(ap, argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.weights:
        backbone = load_backbone(args.weights)
        kind = backbone.kind
    else:
        backbone = build_backbone(args.kind, seed=0)
        kind = args.kind
    backends = available_backends()
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        backends = [b for b in backends if b in wanted]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [1, 64]
    cpu_batch_sizes = [1, 8] if args.quick and not args.batch_sizes else batch_sizes

    rows = []
    reference = {}  # batch -> (median_ms, embeddings)
    tmp = tempfile.TemporaryDirectory(prefix="bench-identity-")
    onnx_path = Path(tmp.name) / f"{kind}.onnx"
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.rand(b, 3, 112, 112, generator=gen) * 2 - 1 for b in sorted(set(batch_sizes) | set(cpu_batch_sizes))}

    for label, backend, dev, kwargs in _configs(device, backends):
        try:
            scorer = IdentityScorer(backbone, backend=backend, device=dev, batch_size=max(batch_sizes + cpu_batch_sizes),
                                    onnx_path=onnx_path if backend != "torch" else None, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one unavailable backend must not stop the others
            print(f"skipping {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        runs_on_gpu = (backend in ("torch", "tensorrt") and device.type == "cuda") or (
            backend == "onnxruntime" and "CUDAExecutionProvider" in getattr(scorer._runner, "providers", []))
        sizes = batch_sizes if runs_on_gpu else cpu_batch_sizes
        run_device = device if runs_on_gpu else torch.device("cpu")
        provider = ",".join(getattr(scorer._runner, "providers", [])) or str(run_device)
        for b in sizes:
            x = inputs[b]
            if runs_on_gpu:
                warmup, repeats = (3, 10) if args.quick else (5, 50)
            else:
                warmup, repeats = (1, 3) if args.quick else (1, 5)
            reset_peak(device)
            # embed() returns CPU tensors, so each call is synchronous: wall-clock time is exact.
            timing = time_fn(lambda: scorer.embed(x, align="none"), warmup=warmup, repeats=repeats, device="cpu")
            emb = scorer.embed(x, align="none")
            ips = b / (timing["median_ms"] / 1e3)
            extra = [f"images_per_s={ips:.1f}", f"provider={provider}", f"n={timing['n']}"]
            if label == "torch-fp32-eager":
                reference[b] = (timing["median_ms"], emb)
            elif b in reference:
                ref_ms, ref_emb = reference[b]
                cos = torch.nn.functional.cosine_similarity(emb, ref_emb, dim=1).min()
                extra += [f"speedup_vs_torch_fp32={ref_ms / timing['median_ms']:.2f}", f"min_cos_vs_fp32={float(cos):.6f}"]
            dtype = {"torch-bf16-cudagraph": "bf16", "tensorrt-fp16": "fp16"}.get(label, "fp32")
            rows.append(make_row("identity", f"embed {kind}", path=label, shape=f"{b}x3x112x112", dtype=dtype,
                                 timing=timing, peak_mb=peak_memory_mb(device) if runs_on_gpu else None,
                                 extra="; ".join(extra), device=run_device))
        del scorer

    if not args.no_align:
        rows += _align_rows(device, args.quick)
    write_rows(rows)
    tmp.cleanup()
    return 0


def _align_rows(device: torch.device, quick: bool) -> list:
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        print("skipping the MTCNN row: facenet-pytorch is not installed", file=sys.stderr)
        return []
    import numpy as np

    from guide_fast.identity import GUIDE_THRESHOLDS, align_faces

    try:
        from skimage.data import astronaut

        image = astronaut()
    except ImportError:
        image = np.random.default_rng(0).integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
    rows = []
    for b in (1, 8):
        batch = [image] * b
        mt_device = device if device.type == "cuda" else "cpu"
        timing = time_fn(lambda: align_faces(batch, thresholds=GUIDE_THRESHOLDS, select="probability", device=mt_device),
                         warmup=1, repeats=3 if quick else 10, device="cpu")
        ips = b / (timing["median_ms"] / 1e3)
        rows.append(make_row("identity", "mtcnn detect+align 512x512", path=f"facenet-mtcnn-{torch.device(mt_device).type}",
                             shape=f"{b}x512x512x3", dtype="uint8", timing=timing,
                             extra=f"images_per_s={ips:.1f}", device=mt_device))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
