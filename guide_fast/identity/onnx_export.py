"""Export a face backbone to ONNX (dynamic batch) and check it against the torch model.

The exported graph is the backbone only: input `images` [batch, 3, 112, 112] float32 in [-1, 1]
(an aligned, normalised face), output `embeddings` [batch, 512], L2-normalised. Alignment and
the ID-loss crop stay in torch / numpy, so every backend sees the same 112x112 tensors.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, GuideFastError
from ..io import atomic_path
from .backbones import INPUT_SIZE

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
DEFAULT_OPSET = 17
METADATA_KIND = "guide_fast.backbone_kind"


def export_onnx(backbone: torch.nn.Module, path, *, opset: int = DEFAULT_OPSET, exporter: str = "auto") -> Path:
    """Write `backbone` as ONNX to `path` atomically and validate it with onnx.checker.

    exporter: "legacy" (TorchScript-based; no extra dependency, one self-contained file),
    "dynamo" (torch.export-based; needs onnxscript) or "auto" (legacy where this torch still has
    it, else dynamo). Both were checked to agree with torch to ~1e-7 (docs/environment.md §4).
    """
    import onnx

    if exporter not in ("auto", "legacy", "dynamo"):
        raise GuideFastError(f"exporter must be 'auto', 'legacy' or 'dynamo', got {exporter!r}")
    path = Path(path)
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    if dtype != torch.float32:
        raise GuideFastError(f"export_onnx expects a float32 backbone, got {dtype}")
    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE, device=device)
    try:
        with atomic_path(path, suffix=".onnx") as tmp:
            order = ["legacy", "dynamo"] if exporter == "auto" else [exporter]
            errors = []
            for kind in order:
                try:
                    _export_with(kind, backbone, example, tmp, opset)
                    break
                except Exception as exc:  # noqa: BLE001 - try the other exporter, report both
                    errors.append(f"{kind}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            else:
                raise GuideFastError("ONNX export failed: " + " | ".join(errors))
            model = onnx.load(str(tmp))
            kind = getattr(backbone, "kind", None)
            if kind:
                onnx.helper.set_model_props(model, {METADATA_KIND: str(kind)})
            onnx.save(model, str(tmp))
            # Path form: also works for models above protobuf's 2 GB in-memory limit.
            onnx.checker.check_model(str(tmp), full_check=True)
            _check_signature(onnx.load(str(tmp), load_external_data=False), tmp)
    finally:
        backbone.train(was_training)
    return path


def _export_with(kind: str, backbone, example, path: Path, opset: int) -> None:
    if kind == "legacy":
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated but still shipped; we fall back to dynamo
            # when it is gone, so its deprecation notices are noise here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                backbone, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    else:
        batch = torch.export.Dim("batch", min=1, max=65536)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                backbone, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), opset_version=max(opset, 18), dynamo=True,
            )
            # One self-contained file (the weights are far below protobuf's 2 GB limit), so the
            # atomic rename covers the whole model.
            program.save(str(path), external_data=False)


def _check_signature(model, path) -> None:
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or len(model.graph.output) != 1:
        raise GuideFastError(f"{path}: unexpected ONNX signature: inputs {[i.name for i in inputs]}, "
                             f"outputs {[o.name for o in model.graph.output]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[0].dim_param or [d.dim_value for d in dims[1:]] != [3, INPUT_SIZE, INPUT_SIZE]:
        raise GuideFastError(f"{path}: input shape is not [batch, 3, {INPUT_SIZE}, {INPUT_SIZE}] with a dynamic batch")


def onnx_metadata(path) -> dict:
    import onnx

    path = Path(path)
    if path.is_dir() or not path.is_file():
        raise CheckpointError(f"ONNX model {path}: {'is a folder; expected a file' if path.is_dir() else 'no such file'}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, truncated file, ...
        text = str(exc).strip()
        raise CheckpointError(f"ONNX model {path}: not a readable ONNX file "
                              f"({type(exc).__name__}{': ' + text.splitlines()[0][:200] if text else ''})") from None
    return {p.key: p.value for p in model.metadata_props}


def ort_session(path, device=None, threads: int | None = None):
    """An onnxruntime session on `path`: the CUDA provider when it is installed and the device
    is (or defaults to) CUDA, else the CPU provider."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise GuideFastError(f"the onnxruntime backend needs the onnxruntime package ({exc})") from None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model {path}: no such file")
    available = ort.get_available_providers()
    want_cuda = device is None or torch.device(device).type == "cuda"
    providers = ["CPUExecutionProvider"]
    if want_cuda and "CUDAExecutionProvider" in available and torch.cuda.is_available():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"ONNX model {path}: onnxruntime cannot load it: {str(exc).splitlines()[0]}") from None


def compare_with_torch(backbone: torch.nn.Module, onnx_path, batch_sizes=(1, 7), seed: int = 0, session=None) -> dict:
    """Cosine similarity between torch (fp32, CPU) and onnxruntime embeddings on random
    normalised faces. Returns {"min_cosine": float, "per_batch": {batch: min cosine}}."""
    session = session or ort_session(onnx_path, device="cpu")
    gen = torch.Generator().manual_seed(int(seed))
    params = next(backbone.parameters())
    per_batch = {}
    for b in batch_sizes:
        x = torch.rand(int(b), 3, INPUT_SIZE, INPUT_SIZE, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = backbone(x.to(device=params.device, dtype=params.dtype)).float().cpu()
        out = torch.from_numpy(np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])).float()
        cos = torch.nn.functional.cosine_similarity(ref, out, dim=1)
        per_batch[int(b)] = float(cos.min())
    return {"min_cosine": min(per_batch.values()), "per_batch": per_batch}
