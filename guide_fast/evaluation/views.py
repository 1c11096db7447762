"""The evaluation views and ID-over-views scoring, defined once (docs/guide.md §3.6, §4.2).

GUIDE renders each identity before and after unlearning at 11 views, yaw
`np.linspace(-pi/12, pi/12, 11)` at pitch -0.2, and scores each before/after pair with the
cosine of the identity embeddings. The unlearning report (unlearn/report.py), the engine's
before/after renders (unlearn/engine.py) and `evaluate` all take the views and the scoring from
here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import cameras
from ..errors import GuideFastError, InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..identity.scorer import IdentityScorer

NUM_ID_VIEWS = 11
DEFAULT_YAW_RANGE = math.pi / 12
DEFAULT_PITCH = -0.2


def view_yaws(yaw_range: float = DEFAULT_YAW_RANGE, count: int = NUM_ID_VIEWS) -> list[float]:
    """GUIDE's view yaws: np.linspace(-yaw_range, yaw_range, count) (one frontal view for count 1)."""
    if count < 1:
        raise InputError(f"the number of views must be >= 1, got {count}")
    if count == 1:
        return [0.0]
    return [float(v) for v in np.linspace(-yaw_range, yaw_range, count)]


@dataclass(frozen=True)
class EvalCamera:
    """The evaluation cameras: GUIDE's conventions (docs/guide.md §3.2, §4.2, §4.4)."""

    yaw_range: float = DEFAULT_YAW_RANGE
    pitch: float = DEFAULT_PITCH
    radius: float = cameras.DEFAULT_RADIUS
    fov_degrees: float = cameras.GUIDE_FOV_DEGREES
    lookat: tuple = cameras.GUIDE_LOOKAT

    def __post_init__(self):
        cameras.check_camera(radius=self.radius, fov_degrees=self.fov_degrees, yaw_range=self.yaw_range,
                             pitch=self.pitch, lookat=tuple(self.lookat))

    @classmethod
    def from_config(cls, config: dict | None) -> "EvalCamera":
        """Take the camera fields of an UnlearnConfig (as a dict) so that evaluation renders the
        views the run trained on; absent fields keep GUIDE's defaults."""
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise InputError(f"the run's config is a {type(config).__name__}, expected an object of UnlearnConfig fields")

        def number(name, v):  # from a report file: anything may be there
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"the run's config field {name!r} is {str(v)[:40]!r}; expected a finite number")
            return float(v)

        kw = {k: number(k, config[k]) for k in ("yaw_range", "pitch", "radius", "fov_degrees") if config.get(k) is not None}
        if config.get("lookat") is not None:
            look = config["lookat"]
            if not isinstance(look, (list, tuple)) or len(look) != 3:
                raise InputError(f"the run's config field 'lookat' is {str(look)[:40]!r}; expected 3 numbers")
            kw["lookat"] = tuple(number("lookat", v) for v in look)
        return cls(**kw)

    def view_yaws(self) -> torch.Tensor:
        """The 11 ID views' yaws: np.linspace's float64 values, as GUIDE passes them on."""
        return torch.tensor(view_yaws(self.yaw_range, NUM_ID_VIEWS), dtype=torch.float64)

    def labels(self, yaws: "torch.Tensor | np.ndarray | Sequence[float]", device: "torch.device | str") -> torch.Tensor:
        # float64 yaws: pose_label adds pi/2 before rounding to float32, as the official scripts
        return cameras.pose_label(torch.as_tensor(yaws, dtype=torch.float64), self.pitch, fov_degrees=self.fov_degrees,
                                  lookat=self.lookat, radius=self.radius).to(device)

    def conditioning(self, batch: int, device: "torch.device | str") -> torch.Tensor:
        # docs/guide.md §3.2: the mapping is conditioned on the frontal camera with the same intrinsics.
        return cameras.frontal_label(batch, fov_degrees=self.fov_degrees, lookat=self.lookat,
                                     radius=self.radius).to(device)


# ------------------------------------------------------------------------------- scoring
def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of [N, D] embeddings (float64); NaN where either row is NaN."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"paired embeddings must both be [N, D], got {list(a.shape)} and {list(b.shape)}")
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def nanmean(x) -> float | None:
    """Mean of the finite values; None when there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def view_scores(before: torch.Tensor, after: torch.Tensor, num_views: int = NUM_ID_VIEWS) -> dict:
    """ID-style scores of paired embeddings laid out identity-major: [K * num_views, D] each.

    Returns per_identity [K][num_views] cosines (None where a face was not found), per_view
    means over identities, per-identity means, and the mean over every scored pair (GUIDE's ID
    is the mean over the 11 views of the target; with several identities, of all their pairs).
    """
    cos = paired_cosine(before, after)
    if cos.numel() % num_views:
        raise InputError(f"{cos.numel()} pairs do not split into views of {num_views}")
    grid = cos.reshape(-1, num_views).numpy()
    clean = lambda row: [None if not np.isfinite(v) else float(v) for v in row]  # noqa: E731
    return {
        "mean": nanmean(grid),
        "per_view": [nanmean(grid[:, v]) for v in range(num_views)],
        "per_identity_mean": [nanmean(row) for row in grid],
        "per_identity": [clean(row) for row in grid],
        "pairs": int(grid.size),
        "pairs_scored": int(np.isfinite(grid).sum()),
    }


def embed(scorer, images: torch.Tensor, align: str | None = None) -> torch.Tensor:
    """[N,3,H,W] in [-1,1] -> [N, D] float64 CPU, NaN rows where no face was found.

    Uses `embed_detailed` (embeddings + found mask) when the scorer has it, else `embed`, whose
    contract is NaN rows for missing faces; align None is the scorer's own default. The shape is
    checked so that a scorer mismatch cannot produce a plausible-looking ID."""
    kw = {} if align is None else {"align": align}
    if hasattr(scorer, "embed_detailed"):
        out = scorer.embed_detailed(images, **kw)
        emb, found = out.embeddings, out.found
    else:
        emb, found = scorer.embed(images, **({} if align is None else {"aligned": align})), None
    emb = torch.as_tensor(emb).detach().to("cpu", torch.float64)
    if emb.ndim != 2 or emb.shape[0] != images.shape[0]:
        raise GuideFastError(f"identity scorer returned {list(emb.shape)} for {images.shape[0]} images")
    if found is not None:
        found = torch.as_tensor(found, dtype=torch.bool).reshape(-1).cpu()
        emb = emb.clone()
        emb[~found] = float("nan")
    return emb


def score_view_renders(scorer: "IdentityScorer", before: torch.Tensor, after: torch.Tensor,
                       align: str | None = None) -> dict:
    """`view_scores` of renders [K, V, 3, H, W] before and after (V views per identity)."""
    if before.shape != after.shape or before.ndim != 5:
        raise InputError(f"view renders must both be [K, V, 3, H, W], got {list(before.shape)} and {list(after.shape)}")
    k, v = before.shape[:2]
    flat = lambda x: x.reshape(k * v, *x.shape[2:])  # noqa: E731
    return view_scores(embed(scorer, flat(before), align), embed(scorer, flat(after), align), num_views=v)


__all__ = ["NUM_ID_VIEWS", "EvalCamera", "view_yaws", "paired_cosine", "view_scores", "embed", "score_view_renders",
           "nanmean"]
