"""Camera -> rays: EG3D's RaySampler (docs/eg3d.md §4.4). Plain PyTorch for both backends."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_rays(cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RaySampler (docs/eg3d.md §4.4): OpenCV convention, normalised intrinsics. -> origins, dirs [N, R^2, 3]."""
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
