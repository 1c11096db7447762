"""The execution plan: every "how does this run" choice, resolved once from "auto".

One model, two paths (ARCHITECTURE.md): the reference path is the plain-PyTorch oracle
(fp32, the reference renderer, the official operators, eager); the fast path swaps in the fused
Triton renderer, bf16 autocast, the folded 2x up-convolutions, optional channels_last, CUDA-graph
capture and, optionally, the skip-path kernel and torch.compile. Which of those a run uses is
decided here and nowhere else: the engine, inversion, evaluation, the CLI and the tests all take
an `ExecutionPlan`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal, get_args

import torch

from .errors import InputError

if TYPE_CHECKING:
    from .eg3d.generator import TriPlaneGenerator

Path = Literal["fast", "reference"]
Renderer = Literal["reference", "triton"]
Precision = Literal["fp32", "bf16"]
MemoryFormat = Literal["contiguous", "channels_last"]
UpsampleConv = Literal["reference", "folded"]
SkipPath = Literal["reference", "triton"]
Auto = Literal["auto"]

PATHS: tuple[str, ...] = get_args(Path)
RENDERERS: tuple[str, ...] = get_args(Renderer)
PRECISIONS: tuple[str, ...] = get_args(Precision)
MEMORY_FORMATS: tuple[str, ...] = get_args(MemoryFormat)
UPSAMPLE_CONVS: tuple[str, ...] = get_args(UpsampleConv)
SKIP_PATHS: tuple[str, ...] = get_args(SkipPath)


def triton_usable(device: torch.device) -> bool:
    """The fused renderer runs on CUDA, or anywhere under the Triton interpreter (testing).

    Read at call time, not import time, so a test can switch TRITON_INTERPRET on and off."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def bf16_usable(device: torch.device) -> bool:
    """bf16 autocast is a fast-path choice on CUDA only (the CPU's bf16 kernels are neither fast nor tested)."""
    return device.type == "cuda"


