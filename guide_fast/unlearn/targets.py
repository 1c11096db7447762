"""Latent-space constructions of GUIDE: the UFO target and the adjacent latents (docs/guide.md §3.4-3.5)."""
from __future__ import annotations

import torch

from ..errors import InputError


def frobenius(x: torch.Tensor) -> torch.Tensor:
    """Norm over the whole W+ tensor of each sample ([N, L, D] -> [N, 1, 1]), not per layer
    (docs/guide.md §3.4: the norm is taken over all 14 x 512 entries)."""
    return x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))


def target_latent(w_source: torch.Tensor, w_avg: torch.Tensor, mode: str = "extra", distance: float = 30.0) -> torch.Tensor:
    """UFO (docs/guide.md §3.4).

    extra:   w_t = w_avg - d * (w_u - w_avg) / ||w_u - w_avg||_F  (average face pushed away)
    average: w_t = w_avg                                           (the README baseline)
    w_source [N, L, D]; w_avg [D] or [L, D] -> [N, L, D].
    """
    w_avg = w_avg.to(w_source).expand_as(w_source[0]).unsqueeze(0)
    if mode == "average":
        return w_avg.expand_as(w_source).clone()
    if mode != "extra":
        raise InputError(f"unknown target mode {mode!r}; expected 'extra' or 'average'")
    w_id = w_source - w_avg
    norm = frobenius(w_id)
    if bool((norm == 0).any()):
        raise InputError("w_source equals w_avg for some identity: the UFO direction is undefined")
    return w_avg - w_id / norm * distance  # the official order of operations (unlearn.py), for equal rounding


def adjacency_offsets(w_random: torch.Tensor, w_source: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Delta = alpha * (w_r - w_u) / ||w_r - w_u||_F (docs/guide.md §3.5(b) step 3).

    w_random [N, K, L, D], w_source [N, L, D], alpha [N, K] -> [N, K, L, D]. The same Delta is
    added to the source and to the target latent.
    """
    diff = w_random - w_source.unsqueeze(1)
    norm = diff.flatten(2).norm(dim=2)[..., None, None]
    return alpha[..., None, None] * diff / norm
