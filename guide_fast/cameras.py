"""EG3D camera conventions (docs/eg3d.md §6) and the GUIDE camera choices (docs/guide.md §3.2).

A camera label is 25 values: the 4x4 OpenCV camera-to-world matrix (row-major), then the 3x3
intrinsics normalised by image size (row-major). The world is +Y up, the face looks along +Z.
All functions are plain tensor maths (no host synchronisation), so they can run inside a
captured CUDA graph.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import InputError

#: Dataset focal length of the FFHQ labels: 2985.29 / 700 (docs/eg3d.md §6).
FFHQ_FOCAL = 4.2647
#: GUIDE and EG3D scripts use FOV_to_intrinsics(18.837) (docs/guide.md §3.2).
GUIDE_FOV_DEGREES = 18.837
DEFAULT_RADIUS = 2.7
#: The look-at point GUIDE's code really uses: its key lookup misses and falls back to the
#: origin (docs/guide.md §3.2). EG3D's own scripts look at EG3D_PIVOT.
GUIDE_LOOKAT = (0.0, 0.0, 0.0)
EG3D_PIVOT = (0.0, 0.0, 0.2)


def fov_to_focal(fov_degrees: float) -> float:
    """EG3D's `FOV_to_intrinsics` focal: 1 / (tan(fov * 3.14159 / 360) * 1.414), constants as written.

    f(18.837) = 4.26339, about 0.03% from the dataset's 4.2647 (docs/eg3d.md §6).
    """
    if not (0 < fov_degrees < 180):
        raise InputError(f"field of view must be in (0, 180) degrees, got {fov_degrees}")
    return 1.0 / (math.tan(fov_degrees * 3.14159 / 360) * 1.414)


def _const(values, device=None, dtype=torch.float32) -> torch.Tensor:
    """A small constant built with fill kernels rather than a host-to-device copy, so that the
    camera maths can run inside a CUDA graph capture (copies from host memory cannot)."""
    return torch.stack([torch.full((), float(v), device=device, dtype=dtype) for v in values])


def intrinsics(focal: float = FFHQ_FOCAL, batch: int = 1, device=None) -> torch.Tensor:
    """Normalised 3x3 intrinsics [[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]] -> [batch, 3, 3]."""
    k = _const([focal, 0.0, 0.5, 0.0, focal, 0.5, 0.0, 0.0, 1.0], device).reshape(3, 3)
    return k.unsqueeze(0).repeat(batch, 1, 1)


def fov_to_intrinsics(fov_degrees: float = GUIDE_FOV_DEGREES, batch: int = 1, device=None) -> torch.Tensor:
    return intrinsics(fov_to_focal(fov_degrees), batch, device)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.norm(v, dim=-1, keepdim=True)


def cam2world_from_forward(forward: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """`create_cam2world_matrix` (docs/eg3d.md §6): R = [right | up | forward], then translate."""
    forward = _normalize(forward)
    up0 = _const([0.0, 1.0, 0.0], forward.device, forward.dtype).expand_as(forward)
    right = -_normalize(torch.cross(up0, forward, dim=-1))
    up = _normalize(torch.cross(forward, right, dim=-1))
    n = forward.shape[0]
    rot = torch.stack((right, up, forward), dim=-1)
    top = torch.cat([rot, origin.unsqueeze(-1)], dim=-1)
    bottom = _const([0.0, 0.0, 0.0, 1.0], forward.device, forward.dtype).expand(n, 1, 4)
    return torch.cat([top, bottom], dim=1)


def look_at_pose(horizontal, vertical, lookat=GUIDE_LOOKAT, radius: float = DEFAULT_RADIUS, device=None) -> torch.Tensor:
    """`LookAtPoseSampler.sample` with zero spread (docs/eg3d.md §6). Angles in radians.

    horizontal = pi/2 and vertical = pi/2 is the frontal camera at (0, 0, radius).
    Accepts floats or tensors of shape [N] / [N, 1]; returns cam2world [N, 4, 4].
    """
    h = _as_angles(horizontal, device)
    dev = h.device
    v = _as_angles(vertical, dev)
    h, v = torch.broadcast_tensors(h, v)
    v = torch.clamp(v, 1e-5, math.pi - 1e-5)
    phi = torch.arccos(1 - 2 * v / math.pi)
    origin = torch.cat(
        [radius * torch.sin(phi) * torch.cos(math.pi - h), radius * torch.cos(phi), radius * torch.sin(phi) * torch.sin(math.pi - h)],
        dim=-1,
    )
    target = lookat.to(dev, torch.float32).reshape(1, 3) if torch.is_tensor(lookat) else _const(lookat, dev).reshape(1, 3)
    return cam2world_from_forward(target - origin, origin)


def _as_angles(x, device) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.to(device=device if device is not None else x.device, dtype=torch.float32).reshape(-1, 1)
    if isinstance(x, (int, float)):
        return torch.full((1, 1), float(x), device=device)
    return torch.as_tensor(x, dtype=torch.float32, device=device).reshape(-1, 1)


def check_camera(*, radius: float, fov_degrees: float, yaw_range: float, pitch: float, lookat=(0, 0, 0)) -> None:
    """InputError unless the orbit camera is one that renders: radius > 0, 0 < FOV < 180 degrees,
    yaw range >= 0, all finite (a zero radius or FOV gives NaN cameras, then NaN images)."""
    for name, v in (("radius", radius), ("fov_degrees", fov_degrees), ("yaw_range", yaw_range), ("pitch", pitch),
                    *((f"lookat[{i}]", x) for i, x in enumerate(lookat))):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"camera {name} must be a finite number, got {v!r}")
    if radius <= 0:
        raise InputError(f"camera radius must be > 0, got {radius}")
    if not 0 < fov_degrees < 180:
        raise InputError(f"camera fov_degrees must be in (0, 180), got {fov_degrees}")
    if yaw_range < 0:
        raise InputError(f"camera yaw_range must be >= 0, got {yaw_range}")


def _from_frontal(x, device) -> torch.Tensor:
    """pi/2 + x as float32 [N]: summed in float64 and rounded once, as the official scripts pass
    `np.pi / 2 + angle` (a float64) to LookAtPoseSampler; a float32 sum would round the offset,
    pi/2 and the sum separately (3e-7 apart in the camera for some of GUIDE's 11 views)."""
    if torch.is_tensor(x):
        t = x.to(device=device if device is not None else x.device, dtype=torch.float64)
    elif isinstance(x, (int, float)):  # a fill, not a host-to-device copy: safe inside CUDA-graph capture
        t = torch.full((1,), float(x), dtype=torch.float64, device=device)
    else:
        t = torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)
    return (t.reshape(-1) + math.pi / 2).to(torch.float32)


