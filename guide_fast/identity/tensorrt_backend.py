"""TensorRT backend: an fp16 engine built from the exported ONNX file, cached on disk.

TensorRT is optional (it cannot be installed on the project's CPU machines, docs/environment.md §4):
everything here imports `tensorrt` lazily and `require_tensorrt()` names what is missing.
The engine cache key is (sha256 of the ONNX file, TensorRT version, GPU name, max batch): an
engine is only valid for the TensorRT build and GPU model that produced it, and its
optimisation profile fixes the largest batch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..checkpoints import sha256_file
from ..errors import CheckpointError, GuideFastError
from ..io import atomic_path
from .backbones import EMBEDDING_DIM, INPUT_SIZE
from .onnx_export import INPUT_NAME, OUTPUT_NAME


class BackendUnavailableError(GuideFastError):
    """A requested backend cannot run here; the message names the missing pieces."""


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason). Never raises."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the bindings fail with ImportError or OSError (libnvinfer)
        missing.append(f"the `tensorrt` Python module ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if missing:
        return False, "TensorRT backend unavailable: missing " + " and ".join(missing)
    return True, ""


def require_tensorrt():
    ok, reason = tensorrt_status()
    if not ok:
        raise BackendUnavailableError(
            reason + ". Install NVIDIA TensorRT (pip install tensorrt, from NVIDIA's index) on a machine with "
            "a CUDA GPU, or use backend='onnxruntime' / 'torch'."
        )
    import tensorrt as trt

    return trt


def default_cache_dir() -> Path:
    root = os.environ.get("GUIDE_FAST_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "guide-fast")
    return Path(root) / "tensorrt"


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, max_batch: int) -> str:
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return f"identity-{onnx_sha256[:16]}-trt{trt_version}-{gpu}-b{int(max_batch)}-fp16"


def build_engine(onnx_path, *, max_batch: int = 64, opt_batch: int | None = None, plan_path=None,
                 cache_dir=None, workspace_gb: float = 4.0) -> Path:
    """Build (or reuse from the cache) an fp16 engine for `onnx_path`; returns the cached .plan.
    With plan_path, the engine is also written there (atomically)."""
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CheckpointError(f"ONNX model {onnx_path}: no such file")
    key = engine_cache_key(sha256_file(onnx_path), trt.__version__, torch.cuda.get_device_name(), max_batch)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / f"{key}.plan"
    if not cached.is_file():
        data = _build_serialized(trt, onnx_path, max_batch, opt_batch or max_batch, workspace_gb)
        with atomic_path(cached) as tmp:
            tmp.write_bytes(data)
    if plan_path is not None:
        with atomic_path(plan_path) as tmp:
            tmp.write_bytes(cached.read_bytes())
    return cached


def _build_serialized(trt, onnx_path: Path, max_batch: int, opt_batch: int, workspace_gb: float) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    major = int(trt.__version__.split(".")[0])
    if major < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CheckpointError(f"TensorRT cannot parse {onnx_path}: " + "; ".join(errs[:5]))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    shape = (3, INPUT_SIZE, INPUT_SIZE)
    profile.set_shape(INPUT_NAME, (1, *shape), (max(1, min(opt_batch, max_batch)), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise GuideFastError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    return bytes(serialized)


class TensorRTRunner:
    """Runs [n, 3, 112, 112] float32 batches (n <= max_batch) through a cached fp16 engine."""

    def __init__(self, onnx_path, *, max_batch: int = 64, cache_dir=None, device=None):
        trt = require_tensorrt()
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"the TensorRT backend runs on a CUDA device, got {self.device}")
        self.max_batch = int(max_batch)
        self.plan_path = build_engine(onnx_path, max_batch=self.max_batch, cache_dir=cache_dir)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise CheckpointError(f"TensorRT cannot deserialise the cached engine {self.plan_path}; delete it to rebuild")
        self.context = self.engine.create_execution_context()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n > self.max_batch:
            raise GuideFastError(f"batch {n} exceeds the engine's maximum batch {self.max_batch}")
        with torch.cuda.device(self.device):
            inp = x.to(self.device, torch.float32).contiguous()
            out = torch.empty(n, EMBEDDING_DIM, device=self.device, dtype=torch.float32)
            self.context.set_input_shape(INPUT_NAME, tuple(inp.shape))
            self.context.set_tensor_address(INPUT_NAME, inp.data_ptr())
            self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise GuideFastError("TensorRT execution failed")
            stream.synchronize()
        # fp16 engine: re-normalise in fp32 so the rows are unit vectors to fp32 precision.
        return torch.nn.functional.normalize(out.float(), dim=1).cpu()
