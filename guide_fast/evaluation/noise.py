"""Which random draws the before and after renders share (docs/guide.md §4.2, §4.4).

Every stochastic part of a render comes from one torch.Generator: the backbone's per-layer noise
(noise_mode "random"), the renderer's stratified depth jitter and its importance-sampling
uniforms. GUIDE's evaluation renders the "before" images (G_s) and the "after" images (G_u) in
separate calls on the global CUDA generator, and `evaluate_fid.py` renders G_s then G_u for each
sample: every render gets its own draws. So:

* "official" (the default): independent draws for the two sides, as GUIDE's scripts. ID,
  ID_others and preservation then include the noise's own effect on identity, and FID_pre the
  noise's own spread, as the published numbers do.
* "paired": the same draws on both sides, so the difference between the two images comes from the
  weights alone: lower variance, for comparing runs with each other (not with the paper).

Both are deterministic under `seed`. The "before" side draws the same in both modes.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

from ..errors import InputError

NoiseScheme = Literal["official", "paired"]
NOISE_SCHEMES: tuple[str, ...] = get_args(NoiseScheme)
_MASK = 0x7FFF_FFFF_FFFF_FFFF


def check_scheme(noise: str) -> str:
    if noise not in NOISE_SCHEMES:
        raise InputError(f"noise must be one of {', '.join(repr(n) for n in NOISE_SCHEMES)}, got {noise!r}")
    return noise


def side_seeds(noise: NoiseScheme, seed: int) -> tuple[int, int]:
    """The (before, after) generator seeds of one render batch."""
    check_scheme(noise)
    before = int(seed) & _MASK
    if noise == "paired":
        return before, before
    # one step of Knuth's MMIX LCG: a fixed, well-separated second stream
    return before, (before * 6364136223846793005 + 1442695040888963407) & _MASK


def side_generators(noise: NoiseScheme, seed: int, device) -> tuple[torch.Generator, torch.Generator]:
    """Fresh generators for the before and after renders of one batch (see `side_seeds`)."""
    device = torch.device(device)
    return tuple(torch.Generator(device=device).manual_seed(s) for s in side_seeds(noise, seed))


__all__ = ["NoiseScheme", "NOISE_SCHEMES", "side_seeds", "side_generators", "check_scheme"]
