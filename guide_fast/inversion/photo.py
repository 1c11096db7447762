"""Reading photos: files, PIL images, arrays and tensors to uint8 RGB; folders of photos.

Nothing here knows about faces or the generator (framing.py cuts the EG3D crop).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from ..errors import InputError
from ..identity.preprocess import to_rgb_uint8

if TYPE_CHECKING:
    from collections.abc import Sequence

    import PIL.Image
    import torch

    from .framing import AlignedPhoto

    #: What one photo may be given as (load_photo, invert_images): a path, a PIL image, a numpy
    #: array, a [3, H, W] tensor in [-1, 1], or an already aligned photo.
    PhotoSource = Union[str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor, AlignedPhoto]

#: Files taken as photos when a folder is given (`--image DIR`, `--others DIR`).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_photo(source: "PhotoSource", name: str | None = None) -> tuple[np.ndarray, str]:
    """A photo -> (uint8 HxWx3 RGB array, display name).

    source: a path (JPEG, PNG, ...; EXIF orientation applied), a PIL image, a numpy array (gray,
    RGB, RGBA; uint8 or float in [0, 1]) or a [3, H, W] tensor in [-1, 1]. Unreadable files raise
    InputError naming the file.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise InputError(f"{label}: photo not found")
        if path.is_dir():
            raise InputError(f"{label}: is a folder, expected an image file")
        if not path.is_file():  # a FIFO, socket or device: reading it could block forever
            raise InputError(f"{label}: not a regular file (a pipe, socket or device?), expected an image file")
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as im:
                im.load()  # decode now, so truncated / corrupt files fail here
                im = ImageOps.exif_transpose(im)
                arr = to_rgb_uint8(im, name=label)
        except InputError:
            raise
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise InputError(f"{label}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
        return arr, label
    label = name or f"{type(source).__name__} image"
    return to_rgb_uint8(source, name=label), label


def list_photos(folder: "str | os.PathLike") -> list[Path]:
    """The image files directly in a folder, sorted by name (GUIDE's OOD protocol sorts the
    folder's names too, docs/guide.md §3.3). Files with other suffixes are skipped."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"{folder}: not a folder of photos")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not found:
        raise InputError(f"{folder}: no photos found (looked for {', '.join(PHOTO_SUFFIXES)})")
    return found


def expand_photo_sources(images: "PhotoSource | Sequence[PhotoSource]") -> list:
    """One photo, a list of photos, or folders among them -> a flat list; each folder becomes
    its photos (list_photos order). Non-path items (arrays, PIL images, ...) pass through."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            out.extend(list_photos(item))
        else:
            out.append(item)
    return out
