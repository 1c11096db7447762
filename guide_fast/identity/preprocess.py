"""The two preprocessing paths of the official code (docs/face_models.md §1.4 and §2.3).

* ID-loss path (`idloss_crop`): differentiable, on generator renders in [-1, 1]:
  bilinear resize to 256 (align_corners=False, no antialias) -> crop rows 35:223, columns
  32:220 -> AdaptiveAvgPool2d(112). No further normalisation.
* Evaluation path: an MTCNN-aligned uint8 112x112 RGB crop (see align.py), then ToTensor +
  Normalize(mean 0.5, std 0.5), i.e. x / 127.5 - 1 (`normalize_uint8`).

Also the conversions between the image kinds the package accepts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

if TYPE_CHECKING:
    import PIL.Image

    #: One image as the identity code takes it: a PIL image, a numpy array (HxW, HxWx1/3/4;
    #: uint8 or float in [0, 1]) or a [3, H, W] tensor in [-1, 1].
    ImageLike = Union[PIL.Image.Image, np.ndarray, torch.Tensor]

IDLOSS_RESIZE = 256
IDLOSS_CROP = (slice(35, 223), slice(32, 220))  # rows, columns of the 256 image (188 x 188)
FACE_SIZE = 112


def idloss_crop(images: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] renders in [-1,1] (any H, W) -> [N,3,112,112], as pSp/GUIDE's IDLoss.extract_feats.

    The resize is applied even when the input is not 512 (the tiny test generator renders 64x64),
    so the crop always selects the same part of the face.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"images has shape {list(images.shape)}, expected [N, 3, H, W]")
    x = images
    if tuple(x.shape[-2:]) != (IDLOSS_RESIZE, IDLOSS_RESIZE):
        x = F.interpolate(x, size=(IDLOSS_RESIZE, IDLOSS_RESIZE), mode="bilinear", align_corners=False)
    x = x[:, :, IDLOSS_CROP[0], IDLOSS_CROP[1]]
    return F.adaptive_avg_pool2d(x, (FACE_SIZE, FACE_SIZE))


def normalize_uint8(images: "np.ndarray | torch.Tensor") -> torch.Tensor:
    """uint8 RGB images [N,H,W,3] (array or tensor) or [H,W,3] -> float [N,3,H,W] in [-1,1]:
    ToTensor (/255) then Normalize([0.5]*3, [0.5]*3) (docs/face_models.md §2.3 step 4)."""
    t = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if t.dtype != torch.uint8:
        raise InputError(f"normalize_uint8 expects uint8 images, got {t.dtype}")
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[-1] != 3:
        raise InputError(f"images has shape {list(t.shape)}, expected [N, H, W, 3] uint8")
    x = t.permute(0, 3, 1, 2).float().div(255.0)
    return (x - 0.5) / 0.5


def renders_to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] (or [3,H,W]) renders in [-1,1] -> uint8 [N,H,W,3], as GUIDE saves its PNGs:
    (x * 127.5 + 128).clamp(0, 255) truncated to uint8 (docs/guide.md §4.2 evaluates those files)."""
    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] != 3:
        raise InputError(f"images has shape {list(images.shape)}, expected [N, 3, H, W]")
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_rgb_uint8(image: "ImageLike", name: str = "image") -> np.ndarray:
    """One image of any common kind -> contiguous uint8 HxWx3 RGB array.

    Accepts a PIL image (any mode: grayscale, RGBA, palette, 16-bit, ...), a numpy array HxW,
    HxWx1, HxWx3 or HxWx4 (uint8, or float in [0, 1]; the alpha channel is dropped), or a torch
    tensor [3,H,W] / [1,H,W] in [-1, 1] (the generator's convention).
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA").convert("RGB")  # drop alpha (no compositing)
        elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(image).astype(np.float64)
            if not np.isfinite(arr).all():  # a float TIFF can hold NaN / inf: no pixel value to make of them
                raise InputError(f"{name}: a {image.mode}-mode image with non-finite pixel values (NaN or inf)")
            hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
            arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=-1))
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    if torch.is_tensor(image):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise InputError(f"{name}: tensor of shape {list(image.shape)}, expected [3, H, W] in [-1, 1]")
        if image.dtype == torch.uint8:
            arr = image.permute(1, 2, 0).cpu().numpy()
        elif not image.is_floating_point() or not bool(torch.isfinite(image).all()):
            raise InputError(f"{name}: tensor of dtype {image.dtype} with non-finite values or not floating point; "
                             "expected uint8 or floats in [-1, 1]")
        else:
            arr = renders_to_uint8(image.expand(3, -1, -1))[0]
        return np.ascontiguousarray(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            pass
        elif arr.ndim == 2:
            arr = arr[..., None]
        else:
            raise InputError(f"{name}: array of shape {list(arr.shape)}, expected HxW, HxWx1, HxWx3 or HxWx4")
        if arr.dtype == np.uint8:
            pass
        elif arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif np.issubdtype(arr.dtype, np.floating):
            finite = np.isfinite(arr)
            if not finite.all() or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
                raise InputError(
                    f"{name}: float array with values outside [0, 1] (or non-finite); pass uint8 "
                    "0-255, floats in [0, 1], or a torch tensor in [-1, 1]"
                )
            arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif arr.dtype == np.uint16:
            arr = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        else:
            raise InputError(f"{name}: unsupported array dtype {arr.dtype}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        elif arr.shape[-1] == 4:
            arr = arr[..., :3]
        return np.ascontiguousarray(arr)
    raise InputError(
        f"{name}: unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor"
    )
