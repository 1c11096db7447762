"""`IdentityScorer`: batched face embeddings and pairwise identity similarity, with a choice of
backend for the network (torch, onnxruntime, tensorrt) and of preprocessing.

Preprocessing (`align`):
* "mtcnn": GUIDE's evaluation path (docs/guide.md §4.2, docs/face_models.md §2.3) with facenet-pytorch's
  MTCNN: 5 landmarks (its bundled weights; GUIDE's thresholds 0.15/0.25/0.35 and its choice of the
  most probable face), similarity warp onto the 112x112 reference points, x / 127.5 - 1.
  (`evaluate` aligns with GUIDE's own MTCNN port by default, identity/guide_mtcnn.py, and hands
  the scorer the aligned crops with align="none".)
  Float renders in [-1, 1] are first turned into uint8 as GUIDE saves its PNGs.
* "none": inputs are already aligned 112x112 faces.
* "idloss": the ID-loss crop (resize 256, crop [35:223, 32:220], pool to 112; §1.4).

Faces that are not found give NaN rows (and NaN similarities); `embed_detailed` returns the
mask and the count, and `on_missing="raise"` raises `NoFaceError` listing the images instead.
Embeddings come back as float32 CPU tensors, whatever the backend.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from ..errors import InputError
from .align import GUIDE_THRESHOLDS, DEFAULT_MAX_DETECT_SIDE, MIN_FACE_SIZE, NoFaceError, align_faces
from .backbones import EMBEDDING_DIM, INPUT_SIZE, load_backbone
from .preprocess import idloss_crop, normalize_uint8, renders_to_uint8, to_rgb_uint8

if TYPE_CHECKING:
    from collections.abc import Sequence

    import PIL.Image

    #: Images the scorer takes: a [N, 3, H, W] / [3, H, W] tensor in [-1, 1], an HxWx3 / NxHxWx3
    #: uint8 array, or a list of such images or PIL images.
    Images = Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray, PIL.Image.Image]]]

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ALIGN_MODES = ("mtcnn", "none", "idloss")
_ALIGN_ALIASES = {"crop": "idloss", "id_loss": "idloss", "aligned": "none"}


@dataclasses.dataclass
class EmbedResult:
    """embeddings [N, 512] float32 (NaN rows where no face was found); found [N] bool;
    faces: the AlignedFace of each image (align="mtcnn"; None where none was found)."""

    embeddings: torch.Tensor
    found: torch.Tensor
    faces: list | None = None

    @property
    def num_missing(self) -> int:
        return int((~self.found).sum())

    @property
    def missing(self) -> list:
        return [int(i) for i in torch.nonzero(~self.found).flatten()]


@contextlib.contextmanager
def _strict_fp32(enabled: bool):
    """precision="fp32" means fp32 on a GPU too: TF32 convolutions / matmuls (PyTorch's cuDNN
    default) are switched off for the call and restored afterwards."""
    if not enabled:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _TorchRunner:
    """Eager fp32; on CUDA by default bf16 weights/activations with one CUDA graph captured per
    input shape (the embedding is normalised in fp32)."""

    def __init__(self, backbone: torch.nn.Module, device: torch.device, precision: str, cuda_graph: bool | None):
        if precision == "auto" or cuda_graph is None:
            # the fast path's "auto", decided in one place: bf16 and graph capture on CUDA
            from ..plan import ExecutionPlan

            auto = ExecutionPlan.resolve(device)
            precision = auto.precision if precision == "auto" else precision
            cuda_graph = auto.cuda_graph if cuda_graph is None else cuda_graph
        if precision not in ("fp32", "bf16"):
            raise InputError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.device = device
        self.use_graph = bool(cuda_graph)
        if self.use_graph and device.type != "cuda":
            raise InputError("cuda_graph=True needs a CUDA device")
        param = next(backbone.parameters())
        model = backbone
        if param.device != device or param.dtype != self.dtype:
            model = copy.deepcopy(backbone).to(device=device, dtype=self.dtype)
        model.eval().requires_grad_(False)
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._graphs: dict = {}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.features(x) if hasattr(self.model, "features") else self.model(x)
        f = feats.float()
        return f / torch.norm(f, 2, 1, True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)
        with torch.no_grad(), _strict_fp32(self.precision == "fp32" and self.device.type == "cuda"):
            out = self._replay(x) if self.use_graph else self._forward(x)
        return out.float().cpu()

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = torch.empty_like(x).copy_(x)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up off the capture: cuDNN picks its kernels here
                for _ in range(2):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


class _OnnxRuntimeRunner:
    def __init__(self, onnx_path, device):
        from ..errors import CheckpointError
        from .onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session

        self.path = onnx_path
        self.session = ort_session(onnx_path, device=device)
        self.providers = self.session.get_providers()
        # an .onnx from elsewhere must be an identity network's: one input `images` [batch, 3, 112,
        # 112] and an output `embeddings` [batch, 512] (what export_onnx writes), or it is refused here
        ins, outs = self.session.get_inputs(), {o.name: o for o in self.session.get_outputs()}
        shape = list(ins[0].shape) if len(ins) == 1 else []
        out_shape = list(outs[OUTPUT_NAME].shape) if OUTPUT_NAME in outs else []
        if (len(ins) != 1 or ins[0].name != INPUT_NAME or len(shape) != 4 or shape[1:] != [3, INPUT_SIZE, INPUT_SIZE]
                or len(out_shape) != 2 or out_shape[1] != EMBEDDING_DIM):
            raise CheckpointError(
                f"ONNX model {onnx_path}: not an identity network: inputs "
                f"{[(i.name, list(i.shape)) for i in ins]}, outputs {[(o.name, list(o.shape)) for o in outs.values()]}; "
                f"expected {INPUT_NAME!r} [batch, 3, {INPUT_SIZE}, {INPUT_SIZE}] -> {OUTPUT_NAME!r} "
                f"[batch, {EMBEDDING_DIM}] (guide-fast export-identity writes these)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .onnx_export import INPUT_NAME, OUTPUT_NAME

        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(np.asarray(out)).float()


class IdentityScorer:
    """Face embeddings and identity similarity.

    backbone_or_path: an IR backbone module, the path of an official weight file
    (model_ir_se50.pth / CurricularFace_Backbone.pth), or an exported .onnx file (onnxruntime /
    tensorrt backends only).
    backend: "torch" | "onnxruntime" | "tensorrt". device: where the network runs (default CUDA
    when available for torch / tensorrt; onnxruntime uses its CUDA provider when installed).
    batch_size: images per network call (also the TensorRT engine's largest batch).
    align: default preprocessing of embed / similarity ("mtcnn", "none", "idloss").
    precision / cuda_graph: torch backend only ("auto" = fp32 on CPU, bf16 + CUDA graph on GPU).
    onnx_path: where to export the ONNX model (default: a temporary file; an existing .onnx
    given as backbone_or_path is used as is). cache_dir: TensorRT engine cache.
    detect_thresholds / select / max_detect_side: MTCNN settings of align="mtcnn".
    """

    def __init__(self, backbone_or_path: "torch.nn.Module | str | Path", backend: str = "torch",
                 device: "torch.device | str | None" = None, batch_size: int = 64, *,
                 align: str = "mtcnn", precision: str = "auto", cuda_graph: bool | None = None,
                 onnx_path: "str | Path | None" = None, cache_dir: "str | Path | None" = None,
                 detect_thresholds: "tuple[float, float, float]" = GUIDE_THRESHOLDS, select: str = "probability",
                 max_detect_side: int = DEFAULT_MAX_DETECT_SIDE, min_face_size: int = MIN_FACE_SIZE):
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.batch_size = int(batch_size)
        self.align = self._check_align(align)
        self.detect_thresholds = tuple(float(t) for t in detect_thresholds)
        if select not in ("largest", "probability"):
            raise InputError(f"select must be 'largest' or 'probability', got {select!r}")
        self.select = select
        self.max_detect_side = int(max_detect_side)
        self.min_face_size = int(min_face_size)
        self._tmpdir = None
        if backend == "tensorrt":
            from .tensorrt_backend import require_tensorrt

            require_tensorrt()  # before any (slow) export: name what is missing at once

        requested_device = device
        if device is None:
            device = "cuda" if (torch.cuda.is_available() and backend in ("torch", "tensorrt")) else "cpu"
        self.device = torch.device(device)

        backbone, onnx_file = None, None
        if isinstance(backbone_or_path, torch.nn.Module):
            backbone = backbone_or_path
        elif isinstance(backbone_or_path, (str, Path)):
            p = Path(backbone_or_path)
            if p.suffix.lower() == ".onnx":
                if backend == "torch":
                    raise InputError(f"{p}: an ONNX file needs backend='onnxruntime' or 'tensorrt'")
                onnx_file = p
            else:
                backbone = load_backbone(p)
        else:
            raise InputError(
                f"backbone_or_path must be an nn.Module or a path, got {type(backbone_or_path).__name__}"
            )
        self.kind = getattr(backbone, "kind", None)

        if backend == "torch":
            self._runner = _TorchRunner(backbone, self.device, precision, cuda_graph)
            self.precision = self._runner.precision
            return
        self.precision = "fp16" if backend == "tensorrt" else "fp32"  # what the network computes in
        if onnx_file is None:
            onnx_file = self._export(backbone, onnx_path)
        else:
            from .onnx_export import METADATA_KIND, onnx_metadata

            self.kind = onnx_metadata(onnx_file).get(METADATA_KIND)
        self.onnx_path = onnx_file
        if backend == "onnxruntime":
            # device None: onnxruntime's CUDA provider when it is installed, else its CPU provider
            self._runner = _OnnxRuntimeRunner(onnx_file, requested_device)
        else:
            from .tensorrt_backend import TensorRTRunner

            self._runner = TensorRTRunner(onnx_file, max_batch=self.batch_size, cache_dir=cache_dir, device=self.device)

    def _export(self, backbone, onnx_path) -> Path:
        from .onnx_export import export_onnx

        if onnx_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="guide-fast-onnx-")
            onnx_path = Path(self._tmpdir.name) / f"{self.kind or 'backbone'}.onnx"
        cpu_fp32 = backbone
        p = next(backbone.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32:
            cpu_fp32 = copy.deepcopy(backbone).to("cpu", torch.float32)
        return export_onnx(cpu_fp32, onnx_path)

    @staticmethod
    def _check_align(align) -> str:
        if align is True:
            return "none"
        a = _ALIGN_ALIASES.get(align, align)
        if a not in ALIGN_MODES:
            raise InputError(f"align must be one of {list(ALIGN_MODES)}, got {align!r}")
        return a

    # -- public API ----------------------------------------------------------------------------

    def embed(self, images: "Images", align: str | None = None, *, aligned: bool | str | None = None,
              on_missing: str = "nan") -> torch.Tensor:
        """[N, 512] float32 unit vectors (CPU); NaN rows where no face was found (align="mtcnn").

        images: a float tensor [N,3,H,W] / [3,H,W] in [-1, 1], a uint8 array HxWx3 / NxHxWx3, a
        PIL image, or a list of these. `aligned` is an alias of `align` (True = "none",
        False = "mtcnn"). on_missing="raise" raises NoFaceError instead of returning NaN rows.
        """
        return self.embed_detailed(images, align, aligned=aligned, on_missing=on_missing).embeddings

    def embed_detailed(self, images: "Images", align: str | None = None, *, aligned: bool | str | None = None,
                       on_missing: str = "nan") -> EmbedResult:
        mode = self._resolve_mode(align, aligned)
        if on_missing not in ("nan", "raise"):
            raise InputError(f"on_missing must be 'nan' or 'raise', got {on_missing!r}")
        faces = None
        if mode == "mtcnn":
            batch, found, faces = self._prepare_mtcnn(images)
            if on_missing == "raise" and not bool(found.all()):
                missing = [int(i) for i in torch.nonzero(~found).flatten()]
                raise NoFaceError(f"no face found in {len(missing)} of {len(found)} image(s): indices {missing[:20]}"
                                  + (" ..." if len(missing) > 20 else ""), missing)
        elif mode == "none":
            batch = self._prepare_aligned(images)
            found = torch.ones(batch.shape[0], dtype=torch.bool)
        else:
            batch = self._prepare_idloss(images)
            found = torch.ones(batch.shape[0], dtype=torch.bool)
        out = torch.full((found.shape[0], EMBEDDING_DIM), float("nan"), dtype=torch.float32)
        if batch.shape[0]:
            vecs = torch.cat([self._runner(batch[i:i + self.batch_size]) for i in range(0, batch.shape[0], self.batch_size)])
            if tuple(vecs.shape) != (batch.shape[0], EMBEDDING_DIM) or not bool(torch.isfinite(vecs).all()):
                # finite images in, so the network itself is broken (its weights, or an .onnx from elsewhere):
                # NaN rows would otherwise read as "no face found" and every similarity as null
                from ..errors import GuideFastError

                raise GuideFastError(f"the identity network ({self.backend}) returned "
                                     f"{list(vecs.shape)} embeddings with non-finite values or the wrong shape "
                                     f"for {batch.shape[0]} finite images (expected [{batch.shape[0]}, {EMBEDDING_DIM}])")
            out[found] = vecs
        return EmbedResult(embeddings=out, found=found, faces=faces)

    def similarity(self, a: "Images", b: "Images", align: str | None = None, *, aligned: bool | str | None = None,
                   on_missing: str = "nan") -> torch.Tensor:
        """Cosine similarity of paired images: [N] float32 (NaN where a face is missing).
        One side may hold a single image, compared with every image of the other."""
        ea = self.embed(a, align, aligned=aligned, on_missing=on_missing)
        eb = self.embed(b, align, aligned=aligned, on_missing=on_missing)
        if ea.shape[0] != eb.shape[0] and 1 not in (ea.shape[0], eb.shape[0]):
            raise InputError(f"similarity: {ea.shape[0]} and {eb.shape[0]} images cannot be paired")
        return (ea * eb).sum(dim=1)

    # -- preprocessing -------------------------------------------------------------------------

    def _resolve_mode(self, align, aligned) -> str:
        if align is not None and aligned is not None:
            raise InputError("pass align= or aligned=, not both")
        if aligned is not None:
            if aligned is True:
                return "none"
            if aligned is False:
                return "mtcnn"
            return self._check_align(aligned)
        return self._check_align(align) if align is not None else self.align

    @staticmethod
    def _as_list(images) -> list:
        """Split any accepted input into a list of single images."""
        if torch.is_tensor(images):
            if images.dim() == 4:
                return list(images)
            if images.dim() == 3:
                return [images]
            raise InputError(f"images tensor has shape {list(images.shape)}, expected [N, 3, H, W] or [3, H, W]")
        if isinstance(images, np.ndarray):
            if images.ndim == 4:
                return list(images)
            if images.ndim in (2, 3):
                return [images]
            raise InputError(f"images array has shape {list(images.shape)}, expected HxWx3 or NxHxWx3")
        if isinstance(images, (list, tuple)):
            if not images:
                raise InputError("images is an empty list")
            return list(images)
        return [images]  # a PIL image, checked by to_rgb_uint8

    def _prepare_mtcnn(self, images):
        if torch.is_tensor(images) and images.dim() == 4 and images.is_floating_point():
            arrays = list(renders_to_uint8(images))  # one conversion for the whole batch
        else:
            arrays = self._as_list(images)
        mt_device = self.device if self.device.type == "cuda" else "cpu"
        aligned = align_faces(arrays, select=self.select, thresholds=self.detect_thresholds,
                              min_face_size=self.min_face_size, max_side=self.max_detect_side, device=mt_device)
        found = torch.tensor([a is not None for a in aligned], dtype=torch.bool)
        crops = [a.image for a in aligned if a is not None]
        batch = normalize_uint8(np.stack(crops)) if crops else torch.zeros(0, 3, INPUT_SIZE, INPUT_SIZE)
        return batch, found, aligned

    def _prepare_aligned(self, images) -> torch.Tensor:
        if torch.is_tensor(images) and images.is_floating_point():
            x = images[None] if images.dim() == 3 else images
        else:
            x = normalize_uint8(np.stack([to_rgb_uint8(im, f"image {i}") for i, im in enumerate(self._as_list(images))]))
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise InputError(f"align='none' expects aligned {INPUT_SIZE}x{INPUT_SIZE} faces [N, 3, 112, 112], "
                             f"got {list(x.shape)}")
        return x.detach().float().cpu()

    def _prepare_idloss(self, images) -> torch.Tensor:
        if torch.is_tensor(images) and images.is_floating_point():
            x = images[None] if images.dim() == 3 else images
            with torch.no_grad():
                return idloss_crop(x.detach().float()).cpu()
        crops = []
        for i, im in enumerate(self._as_list(images)):
            t = normalize_uint8(to_rgb_uint8(im, f"image {i}"))
            with torch.no_grad():
                crops.append(idloss_crop(t))
        return torch.cat(crops)

    @property
    def description(self) -> str:
        """One line for reports: network, backend and its settings, default alignment."""
        runner = self._runner
        if isinstance(runner, _TorchRunner):
            how = f"torch {runner.precision}{' + CUDA graph' if runner.use_graph else ' eager'} on {self.device}"
        elif isinstance(runner, _OnnxRuntimeRunner):
            how = f"onnxruntime ({', '.join(runner.providers)})"
        else:
            how = f"tensorrt fp16 on {self.device}"
        return f"{self.kind or 'face backbone'}, {how}, align={self.align}"

    def __repr__(self) -> str:
        return (f"IdentityScorer(kind={self.kind!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"batch_size={self.batch_size}, align={self.align!r})")


def available_backends() -> list:
    """Backends that can run here (torch always; onnxruntime when installed; tensorrt with CUDA)."""
    out = ["torch"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        out.append("onnxruntime")
    except ImportError:
        pass
    from .tensorrt_backend import tensorrt_status

    if tensorrt_status()[0]:
        out.append("tensorrt")
    return out


__all__ = ["IdentityScorer", "EmbedResult", "available_backends", "BACKENDS", "ALIGN_MODES"]
