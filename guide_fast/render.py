"""`render_triplanes`: the tri-plane volume renderer with a choice of backend.

"reference" is the plain-PyTorch oracle (guide_fast.eg3d.renderer); "triton" is the fused
kernel (guide_fast.kernels). Both take the same random draws, so they can be compared draw for
draw, and both are usable by any tri-plane model (not only EG3D's generator).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .eg3d.renderer import OSGDecoder, RenderOptions, render_reference
from .errors import InputError

BACKENDS = ("reference", "triton")


def make_render_draws(batch: int, rays: int, options: RenderOptions, device=None, generator=None) -> dict:
    """The uniforms the official renderer draws, in its order: stratified jitter, then importance.

    stratified [N, rays, S, 1] and importance [N*rays, S_imp], U[0, 1) (eg3d.md §4.7).
    """
    stratified = torch.rand([batch, rays, options.depth_resolution, 1], device=device, generator=generator)
    importance = torch.rand([batch * rays, options.depth_resolution_importance], device=device, generator=generator)
    return {"stratified": stratified, "importance": importance}


def check_render_draws(render_draws: Mapping, batch: int, rays: int, options: RenderOptions) -> None:
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
            got_shape = list(got.shape) if torch.is_tensor(got) else type(got).__name__
            raise InputError(f"render_draws[{key!r}] has shape {got_shape}, expected {list(shape)}")


def render_triplanes(
    planes: torch.Tensor,
    decoder: OSGDecoder,
    ray_origins: torch.Tensor,
    ray_directions: torch.Tensor,
    *,
    options,
    render_draws: Mapping | None = None,
    backend: str = "triton",
    generator: torch.Generator | None = None,
    validate: bool = True,
):
    """Render tri-planes along rays with EG3D's importance renderer (eg3d.md §4).

    planes [N, 3, C, H, W] (fp32 or bf16); decoder an OSGDecoder (C -> hidden -> 1 + F);
    ray_origins / ray_directions [N, R, 3]; options a RenderOptions or a rendering_kwargs dict.
    Returns (features [N, R, F] after 2x-1, depth [N, R, 1], weight_sum [N, R, 1]).
    """
    opts = RenderOptions.from_kwargs(options)
    if backend not in BACKENDS:
        raise InputError(f"unknown renderer backend {backend!r}; expected one of {BACKENDS}")
    if validate:
        if not torch.is_tensor(planes) or planes.ndim != 5 or planes.shape[1] != 3:
            got = list(planes.shape) if torch.is_tensor(planes) else type(planes).__name__
            raise InputError(f"planes must have shape [N, 3, C, H, W], got {got}")
        n = planes.shape[0]
        for name, t in (("ray_origins", ray_origins), ("ray_directions", ray_directions)):
            if not torch.is_tensor(t) or t.ndim != 3 or t.shape[0] != n or t.shape[2] != 3:
                got = list(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise InputError(f"{name} must have shape [N={n}, R, 3], got {got}")
        if ray_origins.shape != ray_directions.shape:
            raise InputError("ray_origins and ray_directions must have the same shape")
        if planes.shape[2] != decoder.net[0].in_features:
            raise InputError(
                f"planes have {planes.shape[2]} channels but the decoder expects {decoder.net[0].in_features}"
            )
    n, rays = ray_origins.shape[0], ray_origins.shape[1]
    if render_draws is None:
        render_draws = make_render_draws(n, rays, opts, ray_origins.device, generator)
    elif validate:
        check_render_draws(render_draws, n, rays, opts)
    strat, imp = render_draws["stratified"], render_draws["importance"]
    if backend == "reference":
        return render_reference(planes, decoder, ray_origins, ray_directions, opts, strat, imp)
    from .kernels import fused_render  # imported lazily: Triton is optional for the reference path

    w0, b0, w1, b1 = decoder.effective_params()
    return fused_render(planes, w0, b0, w1, b1, ray_origins, ray_directions, strat, imp, opts)
