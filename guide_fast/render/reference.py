"""The reference tri-plane renderer: plain PyTorch, step for step as docs/eg3d.md §4 describes.

This is the oracle the fused Triton renderer (guide_fast.kernels) is tested against, so it
favours readability over speed: every intermediate is materialised exactly as the official
`ImportanceRenderer` does it. `render_reference` takes the same arguments and returns the same
`RenderOutput` as the fused `fused_render`; `render_triplanes` (dispatch.py) checks the inputs
once and picks one of the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import DecoderWeights, RenderOptions, RenderOutput


def decode(sampled_features: torch.Tensor, decoder: DecoderWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """OSGDecoder (docs/eg3d.md §4.3): mean of the 3 planes' features -> FC(C->hidden) -> softplus
    -> FC(hidden->1+F). sampled_features [N, 3, M, C] -> (rgb [N, M, F], sigma [N, M, 1]); sigma raw.

    The same operations as the official FullyConnectedLayer (addmm with the effective weights in
    the features' dtype), so autocast sees exactly what it sees in the official decoder.
    """
    x = sampled_features.mean(1)
    n, m, c = x.shape
    x = x.reshape(n * m, c)
    x = torch.addmm(decoder.b0.to(x.dtype).unsqueeze(0), x, decoder.w0.to(x.dtype).t())
    x = F.softplus(x)
    x = torch.addmm(decoder.b1.to(x.dtype).unsqueeze(0), x, decoder.w1.to(x.dtype).t())
    x = x.reshape(n, m, -1)
    # MipNeRF widened sigmoid: range (-0.001, 1.001).
    rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
    sigma = x[..., 0:1]
    return rgb, sigma


def project_onto_planes(coordinates: torch.Tensor) -> torch.Tensor:
    """[N, M, 3] -> [N, 3, M, 2]: planes XY, XZ and ZX (the released checkpoints' quirk, docs/eg3d.md §4.1).

    Equal to the official `p @ inv(M_k)` with M_k from `generate_planes()`, keeping (u, v).
    """
    x, y, z = coordinates.unbind(-1)
    return torch.stack(
        [torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([z, x], -1)], dim=1
    )


def sample_from_planes(planes: torch.Tensor, coordinates: torch.Tensor, box_warp: float = 1.0) -> torch.Tensor:
    """Bilinear, zero padding, align_corners=False (docs/eg3d.md §4.2). -> [N, 3, M, C]."""
    n, n_planes, c, h, w = planes.shape
    m = coordinates.shape[1]
    coords = (2.0 / box_warp) * coordinates
    grid = project_onto_planes(coords).reshape(n * n_planes, 1, m, 2)
    out = F.grid_sample(
        planes.reshape(n * n_planes, c, h, w), grid.to(planes.dtype), mode="bilinear",
        padding_mode="zeros", align_corners=False,
    )
    return out.permute(0, 3, 2, 1).reshape(n, n_planes, m, c)


def ray_march(colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, white_back: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MipRayMarcher2 (docs/eg3d.md §4.6) over sorted samples [N, R, S, *].

    Returns (features [N, R, F] scaled to 2x-1, depth [N, R, 1], weights [N, R, S-1, 1]).
    """
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    densities_mid = F.softplus(densities_mid - 1)  # activation bias -1
    alpha = 1 - torch.exp(-densities_mid * deltas)
    alpha_shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(alpha_shifted, -2)[:, :, :-1]
    composite_rgb = torch.sum(weights * colors_mid, -2)
    weight_total = weights.sum(2)
    composite_depth = torch.sum(weights * depths_mid, -2) / weight_total
    composite_depth = torch.nan_to_num(composite_depth, float("inf"))
    # Global min/max over the whole batch, not per ray (docs/eg3d.md §4.6 step 5).
    composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))
    if white_back:
        composite_rgb = composite_rgb + 1 - weight_total
    return composite_rgb * 2 - 1, composite_depth, weights


def stratified_depths(n: int, rays: int, options: RenderOptions, uniforms: torch.Tensor,
                      device: torch.device | str | None) -> torch.Tensor:
    """linspace(start, end, S) + U[0,1) * (end-start)/(S-1) (docs/eg3d.md §4.5) -> [N, R, S, 1]."""
    s = options.depth_resolution
    base = torch.linspace(options.ray_start, options.ray_end, s, device=device).reshape(1, 1, s, 1)
    delta = (options.ray_end - options.ray_start) / (s - 1)
    return base + uniforms * delta


