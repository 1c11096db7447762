"""Triton kernels of guide-fast, installed as `guide_fast.kernels`.

`fused_render`: EG3D's tri-plane importance renderer (sampling, decoder, volume rendering)
fused into Triton kernels, forward and backward (triplane_render.py).
"""
from .triplane_render import FusedTriplaneRender, fused_render

__all__ = ["FusedTriplaneRender", "fused_render"]
