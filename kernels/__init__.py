"""Triton kernels of guide-fast, installed as `guide_fast.kernels`.

`fused_render`: EG3D's tri-plane importance renderer (sampling, decoder, volume rendering)
fused into Triton kernels, forward and backward (triplane_render.py).
`skip_rgb`: a synthesis block's skip path (ToRGB bias and clamp, 2x FIR upsampling of the image,
their sum) in one pass, forward and backward (skip_path.py; docs/performance.md §7).
"""
from .skip_path import skip_rgb
from .triplane_render import FusedTriplaneRender, fused_render

__all__ = ["FusedTriplaneRender", "fused_render", "skip_rgb"]