def importance_depths(depths_coarse: torch.Tensor, weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Smooth the coarse weights and invert their CDF at the given uniforms (docs/eg3d.md §4.7)."""
    with torch.no_grad():
        n, r, s, _ = depths_coarse.shape
        z_vals = depths_coarse.reshape(n * r, s)
        w = weights.reshape(n * r, -1)  # S-1 interval weights
        w = F.max_pool1d(w.unsqueeze(1).float(), 2, 1, padding=1)
        w = F.avg_pool1d(w, 2, 1).squeeze(1)
        w = w + 0.01
        z_mid = 0.5 * (z_vals[:, :-1] + z_vals[:, 1:])
        fine = sample_pdf(z_mid, w[:, 1:-1], uniforms)
        return fine.reshape(n, r, uniforms.shape[-1], 1)


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Inverse-CDF sampling as the official `sample_pdf(det=False)`, with u supplied.

    bins [B, S-1] (midpoints), weights [B, S-3]; only bins[0 .. S-3] are reachable (§4.7 quirk).
    """
    n_rays, n_bins = weights.shape
    weights = weights + eps
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
    u = u.contiguous()
    inds = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(inds - 1, 0)
    above = torch.clamp_max(inds, n_bins)
    n_imp = u.shape[-1]
    inds_sampled = torch.stack([below, above], -1).view(n_rays, 2 * n_imp)
    cdf_g = torch.gather(cdf, 1, inds_sampled).view(n_rays, n_imp, 2)
    bins_g = torch.gather(bins, 1, inds_sampled).view(n_rays, n_imp, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


def unify_samples(depths1: torch.Tensor, colors1: torch.Tensor, densities1: torch.Tensor, depths2: torch.Tensor,
                  colors2: torch.Tensor, densities2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate coarse and fine samples and sort by depth (docs/eg3d.md §4.7 step 7)."""
    all_depths = torch.cat([depths1, depths2], dim=-2)
    all_colors = torch.cat([colors1, colors2], dim=-2)
    all_densities = torch.cat([densities1, densities2], dim=-2)
    _, indices = torch.sort(all_depths, dim=-2)
    all_depths = torch.gather(all_depths, -2, indices)
    all_colors = torch.gather(all_colors, -2, indices.expand(-1, -1, -1, all_colors.shape[-1]))
    all_densities = torch.gather(all_densities, -2, indices.expand(-1, -1, -1, 1))
    return all_depths, all_colors, all_densities


def _run_model(planes, decoder, depths, ray_origins, ray_directions, options):
    n, r, s, _ = depths.shape
    points = (ray_origins.unsqueeze(-2) + depths * ray_directions.unsqueeze(-2)).reshape(n, r * s, 3)
    rgb, sigma = decode(sample_from_planes(planes, points, options.box_warp), decoder)
    return rgb.reshape(n, r, s, -1), sigma.reshape(n, r, s, 1)


def render_reference(planes: torch.Tensor, decoder: DecoderWeights, ray_origins: torch.Tensor,
                     ray_directions: torch.Tensor, stratified: torch.Tensor, importance: torch.Tensor,
                     options: RenderOptions) -> RenderOutput:
    """The official ImportanceRenderer.forward with the random draws supplied.

    planes [N, 3, C, H, W]; decoder the effective weights; rays [N, R, 3]; stratified
    [N, R, S, 1]; importance [N*R, S_imp]. Inputs are trusted (render_triplanes checks them).
    Differentiable with respect to everything, the rays included.
    """
    n, r, _ = ray_origins.shape
    depths_coarse = stratified_depths(n, r, options, stratified, ray_origins.device)
    colors_coarse, densities_coarse = _run_model(planes, decoder, depths_coarse, ray_origins, ray_directions, options)
    if options.depth_resolution_importance > 0:
        _, _, weights = ray_march(colors_coarse, densities_coarse, depths_coarse, options.white_back)
        depths_fine = importance_depths(depths_coarse, weights, importance)
        colors_fine, densities_fine = _run_model(planes, decoder, depths_fine, ray_origins, ray_directions, options)
        depths, colors, densities = unify_samples(
            depths_coarse, colors_coarse, densities_coarse, depths_fine, colors_fine, densities_fine
        )
    else:
        depths, colors, densities = depths_coarse, colors_coarse, densities_coarse
    features, depth, weights = ray_march(colors, densities, depths, options.white_back)
    return RenderOutput(features, depth, weights.sum(2))
