"""The EG3D generator in plain PyTorch (the reference path): networks, renderer, presets."""
from .generator import PRESETS, GeneratorConfig, TriPlaneGenerator, build_generator
from .renderer import OSGDecoder, RenderOptions

__all__ = ["PRESETS", "GeneratorConfig", "TriPlaneGenerator", "build_generator", "OSGDecoder", "RenderOptions"]
