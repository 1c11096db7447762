"""The average latent w_avg: GUIDE's file or the mapping network's buffer (docs/guide.md §2, §3.4).

GUIDE reads `w_avg_ffhqrebalanced512-128.pt`, a float tensor [14, 512] (docs/formats.md), and
uses it twice: as the offset of the GOAE encoder (w_u = GOAE(x) + w_avg) and as the centre of
the UFO target (w_t = w_avg - d (w_u - w_avg) / ||w_u - w_avg||_F). Its maintainers say the file
is the mapping network's tracked average (`backbone.mapping.w_avg`, [512]) repeated per layer,
so without a file guide-fast uses that buffer; `w_avg_distance` shows how far a file is from it.

One `AverageLatent` serves a whole run (optimisation start, encoder offset, UFO target), and the
run's report says where it came from.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from ..eg3d.generator import TriPlaneGenerator

MAPPING_BUFFER = "mapping buffer"


@dataclass(frozen=True)
class AverageLatent:
    """w_avg as a W+ latent [num_ws, w_dim] (float32, CPU) and where it came from: source is
    "mapping buffer", "file <sha256>" or "tensor" (given through the API); path names the file."""

    latent: torch.Tensor
    source: str
    path: str | None = None

    @classmethod
    def from_generator(cls, generator: "TriPlaneGenerator") -> "AverageLatent":
        """The mapping network's buffer [w_dim], repeated for every layer."""
        buf = generator.w_avg.detach().float().cpu()
        return cls(buf.reshape(1, -1).expand(generator.num_ws, -1).clone(), MAPPING_BUFFER)

    def to(self, device: "torch.device | str") -> torch.Tensor:
        return self.latent.to(device)

    def to_dict(self) -> dict:
        d = {"source": self.source, "shape": list(self.latent.shape)}
        if self.path is not None:
            d["path"] = self.path
        return d


#: GUIDE's file is for EG3D FFHQ 512: 14 W+ rows of 512.
OFFICIAL_SHAPE = (14, 512)


def _layout(generator) -> tuple[int, int]:
    return OFFICIAL_SHAPE if generator is None else (int(generator.num_ws), int(generator.config.w_dim))


def _as_latent(t: torch.Tensor, generator, label: str) -> torch.Tensor:
    """[w_dim], [num_ws, w_dim] or [1, num_ws, w_dim] -> [num_ws, w_dim] float32, checked
    (generator None: GUIDE's layout, 14 x 512)."""
    num_ws, w_dim = _layout(generator)
    if not (t.is_floating_point()):
        raise InputError(f"{label} holds a {str(t.dtype).replace('torch.', '')} tensor; expected floating point "
                         f"(w_avg is a float tensor [{num_ws}, {w_dim}])")
    shape = tuple(t.shape)
    if shape == (w_dim,):
        t = t.reshape(1, w_dim).expand(num_ws, w_dim)
    elif shape == (1, num_ws, w_dim):
        t = t[0]
    elif shape != (num_ws, w_dim):
        hint = ""
        if shape == OFFICIAL_SHAPE and (num_ws, w_dim) != OFFICIAL_SHAPE:
            hint = f" ({list(OFFICIAL_SHAPE)} is GUIDE's file for EG3D FFHQ 512, not for this generator)"
        raise InputError(f"{label} has shape {list(shape)}; expected [{num_ws}, {w_dim}] (num_ws x w_dim, the "
                         f"layout of GUIDE's file), [1, {num_ws}, {w_dim}] or [{w_dim}] for this generator{hint}")
    t = t.detach().float().cpu()
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{label} holds {bad} non-finite value(s) (NaN or inf)")
    return t.contiguous().clone()


def _read_tensor(path: Path, label: str) -> torch.Tensor:
    """The one tensor (or the entry 'w_avg') in a .pt/.pth, .npy or .safetensors file, read
    through the checkpoints' file layer (nothing in the file is run)."""
    from ..checkpoints.files import read_tensor_file

    obj = read_tensor_file(path, label)
    if isinstance(obj, dict):
        if "w_avg" in obj and not torch.is_tensor(obj["w_avg"]):  # not silently another entry instead
            raise InputError(f"{label} {path}: the entry 'w_avg' holds a {type(obj['w_avg']).__name__}, not a tensor")
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        key = "w_avg" if "w_avg" in tensors else (next(iter(tensors)) if len(tensors) == 1 else None)
        if key is None:
            names = ", ".join(sorted(map(str, obj))[:8]) or "nothing"
            raise InputError(f"{label} {path}: expected one tensor (or an entry 'w_avg'), found {names}")
        obj = tensors[key]
    if not torch.is_tensor(obj):
        raise InputError(f"{label} {path} holds a {type(obj).__name__}, not a tensor")
    return obj


def load_w_avg(path: "str | os.PathLike", generator: "TriPlaneGenerator | None" = None,
               what: str = "w_avg file") -> AverageLatent:
    """Read a w_avg file for `generator` (None: GUIDE's 14 x 512 layout): GUIDE's [14, 512]
    tensor, also [1, 14, 512] or [512] (then repeated per layer); floating point and finite.
    Errors name the file and the problem (InputError / CheckpointError, exit code 2 in the CLI)."""
    from ..checkpoints import sha256_file

    path = Path(path)
    label = f"{what} {path}"
    t = _read_tensor(path, what)
    latent = _as_latent(t, generator, label)
    return AverageLatent(latent, f"file {sha256_file(path)}", str(path))


def resolve_w_avg(w_avg: "str | os.PathLike | torch.Tensor | AverageLatent | None",
                  generator: "TriPlaneGenerator") -> AverageLatent:
    """None: the mapping buffer; a path: load_w_avg; a tensor ([w_dim], [num_ws, w_dim] or
    [1, num_ws, w_dim]); an AverageLatent: checked against the generator."""
    if w_avg is None:
        return AverageLatent.from_generator(generator)
    if isinstance(w_avg, AverageLatent):
        return AverageLatent(_as_latent(w_avg.latent, generator, f"w_avg ({w_avg.source})"), w_avg.source, w_avg.path)
    if isinstance(w_avg, (str, os.PathLike)):
        return load_w_avg(w_avg, generator)
    if torch.is_tensor(w_avg):
        return AverageLatent(_as_latent(w_avg, generator, "w_avg tensor"), "tensor")
    raise InputError(f"w_avg must be a file path, a tensor or None (the mapping buffer), got {type(w_avg).__name__}")


def w_avg_distance(w_avg: "str | os.PathLike | torch.Tensor | AverageLatent | None",
                   generator: "TriPlaneGenerator") -> dict:
    """How far a w_avg (file path, tensor or AverageLatent) is from the generator's mapping
    buffer repeated per layer: max_abs = max |file - buffer|, rel_frobenius = ||file - buffer||_F /
    ||buffer||_F (over all num_ws x w_dim entries), and the layer with the largest difference."""
    given = resolve_w_avg(w_avg, generator)
    buffer = AverageLatent.from_generator(generator).latent.double()
    diff = given.latent.double() - buffer
    per_layer = diff.abs().amax(dim=1)
    norm = float(buffer.norm())
    return {
        "source": given.source,
        "max_abs": float(diff.abs().max()),
        "rel_frobenius": float(diff.norm()) / norm if norm > 0 else (0.0 if float(diff.norm()) == 0 else math.inf),
        "worst_layer": int(per_layer.argmax()),
        "identical": bool(torch.equal(given.latent, buffer.float())),
    }
