"""GOAE inversion: aligned photos -> W+ latents in one encoder forward (docs/guide.md §3.3).

GUIDE's flow (unlearn.py, `--inversion goae`): each photo, already in EG3D framing, is resized
to 256 x 256 with PIL's bicubic filter and scaled to [-1, 1]; a folder is encoded in ONE batch;
`w, _ = encoder(img)` gives W+ offsets [B, 14, 512] and w_u = w + w_avg (the w_avg file, or here
the mapping buffer without one). No camera goes in: the encoder maps the image straight to W+.
GUIDE never calls `.eval()` on the encoder; `goae.load_encoder(mode="official")` keeps that
quirk, and then the forward runs under the global RNG state GUIDE's own run has at that point
(seeds.official_rng), so train-mode dropout draws are reproducible from the seed.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..seeds import official_rng
from .average import AverageLatent

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..eg3d.generator import TriPlaneGenerator
    from .framing import AlignedPhoto

ENCODER_MODES = ("eval", "official")


def resolve_encoder(encoder, device, mode: str = "eval"):
    """A GOAE state-dict file -> the loaded encoder (goae.load_encoder); a callable passes
    through as it is (the caller chose its train/eval mode)."""
    if isinstance(encoder, (str, os.PathLike)):
        if mode not in ENCODER_MODES:
            raise InputError(f"unknown encoder mode {mode!r}; expected one of {', '.join(map(repr, ENCODER_MODES))}")
        from .goae import load_encoder

        return load_encoder(encoder, device=device, mode=mode)
    if not callable(encoder):
        raise InputError(f"encoder must be a GOAE file or a callable (img256 -> W+ offsets), "
                         f"got {type(encoder).__name__}")
    return encoder


def encode_photos(encoder: "Callable[[torch.Tensor], torch.Tensor | tuple]", photos: "Sequence[AlignedPhoto]",
                  generator: "TriPlaneGenerator", w_avg: AverageLatent, device: "torch.device | str", *,
                  seed: int = 0) -> torch.Tensor:
    """W+ latents [N, num_ws, w_dim] (float32, on `device`) of aligned photos: one forward of
    the whole batch, offsets + w_avg."""
    x = torch.cat([p.encoder_input() for p in photos]).to(device)
    with torch.no_grad(), official_rng(seed, device):
        out = encoder(x)
    if isinstance(out, (tuple, list)):  # GOAE's encoder returns (w, features)
        out = out[0]
    want = (len(photos), generator.num_ws, generator.config.w_dim)
    if not torch.is_tensor(out) or tuple(out.shape) != want:
        got = list(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise InputError(f"the encoder returned {got}; expected W+ offsets of shape {list(want)} (photos x the "
                         "generator's num_ws x w_dim)")
    if not bool(torch.isfinite(out).all()):
        raise InputError("the encoder returned non-finite W+ offsets")
    return out.detach().to(device, torch.float32) + w_avg.to(device).unsqueeze(0)
