"""File output that is never half-written: write to a temporary name beside the target, then
rename over it (atomic on POSIX). Every file guide-fast writes goes through here."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path in the target's folder; on success rename it to `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_image(path, image) -> None:
    """Save an image atomically. image: PIL.Image, uint8 HxWx3 array, or a [3,H,W] tensor in [-1, 1]."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = image
        if hasattr(arr, "detach"):
            arr = to_uint8(arr)
        image = Image.fromarray(np.asarray(arr))
    fmt = Path(path).suffix.lstrip(".").upper() or "PNG"
    fmt = "JPEG" if fmt == "JPG" else fmt
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def to_uint8(image):
    """[3,H,W] or [N,3,H,W] tensor in [-1,1] -> uint8 HxWx3 (or NxHxWx3) array, as the EG3D
    scripts do: (x * 127.5 + 128).clamp(0, 255) (eg3d.md §1.3)."""
    x = image.detach().float().cpu()
    x = (x * 127.5 + 128).clamp(0, 255).to(dtype=__import__("torch").uint8)
    return x.movedim(-3, -1).numpy()
