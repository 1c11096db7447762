"""`render_triplanes`: check the inputs once, then run the chosen backend.

"reference" is the plain-PyTorch oracle (render/reference.py); "triton" the fused kernel
(guide_fast.kernels, imported on first use: Triton is optional for the reference path). Both
take the same arguments (planes, DecoderWeights, rays, draws, RenderOptions), return the same
RenderOutput and trust their inputs; this module is where they are checked.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import GuideFastError, InputError
from ..plan import RENDERERS, Renderer, triton_usable
from .reference import render_reference
from .types import DecoderWeights, RenderOptions, RenderOutput

PLANE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WEIGHT_DTYPES = PLANE_DTYPES + (torch.float64,)


def make_render_draws(batch: int, rays: int, options: RenderOptions | Mapping,
                      device: torch.device | str | None = None, generator: torch.Generator | None = None
                      ) -> dict[str, torch.Tensor]:
    """The uniforms the official renderer draws, in its order: stratified jitter, then importance.

    {"stratified": [N, rays, S, 1], "importance": [N*rays, S_imp]}, U[0, 1) (docs/eg3d.md §4.7).
    """
    options = RenderOptions.from_kwargs(options)
    stratified = torch.rand([batch, rays, options.depth_resolution, 1], device=device, generator=generator)
    importance = torch.rand([batch * rays, options.depth_resolution_importance], device=device, generator=generator)
    return {"stratified": stratified, "importance": importance}


def _shape(t) -> str:
    return str(list(t.shape)) if torch.is_tensor(t) else type(t).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple) -> None:
    if t.dtype not in allowed:
        raise InputError(f"{name}: expected dtype {', '.join(_dtype_name(d) for d in allowed)}, "
                         f"found {_dtype_name(t.dtype)}")


def check_render_draws(render_draws: Mapping, batch: int, rays: int, options: RenderOptions) -> None:
    """InputError unless render_draws is {"stratified": [N, R, S, 1], "importance": [N*R, S_imp]}."""
    if not isinstance(render_draws, Mapping) or set(render_draws) != {"stratified", "importance"}:
        keys = sorted(render_draws) if isinstance(render_draws, Mapping) else type(render_draws).__name__
        raise InputError(f"render_draws must be a dict with keys 'stratified' and 'importance', got {keys}")
    want = {
        "stratified": (batch, rays, options.depth_resolution, 1),
        "importance": (batch * rays, options.depth_resolution_importance),
    }
    for key, shape in want.items():
        got = render_draws[key]
        if not torch.is_tensor(got) or tuple(got.shape) != shape:
            raise InputError(f"render_draws[{key!r}] has shape {_shape(got)}, expected {list(shape)}")
        _check_dtype(f"render_draws[{key!r}]", got, _WEIGHT_DTYPES)


def decoder_weights(decoder: "DecoderWeights | torch.nn.Module") -> DecoderWeights:
    """DecoderWeights as given, or a decoder module's `effective_params()` (e.g. an OSGDecoder)."""
    if isinstance(decoder, DecoderWeights):
        return decoder
    if hasattr(decoder, "effective_params"):
        return DecoderWeights(*decoder.effective_params())
    raise InputError(f"decoder must be DecoderWeights or a module with effective_params() (an OSGDecoder), "
                     f"got {type(decoder).__name__}")


def check_render_inputs(planes: torch.Tensor, decoder: DecoderWeights, ray_origins: torch.Tensor,
                        ray_directions: torch.Tensor) -> None:
    """Shapes, dtypes and devices of what both backends take (one message per problem)."""
    if not torch.is_tensor(planes) or planes.ndim != 5 or planes.shape[1] != 3:
        raise InputError(f"planes must have shape [N, 3, C, H, W], got {_shape(planes)}")
    _check_dtype("planes", planes, PLANE_DTYPES)
    n, _, c = planes.shape[:3]
    w0, b0, w1, b1 = decoder
    for name, t in zip(DecoderWeights._fields, decoder):
        if not torch.is_tensor(t):
            raise InputError(f"decoder {name}: expected a torch.Tensor, found {type(t).__name__}")
        _check_dtype(f"decoder {name}", t, _WEIGHT_DTYPES)
    if w0.ndim != 2 or w0.shape[1] != c:
        raise InputError(f"planes have {c} channels but the decoder's w0 has shape {_shape(w0)} "
                         f"(expected [HID, C={c}])")
    hid = w0.shape[0]
    if tuple(b0.shape) != (hid,):
        raise InputError(f"decoder b0: expected shape [HID={hid}], found {_shape(b0)}")
    if w1.ndim != 2 or w1.shape[1] != hid or w1.shape[0] < 2:
        raise InputError(f"decoder w1: expected shape [1+F, HID={hid}] with F >= 1, found {_shape(w1)}")
    if tuple(b1.shape) != (w1.shape[0],):
        raise InputError(f"decoder b1: expected shape [1+F={w1.shape[0]}], found {_shape(b1)}")
    for name, t in (("ray_origins", ray_origins), ("ray_directions", ray_directions)):
        if not torch.is_tensor(t) or t.ndim != 3 or t.shape[0] != n or t.shape[2] != 3:
            raise InputError(f"{name} must have shape [N={n}, R, 3], got {_shape(t)}")
        _check_dtype(name, t, _WEIGHT_DTYPES)
    if ray_origins.shape != ray_directions.shape:
        raise InputError(f"ray_origins {_shape(ray_origins)} and ray_directions {_shape(ray_directions)} "
                         f"must have the same shape")
    if n == 0 or ray_origins.shape[1] == 0:
        raise InputError(f"nothing to render: N={n}, R={ray_origins.shape[1]}")


