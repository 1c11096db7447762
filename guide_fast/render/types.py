"""The small types both render backends share: options, decoder weights, outputs.

Kept apart from the backends so that the fused kernel (guide_fast.kernels) can import them
without importing the dispatcher that imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch

from ..errors import InputError

_REQUIRED_KWARGS = ("ray_start", "ray_end", "depth_resolution", "depth_resolution_importance", "box_warp")


@dataclass(frozen=True)
class RenderOptions:
    """The `rendering_kwargs` the renderer reads (docs/eg3d.md §1.2)."""

    ray_start: float = 2.25
    ray_end: float = 3.3
    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    box_warp: float = 1.0
    clamp_mode: str = "softplus"
    white_back: bool = False
    disparity_space_sampling: bool = False
    density_noise: float = 0.0

    @classmethod
    def from_kwargs(cls, kwargs: "RenderOptions | Mapping") -> "RenderOptions":
        """A RenderOptions as is, or one built (and checked) from a `rendering_kwargs` dict."""
        if isinstance(kwargs, RenderOptions):
            return kwargs
        if not isinstance(kwargs, Mapping):
            raise InputError(f"render options must be a RenderOptions or a rendering_kwargs dict, "
                             f"got {type(kwargs).__name__}")
        missing = [k for k in _REQUIRED_KWARGS if k not in kwargs]
        if missing:
            raise InputError(f"rendering_kwargs lacks {', '.join(missing)}")
        try:
            opts = cls(
                ray_start=kwargs["ray_start"],
                ray_end=kwargs["ray_end"],
                depth_resolution=int(kwargs["depth_resolution"]),
                depth_resolution_importance=int(kwargs["depth_resolution_importance"]),
                box_warp=float(kwargs["box_warp"]),
                clamp_mode=kwargs.get("clamp_mode", "softplus"),
                white_back=bool(kwargs.get("white_back", False)),
                disparity_space_sampling=bool(kwargs.get("disparity_space_sampling", False)),
                density_noise=float(kwargs.get("density_noise", 0) or 0),
            )
        except (TypeError, ValueError) as exc:
            raise InputError(f"rendering_kwargs: {exc}") from None
        opts.validate()
        return opts

    def validate(self) -> None:
        """InputError naming the field for anything the renderers do not implement."""
        if isinstance(self.ray_start, str) or isinstance(self.ray_end, str):
            raise InputError("rendering_kwargs ray_start/ray_end 'auto' (ShapeNet rays) is not supported")
        if not (float(self.ray_end) > float(self.ray_start)):
            raise InputError(f"ray_end ({self.ray_end}) must be greater than ray_start ({self.ray_start})")
        if self.depth_resolution < 2:
            raise InputError(f"depth_resolution must be >= 2, got {self.depth_resolution}")
        if self.depth_resolution_importance < 0:
            raise InputError(f"depth_resolution_importance must be >= 0, got {self.depth_resolution_importance}")
        if self.depth_resolution_importance > 0 and self.depth_resolution < 4:
            # the importance pdf lives on S - 3 bins (docs/eg3d.md §4.7)
            raise InputError(f"importance sampling needs depth_resolution >= 4 (it uses S - 3 bins), "
                             f"got {self.depth_resolution}")
        if not float(self.box_warp) > 0:
            raise InputError(f"box_warp must be > 0, got {self.box_warp}")
        if self.clamp_mode != "softplus":
            raise InputError(f"clamp_mode {self.clamp_mode!r}: only 'softplus' (EG3D's) is supported")
        if self.disparity_space_sampling:
            raise InputError("disparity_space_sampling=True is not supported (EG3D FFHQ uses False)")
        if self.density_noise:
            raise InputError("density_noise > 0 is a training-only option and is not supported")


class DecoderWeights(NamedTuple):
    """The OSGDecoder's effective weights, runtime gains folded in (docs/eg3d.md §4.3).

    w0 [HID, C], b0 [HID], w1 [1 + F, HID], b1 [1 + F]: features -> softplus(x W0^T + b0) ->
    (sigma, colour logits) = a W1^T + b1. Gradients flow back to whatever produced them.
    """

    w0: torch.Tensor
    b0: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor


class RenderOutput(NamedTuple):
    """What a render returns, per ray: features [N, R, F] after 2x - 1, depth [N, R, 1], weight_sum [N, R, 1]."""

    features: torch.Tensor
    depth: torch.Tensor
    weight_sum: torch.Tensor
