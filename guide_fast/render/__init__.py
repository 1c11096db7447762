"""The tri-plane volume renderer: one interface, two backends (docs/eg3d.md §4).

    out = render_triplanes(planes, decoder, ray_origins, ray_directions, options=opts,
                           render_draws=make_render_draws(n, rays, opts), backend="reference")
    out.features, out.depth, out.weight_sum

types.py: RenderOptions, DecoderWeights, RenderOutput (shared with the fused kernel);
reference.py: the plain-PyTorch oracle; rays.py: camera -> rays; dispatch.py: the checks and
the backend switch. The fused backend is guide_fast.kernels.fused_render. Usable by any
tri-plane model, not only EG3D's generator (this package imports nothing from guide_fast.eg3d).
"""
from .dispatch import check_render_draws, make_render_draws, render_triplanes
from .rays import sample_rays
from .reference import render_reference
from .types import DecoderWeights, RenderOptions, RenderOutput

__all__ = ["DecoderWeights", "RenderOptions", "RenderOutput", "check_render_draws", "make_render_draws",
           "render_reference", "render_triplanes", "sample_rays"]
