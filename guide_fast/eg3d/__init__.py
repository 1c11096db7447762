"""The EG3D generator in plain PyTorch (the reference path): networks, presets; renders through guide_fast.render."""
from ..render import RenderOptions
from .generator import PRESETS, GeneratorConfig, TriPlaneGenerator, build_generator
from .networks import OSGDecoder

__all__ = ["PRESETS", "GeneratorConfig", "TriPlaneGenerator", "build_generator", "OSGDecoder", "RenderOptions"]
