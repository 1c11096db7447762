"""The latents and renders an unlearning run starts from and reports on: identities from seeds,
the evaluation view yaws and the before/after renders (docs/guide.md §3.3, §3.6).

Apart from the engine so that the report and its plots use them without importing the engine
(which imports the report).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import cameras
from ..errors import InputError
from ..evaluation.views import view_yaws as evaluation_view_yaws
from ..seeds import identity_z
from .config import UnlearnConfig

if TYPE_CHECKING:
    from ..eg3d.generator import TriPlaneGenerator


def latents_from_seeds(gen: "TriPlaneGenerator", seeds: int | list[int], truncation_psi: float = 1.0,
                       fov_degrees: float = 18.837, lookat=(0, 0, 0), radius: float = 2.7) -> torch.Tensor:
    """z ~ N(0, I) from each seed, drawn as GUIDE's unlearn.py draws it (guide_fast/seeds.py: the
    camera sampler's four draws first, then z, on the generator's device), mapped with the
    frontal conditioning camera (docs/guide.md §3.3, Random scenario). On CUDA this is the
    official latent of `--seed N`; on the CPU a deterministic one that cannot equal it (CPU and
    CUDA random streams differ), so a seed's identity depends on the device type."""
    if isinstance(seeds, int):
        seeds = [seeds]
    seeds = list(seeds)
    if not seeds:
        raise InputError("seeds is empty: need at least one identity (N = 0)")
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool):
            raise InputError(f"seeds must be integers, got {s!r}")
        if not 0 <= s < 2 ** 63:  # the CLI's range: torch's generators take a signed 64-bit seed
            raise InputError(f"seed {s} is out of range; expected 0 <= seed < 2**63")
    if len(set(seeds)) < len(seeds):  # the same identity twice would count twice in the joint loss
        raise InputError(f"seeds {sorted({s for s in seeds if seeds.count(s) > 1})} given more than once: "
                         "each identity is unlearned once")
    device = next(gen.parameters()).device
    z = torch.stack([identity_z(s, gen.config.z_dim, device) for s in seeds])
    c = cameras.frontal_label(len(seeds), fov_degrees=fov_degrees, lookat=lookat, radius=radius, device=device)
    with torch.no_grad():
        return gen.mapping(z, c, truncation_psi=truncation_psi)


def view_yaws(cfg: UnlearnConfig) -> list[float]:
    """docs/guide.md §3.6: the evaluation views (defined in evaluation/views.py), cfg.eval_views
    of them over ±cfg.yaw_range at pitch cfg.pitch."""
    return evaluation_view_yaws(cfg.yaw_range, cfg.eval_views)


@torch.no_grad()
def render_views(gen: "TriPlaneGenerator", ws: torch.Tensor, cfg: UnlearnConfig, chunk: int = 4,
                 seed: int = 1234, yaws: "list[float] | None" = None) -> torch.Tensor:
    """Renders [N, V, 3, H, W] (fp32, [-1,1]) of each latent from the evaluation yaws (or the
    given `yaws`, at cfg.pitch), constant noise and fixed renderer draws, so before/after renders
    differ only by the weights."""
    from ..render import make_render_draws

    device = ws.device
    yaws = torch.tensor(view_yaws(cfg) if yaws is None else list(yaws), dtype=torch.float64)
    cams = cameras.pose_label(yaws, cfg.pitch, fov_degrees=cfg.fov_degrees, lookat=cfg.lookat, radius=cfg.radius).to(device)
    rays = gen.neural_rendering_resolution ** 2
    out = []
    for i in range(ws.shape[0]):
        imgs = []
        for start in range(0, len(yaws), chunk):
            c = cams[start:start + chunk]
            g = torch.Generator(device=device).manual_seed(seed + start)
            draws = make_render_draws(c.shape[0], rays, gen.render_options, device, g)
            w = ws[i:i + 1].expand(c.shape[0], -1, -1)
            imgs.append(gen.synthesis(w, c, noise_mode="const", render_draws=draws)["image"].float().cpu())
        out.append(torch.cat(imgs))
    return torch.stack(out)
