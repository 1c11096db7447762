"""`guide-fast export-identity` and `guide-fast weights`."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import GuideFastError

# ONNX Runtime must reproduce the torch embeddings (issue 4: cosine >= 0.99999).
MIN_COSINE = 0.99999


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "export-identity",
        help="export a face-recognition backbone (IR-SE50 / IR-101) to ONNX (and a TensorRT engine)",
        description="Load model_ir_se50.pth or CurricularFace_Backbone.pth, export it to ONNX with a dynamic "
        "batch (input 'images' [N,3,112,112] in [-1,1], output 'embeddings' [N,512] unit vectors), check "
        f"that onnxruntime reproduces the torch embeddings (cosine >= {MIN_COSINE}) at batch 1 and 7, "
        "and optionally build an fp16 TensorRT engine. Files are written atomically.",
    )
    p.add_argument("--weights", required=True, help="official weight file (model_ir_se50.pth or CurricularFace_Backbone.pth)")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--tensorrt", default=None, metavar="PLAN", help="also build a TensorRT fp16 engine and write it here")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch of the TensorRT engine (default 64)")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (default 17): 9-20 with the legacy/auto exporter, 18-23 with dynamo (the "
                        "range of the installed torch.onnx is checked before the export)")
    p.add_argument("--exporter", choices=("auto", "legacy", "dynamo"), default="auto",
                   help="torch.onnx exporter (default: legacy where available, else dynamo)")
    p.set_defaults(func=_export_identity)

    w = subparsers.add_parser(
        "weights",
        help="report which external weight files are present and valid in a folder",
        description="For every weight file guide-fast can use (EG3D, IR-SE50, IR-101, VGG16, LPIPS heads, FID "
        "Inception, GOAE, ...), report found / valid / invalid / missing and where it comes from. Exit code 0, "
        "or 1 when a file is present but invalid (missing files are not an error: most are optional).",
    )
    w.add_argument("--dir", required=True, help="folder holding the weight files")
    w.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON to this file")
    w.add_argument("--no-fallbacks", action="store_true",
                   help="look only in --dir (not in the lpips package or the torch hub cache)")
    w.set_defaults(func=_weights)


# Opsets torch.onnx can write, when torch.onnx._constants does not say (torch 2.x values).
LEGACY_OPSETS = (9, 20)   # TorchScript exporter: ONNX_BASE_OPSET .. ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
DYNAMO_OPSETS = (18, 23)  # torch.export-based exporter: its minimum 18 .. ONNX_MAX_OPSET


def opset_range(exporter: str) -> tuple[int, int]:
    """(lowest, highest) opset the chosen exporter of the installed torch writes."""
    legacy, dynamo = LEGACY_OPSETS, DYNAMO_OPSETS
    try:
        from torch.onnx import _constants as c

        legacy = (c.ONNX_BASE_OPSET, getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", c.ONNX_MAX_OPSET))
        dynamo = (max(18, c.ONNX_BASE_OPSET), c.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        pass
    return dynamo if exporter == "dynamo" else legacy


def check_opset(opset: int, exporter: str) -> None:
    from ..errors import InputError

    lo, hi = opset_range(exporter)
    if not lo <= opset <= hi:
        raise InputError(f"--opset {opset} is out of range: the {exporter} exporter of this torch writes opsets "
                         f"{lo} to {hi}" + (" (with --exporter dynamo: {} to {})".format(*opset_range("dynamo"))
                                            if exporter != "dynamo" else ""))


def _export_identity(args) -> int:
    from ..identity.backbones import DESCRIPTIONS, load_backbone
    from ..identity.onnx_export import compare_with_torch, export_onnx
    from ..io import atomic_path, check_output_path

    if args.max_batch < 1:
        raise GuideFastError(f"--max-batch must be >= 1, got {args.max_batch}")
    check_opset(args.opset, args.exporter)
    check_output_path(args.onnx, "file", "--onnx", suffixes=[".onnx"])
    if Path(args.onnx).resolve() == Path(args.weights).resolve():
        from ..errors import InputError

        raise InputError(f"--onnx {args.onnx} is the --weights file itself; the export would replace the weights "
                         "it reads: give the ONNX model its own name")
    if args.tensorrt:
        from ..errors import InputError

        check_output_path(args.tensorrt, "file", "--tensorrt")
        if Path(args.tensorrt).resolve() == Path(args.onnx).resolve():
            raise InputError(f"--tensorrt {args.tensorrt} is the same file as --onnx; give the engine its own name "
                             "(e.g. ir101.plan)")
    if args.tensorrt:
        from ..identity.tensorrt_backend import require_tensorrt

        require_tensorrt()  # fail before the (slow) export, naming what is missing
    backbone = load_backbone(args.weights, device="cpu")
    print(f"loaded {DESCRIPTIONS[backbone.kind]} from {args.weights}")
    out = Path(args.onnx)
    with atomic_path(out, suffix=".onnx") as tmp:
        export_onnx(backbone, tmp, opset=args.opset, exporter=args.exporter)
        report = compare_with_torch(backbone, tmp, batch_sizes=(1, 7))
        per = ", ".join(f"batch {b}: {c:.7f}" for b, c in report["per_batch"].items())
        if not report["min_cosine"] >= MIN_COSINE:
            raise GuideFastError(f"the ONNX model does not reproduce the torch embeddings (min cosine {per}; "
                                 f"need >= {MIN_COSINE}); nothing was written")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); onnxruntime vs torch min cosine: {per}")
    if args.tensorrt:
        from ..identity.tensorrt_backend import build_engine

        plan = build_engine(out, max_batch=args.max_batch, plan_path=args.tensorrt)
        print(f"wrote {args.tensorrt} (TensorRT fp16, max batch {args.max_batch}; cached as {plan})")
    return 0


def _weights(args) -> int:
    from ..io import check_output_path, write_json
    from ..weights import check_dir, format_report

    if args.json:
        check_output_path(args.json, "file", "--json")

    statuses = check_dir(args.dir, use_fallbacks=not args.no_fallbacks)
    if args.json:  # the report must not replace one of the weight files it describes
        from pathlib import Path

        from ..errors import InputError

        target = Path(args.json).resolve()
        for s in statuses:
            if s.path is not None and Path(s.path).resolve() == target:
                raise InputError(f"--json {args.json} is the {s.name} weight file this check found; "
                                 "write the report elsewhere")
    print(format_report(statuses))
    counts = {}
    for s in statuses:
        counts[s.status] = counts.get(s.status, 0) + 1
    print("summary: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if args.json:
        write_json(args.json, {"dir": str(args.dir), "files": [s.as_dict() for s in statuses]})
    invalid = [s.name for s in statuses if s.status == "invalid"]
    if invalid:
        # a readiness check (a service's start-up script) must be able to tell without parsing
        print(f"guide-fast weights: {len(invalid)} invalid file{'s' if len(invalid) > 1 else ''}: "
              f"{', '.join(invalid)} (see above)", file=sys.stderr)
        return 1
    return 0