def _device(device: "torch.device | str | int") -> torch.device:
    """torch.device(device), its RuntimeError/TypeError for a name like "bogus" as an InputError.
    A CUDA device is not refused here when CUDA is absent: plans are resolved for inspection
    (and tests) on any machine; the device is checked where tensors are put on it."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None


def _choice(name: str, value: str, allowed: tuple[str, ...], auto_ok: bool = True) -> str:
    options = allowed + (("auto",) if auto_ok else ())
    if value not in options:
        raise InputError(f"unknown {name} {value!r}; expected one of {', '.join(repr(o) for o in options)}")
    return value


def _switch(name: str, value) -> bool | None:
    """"auto" -> None (decide below); True/False/"on"/"off" -> bool."""
    if value == "auto" or value is None:
        return None
    if isinstance(value, bool):
        return value
    if value in ("on", "off"):
        return value == "on"
    raise InputError(f"{name} must be 'auto', 'on', 'off', True or False, got {value!r}")


@dataclass(frozen=True)
class ExecutionPlan:
    """A resolved plan: no field is "auto". Build it with `ExecutionPlan.resolve(...)`."""

    device: torch.device
    path: Path = "reference"
    renderer: Renderer = "reference"
    precision: Precision = "fp32"
    memory_format: MemoryFormat = "contiguous"
    upsample_conv: UpsampleConv = "reference"
    skip_path: SkipPath = "reference"
    cuda_graph: bool = False
    compile: bool = False

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        _choice("path", self.path, PATHS, auto_ok=False)
        _choice("renderer", self.renderer, RENDERERS, auto_ok=False)
        _choice("precision", self.precision, PRECISIONS, auto_ok=False)
        _choice("memory_format", self.memory_format, MEMORY_FORMATS, auto_ok=False)
        _choice("upsample_conv", self.upsample_conv, UPSAMPLE_CONVS, auto_ok=False)
        _choice("skip_path", self.skip_path, SKIP_PATHS, auto_ok=False)
        on_cuda = self.device.type == "cuda"
        if self.precision == "bf16" and not bf16_usable(self.device):
            raise InputError(f"precision 'bf16' needs a CUDA device (the device is {self.device}); use 'fp32' or 'auto'")
        if self.renderer == "triton" and not triton_usable(self.device):
            raise InputError(f"renderer 'triton' needs a CUDA device (the device is {self.device}); "
                             f"use 'reference' or 'auto'")
        if self.skip_path == "triton" and not triton_usable(self.device):
            raise InputError(f"skip_path 'triton' needs a CUDA device (the device is {self.device}); "
                             f"use 'reference' or 'auto'")
        if self.cuda_graph and not on_cuda:
            raise InputError(f"CUDA-graph capture needs a CUDA device (the device is {self.device})")
        if self.path == "reference":
            # the oracle runs the official operators, eager, in fp32 (docs/guide.md §7)
            fast_only = [name for name, bad in (
                ("precision='bf16'", self.precision != "fp32"),
                ("upsample_conv='folded'", self.upsample_conv != "reference"),
                ("skip_path='triton'", self.skip_path != "reference"),
                ("memory_format='channels_last'", self.memory_format != "contiguous"),
                ("cuda_graph", self.cuda_graph),
                ("compile", self.compile),
            ) if bad]
            if fast_only:
                raise InputError(f"the reference path is eager fp32 with the official operators; "
                                 f"{', '.join(fast_only)} belong to the fast path")

    # ------------------------------------------------------------------ building
    @classmethod
    def resolve(
        cls,
        device: torch.device | str | None = None,
        *,
        path: Path = "fast",
        renderer: Renderer | Auto = "auto",
        precision: Precision | Auto = "auto",
        memory_format: MemoryFormat = "contiguous",
        upsample_conv: UpsampleConv | Auto = "auto",
        skip_path: SkipPath | Auto = "auto",
        cuda_graph: bool | Literal["auto", "on", "off"] = "auto",
        compile: bool | Literal["auto", "on", "off"] = "auto",
        differentiable_rays: bool = False,
    ) -> "ExecutionPlan":
        """Resolve every "auto" for `device` (default: CUDA if visible, else the CPU).

        "auto" on the fast path: the Triton renderer and bf16 on CUDA, the reference renderer
        and fp32 elsewhere; folded up-convolutions; graph capture on CUDA; compile off until
        it is measured faster (docs/performance.md), and the skip-path kernel likewise (written
        and tested on the interpreter, not yet timed on a GPU: "auto" is "reference" until
        then). On the reference path every "auto" is the oracle's choice.
        `differentiable_rays=True` (a learnt camera) forces the reference renderer: the fused
        kernel differentiates planes and decoder only.
        """
        dev = _device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _choice("path", path, PATHS, auto_ok=False)
        _choice("renderer", renderer, RENDERERS)
        _choice("precision", precision, PRECISIONS)
        _choice("memory_format", memory_format, MEMORY_FORMATS, auto_ok=False)
        _choice("upsample_conv", upsample_conv, UPSAMPLE_CONVS)
        _choice("skip_path", skip_path, SKIP_PATHS)
        graph, comp = _switch("cuda_graph", cuda_graph), _switch("compile", compile)
        fast, on_cuda = path == "fast", dev.type == "cuda"
        if differentiable_rays and renderer == "triton":
            raise InputError("gradients with respect to the camera need renderer 'reference': the Triton "
                             "renderer differentiates the planes and the decoder only")
        if renderer == "auto":
            renderer = "triton" if (fast and on_cuda and not differentiable_rays) else "reference"
        if precision == "auto":
            precision = "bf16" if (fast and on_cuda) else "fp32"
        if upsample_conv == "auto":
            upsample_conv = "folded" if fast else "reference"
        if skip_path == "auto":
            skip_path = "reference"
        if graph is None:
            graph = fast and on_cuda
        elif graph and not on_cuda:
            graph = False  # asked for, but there is nothing to capture on the CPU: eager, as documented
        if comp is None:
            comp = False
        return cls(device=dev, path=path, renderer=renderer, precision=precision, memory_format=memory_format,
                   upsample_conv=upsample_conv, skip_path=skip_path, cuda_graph=graph, compile=comp)

    @classmethod
    def reference(cls, device: torch.device | str | None = None) -> "ExecutionPlan":
        """The oracle: eager fp32, the reference renderer, the official operators."""
        return cls.resolve(device, path="reference")

    def with_(self, **changes) -> "ExecutionPlan":
        """A copy with some fields changed (checked again)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ using
    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        """The autocast context of this plan (a no-op context in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache_enabled)

    @property
    def uses_kernels(self) -> bool:
        """Whether this plan runs any hand-written Triton kernel (guide_fast.kernels)."""
        return self.renderer == "triton" or self.skip_path == "triton"

    def without_kernels(self) -> "ExecutionPlan":
        """This plan with the reference renderer and skip path in place of the Triton kernels."""
        return self.with_(renderer="reference", skip_path="reference")

    @contextlib.contextmanager
    def backend_flags(self) -> Iterator[None]:
        """The library settings the fast path runs under on CUDA: cuDNN's benchmark mode, which
        times each new convolution shape once and keeps the fastest algorithm (a run's shapes never
        change, so its first steps or batches pay for that once; a captured step keeps the
        choices). The caller's setting is restored on exit: a service's own flags stay its own.
        Elsewhere a no-op (the reference path keeps whatever the caller set)."""
        if self.path != "fast" or self.device.type != "cuda":
            yield
            return
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = saved

    def apply(self, generator: "TriPlaneGenerator") -> "TriPlaneGenerator":
        """Set the generator's operator switches to this plan (renderer, up-convs, skip path, memory format)."""
        generator.set_operators(self.renderer, self.upsample_conv, self.skip_path)
        if self.memory_format == "channels_last":
            # 4-D conv weights in NHWC strides make cuDNN keep activations NHWC end to end
            # instead of transposing around every convolution (docs/performance.md).
            generator.to(memory_format=torch.channels_last)
        return generator

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = str(self.device)
        return d

    def describe(self) -> str:
        extras = [x for x, on in (("cuda-graph", self.cuda_graph), ("compile", self.compile)) if on]
        return (f"{self.path} path on {self.device}: renderer {self.renderer}, {self.precision}, "
                f"{self.memory_format}, up-conv {self.upsample_conv}, skip path {self.skip_path}"
                + (f", {' + '.join(extras)}" if extras else ""))
