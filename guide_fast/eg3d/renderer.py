"""The reference tri-plane renderer: plain PyTorch, step for step as eg3d.md §4 describes.

This is the oracle the fused Triton renderer (guide_fast.kernels) is tested against, so it
favours readability over speed: every intermediate is materialised exactly as the official
`ImportanceRenderer` does it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .networks import FullyConnectedLayer


@dataclass(frozen=True)
class RenderOptions:
    """The `rendering_kwargs` the renderer reads (eg3d.md §1.2)."""

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
    def from_kwargs(cls, kwargs) -> "RenderOptions":
        if isinstance(kwargs, RenderOptions):
            return kwargs
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
        opts.validate()
        return opts

    def validate(self) -> None:
        if isinstance(self.ray_start, str) or isinstance(self.ray_end, str):
            raise NotImplementedError("rendering_kwargs ray_start/ray_end 'auto' (ShapeNet rays) is not supported")
        if not (float(self.ray_end) > float(self.ray_start)):
            raise ValueError(f"ray_end ({self.ray_end}) must be greater than ray_start ({self.ray_start})")
        if self.depth_resolution < 2:
            raise ValueError(f"depth_resolution must be >= 2, got {self.depth_resolution}")
        if self.depth_resolution_importance < 0:
            raise ValueError("depth_resolution_importance must be >= 0")
        if self.clamp_mode != "softplus":
            raise NotImplementedError(f"clamp_mode {self.clamp_mode!r}: only 'softplus' (EG3D's) is supported")
        if self.disparity_space_sampling:
            raise NotImplementedError("disparity_space_sampling=True is not supported (EG3D FFHQ uses False)")
        if self.density_noise:
            raise NotImplementedError("density_noise > 0 is a training-only option and is not supported")


class OSGDecoder(nn.Module):
    """Mean of the 3 planes' features -> FC(C->hidden) -> softplus -> FC(hidden->1+F) (eg3d.md §4.3)."""

    def __init__(self, n_features=32, hidden_dim=64, output_dim=32, lr_multiplier=1.0):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnectedLayer(hidden_dim, 1 + output_dim, lr_multiplier=lr_multiplier),
        )

    def effective_params(self):
        """(W0, b0, W1, b1) with the runtime gains folded in: what a fused kernel consumes."""
        fc0, fc1 = self.net[0], self.net[2]
        return fc0.effective_weight(), fc0.effective_bias(), fc1.effective_weight(), fc1.effective_bias()

    def forward(self, sampled_features: torch.Tensor):
        """sampled_features [N, 3, M, C] -> (rgb [N, M, F], sigma [N, M, 1]); sigma is raw."""
        x = sampled_features.mean(1)
        n, m, c = x.shape
        x = self.net(x.reshape(n * m, c)).reshape(n, m, -1)
        # MipNeRF widened sigmoid: range (-0.001, 1.001).
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
        sigma = x[..., 0:1]
        return rgb, sigma


def project_onto_planes(coordinates: torch.Tensor) -> torch.Tensor:
    """[N, M, 3] -> [N, 3, M, 2]: planes XY, XZ and ZX (the released checkpoints' quirk, eg3d.md §4.1).

    Equal to the official `p @ inv(M_k)` with M_k from `generate_planes()`, keeping (u, v).
    """
    x, y, z = coordinates.unbind(-1)
    return torch.stack(
        [torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([z, x], -1)], dim=1
    )


def sample_from_planes(planes: torch.Tensor, coordinates: torch.Tensor, box_warp: float = 1.0) -> torch.Tensor:
    """Bilinear, zero padding, align_corners=False (eg3d.md §4.2). -> [N, 3, M, C]."""
    n, n_planes, c, h, w = planes.shape
    m = coordinates.shape[1]
    coords = (2.0 / box_warp) * coordinates
    grid = project_onto_planes(coords).reshape(n * n_planes, 1, m, 2)
    out = F.grid_sample(
        planes.reshape(n * n_planes, c, h, w), grid.to(planes.dtype), mode="bilinear",
        padding_mode="zeros", align_corners=False,
    )
    return out.permute(0, 3, 2, 1).reshape(n, n_planes, m, c)


def ray_march(colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, white_back: bool = False):
    """MipRayMarcher2 (eg3d.md §4.6) over sorted samples [N, R, S, *].

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
    # Global min/max over the whole batch, not per ray (eg3d.md §4.6 step 5).
    composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))
    if white_back:
        composite_rgb = composite_rgb + 1 - weight_total
    return composite_rgb * 2 - 1, composite_depth, weights


def stratified_depths(n: int, rays: int, options: RenderOptions, uniforms: torch.Tensor, device) -> torch.Tensor:
    """linspace(start, end, S) + U[0,1) * (end-start)/(S-1) (eg3d.md §4.5) -> [N, R, S, 1]."""
    s = options.depth_resolution
    base = torch.linspace(options.ray_start, options.ray_end, s, device=device).reshape(1, 1, s, 1)
    delta = (options.ray_end - options.ray_start) / (s - 1)
    return base + uniforms * delta


def importance_depths(depths_coarse: torch.Tensor, weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Smooth the coarse weights and invert their CDF at the given uniforms (eg3d.md §4.7)."""
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


def unify_samples(depths1, colors1, densities1, depths2, colors2, densities2):
    """Concatenate coarse and fine samples and sort by depth (eg3d.md §4.7 step 7)."""
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
    rgb, sigma = decoder(sample_from_planes(planes, points, options.box_warp))
    return rgb.reshape(n, r, s, -1), sigma.reshape(n, r, s, 1)


def render_reference(planes, decoder, ray_origins, ray_directions, options: RenderOptions, stratified, importance):
    """The official ImportanceRenderer.forward with the random draws supplied.

    planes [N, 3, C, H, W]; rays [N, R, 3]; stratified [N, R, S, 1]; importance [N*R, S_imp].
    Returns (features [N, R, F], depth [N, R, 1], weight_sum [N, R, 1]).
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
    return features, depth, weights.sum(2)


def sample_rays(cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int):
    """RaySampler (eg3d.md §4.4): OpenCV convention, normalised intrinsics. -> origins, dirs [N, R^2, 3]."""
    n = cam2world.shape[0]
    dev = cam2world.device
    m = resolution * resolution
    fx, fy = intrinsics[:, 0, 0], intrinsics[:, 1, 1]
    cx, cy, sk = intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 0, 1]
    ar = torch.arange(resolution, dtype=torch.float32, device=dev)
    uv = torch.stack(torch.meshgrid(ar, ar, indexing="ij")) * (1.0 / resolution) + (0.5 / resolution)
    uv = uv.flip(0).reshape(2, -1).transpose(1, 0).unsqueeze(0).expand(n, -1, -1)
    x_cam, y_cam = uv[:, :, 0], uv[:, :, 1]
    z_cam = torch.ones((n, m), device=dev)
    x_lift = (x_cam - cx[:, None] + cy[:, None] * sk[:, None] / fy[:, None] - sk[:, None] * y_cam / fy[:, None]) / fx[:, None] * z_cam
    y_lift = (y_cam - cy[:, None]) / fy[:, None] * z_cam
    cam_rel = torch.stack((x_lift, y_lift, z_cam, torch.ones_like(z_cam)), dim=-1)
    world = torch.bmm(cam2world, cam_rel.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    origins = cam2world[:, :3, 3]
    dirs = F.normalize(world - origins[:, None, :], dim=2)
    return origins.unsqueeze(1).expand(-1, m, -1).contiguous(), dirs