def _check_devices(tensors: dict) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise InputError(f"all render inputs must be on one device, found "
                         f"{', '.join(f'{k}: {v}' for k, v in devices.items())}")
    return next(iter(devices.values()))


def _fused_backend(device: torch.device):
    if not triton_usable(device):
        raise InputError(f"renderer 'triton' needs a CUDA device (the inputs are on {device}); use backend "
                         f"'reference', or set TRITON_INTERPRET=1 (testing only)")
    try:
        from ..kernels import triplane_render
    except ImportError as exc:
        raise GuideFastError(f"the fused renderer needs Triton ({exc}); pip install triton, or use backend "
                             f"'reference'") from None
    if device.type != "cuda" and not triplane_render.INTERPRETED:
        # @triton.jit picks interpreter or compiler once, when the kernels are defined
        raise GuideFastError("the Triton kernels were compiled for CUDA when guide_fast.kernels was first "
                             "imported; to run them on the CPU set TRITON_INTERPRET=1 before that import")
    return triplane_render.fused_render


def render_triplanes(
    planes: torch.Tensor,
    decoder: "DecoderWeights | torch.nn.Module",
    ray_origins: torch.Tensor,
    ray_directions: torch.Tensor,
    *,
    options: RenderOptions | Mapping,
    render_draws: Mapping | None = None,
    backend: Renderer = "triton",
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> RenderOutput:
    """Render tri-planes along rays with EG3D's importance renderer (docs/eg3d.md §4).

    planes [N, 3, C, H, W] (fp32, bf16 or fp16); decoder an OSGDecoder or its DecoderWeights
    (C -> hidden -> 1 + F); ray_origins / ray_directions [N, R, 3]; options a RenderOptions or
    a rendering_kwargs dict; render_draws the uniforms of `make_render_draws` (drawn from
    `generator` when None). backend: "reference" (plain PyTorch, differentiable everywhere) or
    "triton" (fused; differentiable with respect to planes and decoder only). Returns a
    RenderOutput (features [N, R, F] after 2x - 1, depth [N, R, 1], weight_sum [N, R, 1]).
    validate=False skips the host-side checks (callers that have checked once, e.g. a step
    inside a CUDA graph).
    """
    opts = RenderOptions.from_kwargs(options)
    if backend not in RENDERERS:
        raise InputError(f"unknown renderer backend {backend!r}; expected one of {RENDERERS}")
    weights = decoder_weights(decoder)
    if validate:
        check_render_inputs(planes, weights, ray_origins, ray_directions)
    n, rays = ray_origins.shape[0], ray_origins.shape[1]
    if render_draws is None:
        render_draws = make_render_draws(n, rays, opts, ray_origins.device, generator)
    elif validate:
        check_render_draws(render_draws, n, rays, opts)
    strat, imp = render_draws["stratified"], render_draws["importance"]
    if backend == "reference":
        if validate:
            _check_devices({"planes": planes, "ray_origins": ray_origins, "ray_directions": ray_directions,
                            "stratified": strat, "importance": imp, **dict(zip(DecoderWeights._fields, weights))})
        return render_reference(planes, weights, ray_origins, ray_directions, strat, imp, opts)
    device = planes.device
    if validate:
        device = _check_devices({"planes": planes, "ray_origins": ray_origins, "ray_directions": ray_directions,
                                 "stratified": strat, "importance": imp,
                                 **dict(zip(DecoderWeights._fields, weights))})
    return _fused_backend(device)(planes, weights, ray_origins, ray_directions, strat, imp, opts)