def camera_label(cam2world: torch.Tensor, intrinsics_: torch.Tensor) -> torch.Tensor:
    """[N, 4, 4] + [N, 3, 3] (or [3, 3]) -> [N, 25]."""
    if cam2world.ndim != 3 or cam2world.shape[1:] != (4, 4):
        raise InputError(f"cam2world must have shape [N, 4, 4], got {list(cam2world.shape)}")
    n = cam2world.shape[0]
    if intrinsics_.ndim == 2:
        intrinsics_ = intrinsics_.unsqueeze(0)
    intrinsics_ = intrinsics_.to(cam2world).expand(n, 3, 3)
    return torch.cat([cam2world.reshape(n, 16), intrinsics_.reshape(n, 9)], dim=1)


def pose_label(yaw, pitch, *, fov_degrees: float = GUIDE_FOV_DEGREES, focal: float | None = None,
               lookat=GUIDE_LOOKAT, radius: float = DEFAULT_RADIUS, device=None) -> torch.Tensor:
    """Camera label for yaw / pitch offsets from frontal (radians): horizontal = pi/2 + yaw,
    vertical = pi/2 + pitch. GUIDE renders at pitch -0.2 (camera above the horizon)."""
    yaw_t = _from_frontal(yaw, device)
    pitch_t = _from_frontal(pitch, yaw_t.device)
    yaw_t, pitch_t = torch.broadcast_tensors(yaw_t, pitch_t)
    c2w = look_at_pose(yaw_t, pitch_t, lookat=lookat, radius=radius, device=yaw_t.device)
    f = fov_to_focal(fov_degrees) if focal is None else focal
    return camera_label(c2w, intrinsics(f, c2w.shape[0], yaw_t.device))


def frontal_label(batch: int = 1, **kwargs) -> torch.Tensor:
    """The mapping network's conditioning camera in GUIDE: frontal (docs/guide.md §3.2)."""
    return pose_label(torch.zeros(batch, device=kwargs.pop("device", None)), 0.0, **kwargs)


def check_label(name: str, c: torch.Tensor, batch: int | None = None) -> None:
    if not torch.is_tensor(c) or c.ndim != 2 or c.shape[1] != 25:
        shape = list(c.shape) if torch.is_tensor(c) else type(c).__name__
        raise InputError(f"{name} must be camera labels of shape [N, 25] (16 cam2world + 9 intrinsics), got {shape}")
    if batch is not None and c.shape[0] not in (1, batch):
        raise InputError(f"{name} has {c.shape[0]} cameras for a batch of {batch}")
