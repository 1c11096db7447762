"""The one file-reading layer: torch .pt/.pth, .npy and .safetensors files, read without
running anything from them and without trusting any size they declare (docs/formats.md §2).

Every loader of the project (generator, face-recognition backbones, LPIPS/VGG, FID Inception,
GOAE, w_avg, latents, `guide-fast weights`) reads through here. Each error is a
CheckpointError naming the file (and the field or byte offset) and saying what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..io import short_list
from .interpret import Interpreter
from .torch_archive import read_archive, read_storage_bytes

BUDGET_SLACK = 64 << 20   # tensors of a file may take at most 2 x its size + this
MAX_SAFETENSORS_HEADER = 100 << 20

SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def sha256_file(path: "str | os.PathLike") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_budget(nbytes: int) -> int:
    """The most bytes the tensors read from a file of `nbytes` may take."""
    return 2 * int(nbytes) + BUDGET_SLACK


def check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder; expected a file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty")


def read_bytes(path: Path, what: str) -> bytes:
    check_file(path, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    except MemoryError:
        raise CheckpointError(f"{what} {path}: too large to read into memory") from None


def read_torch_file(path: "str | os.PathLike",
                    what: str = "file") -> "torch.Tensor | dict | list | tuple | int | float | str | bytes | None":
    """The contents of a torch.save file (zip or legacy), read by guide-fast's own inert parser:
    tensors, (ordered) dicts, lists, tuples, numbers and strings only; any other Python object is
    refused, and nothing in the file is ever called (stricter than torch.load(weights_only=True))."""
    path = Path(path)
    data = read_bytes(path, what)
    head = data[:4]
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{what} {path}: not a PyTorch file: one written by torch.save is a zip archive or "
                              f"a pickle, this one starts with {head!r} (read as torch.load(weights_only=True) "
                              "would, never running code from the file)")
    source = f"{what} {path}"
    try:
        root, interp = read_archive(data, source, lambda: Interpreter(source, tensor_budget(len(data)),
                                                                          allow_objects=False,
                                                                          embedded_storage=read_storage_bytes))
        value = interp.value(root, "the saved object")
    except CheckpointError as exc:
        if "allow-list" in str(exc) or "only tensors and containers" in str(exc):
            raise CheckpointError(f"{exc}; files are read as torch.load(weights_only=True) would: Python objects "
                                  "other than tensors are refused") from None
        raise
    return _plain(value)


def read_state_dict(path: "str | os.PathLike", what: str = "weight file") -> "OrderedDict[str, torch.Tensor]":
    """A state dict (name -> tensor) from a torch file, unwrapping {'state_dict': ...} and
    stripping a `module.` (DataParallel) prefix. CheckpointError naming the file on any failure."""
    path = Path(path)
    obj = read_torch_file(path, what)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path}: holds a {type(obj).__name__}, expected a state_dict (dict of tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{what} {path}: entries that are not tensors: {bad[:5]}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = OrderedDict((k[len("module."):], v) for k, v in obj.items())
    return OrderedDict(obj)


def _plain(value):
    """Memory views (raw bytes) -> bytes in what the caller gets."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        out = type(value)() if type(value) is not dict else OrderedDict()
        for k, v in value.items():
            out[k] = _plain(v)
        return out
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def read_npy_file(path: "str | os.PathLike", what: str = "file", mmap: bool = False) -> np.ndarray:
    """A plain numeric .npy array (allow_pickle=False); its declared shape is checked against the
    bytes in the file before numpy allocates anything."""
    path = Path(path)
    check_file(path, what)
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise CheckpointError(f"{what} {path}: not a .npy array file (it does not start with the .npy "
                                      "magic bytes)")
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise CheckpointError(f"{what} {path}: unsupported .npy version {version}")
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f, max_header_size=1 << 16)
            header_end = f.tell()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for a malformed header
        raise CheckpointError(f"{what} {path}: unreadable .npy header: {_first_line(exc)}") from None
    if dtype.hasobject:
        raise CheckpointError(f"{what} {path}: an object array (pickled Python objects), refused; "
                              "expected a numeric array")
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise CheckpointError(f"{what} {path}: an array of dtype {dtype}; expected a numeric array")
    nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
    have = path.stat().st_size - header_end
    if nbytes > have:
        raise CheckpointError(f"{what} {path}: declares shape {list(shape)} ({nbytes:,} bytes) but holds {have:,} "
                              "bytes of data (truncated?)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{what} {path}: unreadable .npy file (truncated?): {_first_line(exc)}") from None


def read_safetensors(path: "str | os.PathLike",
                     what: str = "file") -> "tuple[OrderedDict[str, torch.Tensor], dict[str, str]]":
    """-> (name -> tensor, metadata dict). The header is parsed and checked here (dtype allow-list,
    shapes, offsets inside the data and covering it exactly) before any tensor is made."""
    path = Path(path)
    data = read_bytes(path, what)
    label = f"{what} {path}" if what != "file" else str(path)

    def bad(msg):
        raise CheckpointError(f"{label}: not a readable safetensors file: {msg}")

    if len(data) < 8:
        bad("shorter than its 8-byte header length")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > min(MAX_SAFETENSORS_HEADER, len(data) - 8):
        bad(f"header length {hlen:,} exceeds the file ({len(data):,} bytes; truncated?)")
    def unique_object(pairs):  # a name given twice: json keeps the last, other readers may not
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"the name {next(k for k in keys if keys.count(k) > 1)!r} occurs twice")
        return dict(pairs)

    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"), object_pairs_hook=unique_object)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, and ints of 4300+ digits
        bad(f"header is not JSON ({_first_line(exc)})")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        bad("__metadata__ is not a map of strings")
    for text in [*header, *meta, *meta.values()]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a JSON escape of a lone surrogate: not text (the safetensors library refuses it)
            bad(f"the name or metadata {text[:40]!r} is not valid Unicode")
    body = memoryview(data)[8 + hlen:]
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            bad(f"tensor {name!r}: malformed header entry")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in SAFETENSORS_DTYPES:
            bad(f"tensor {name!r}: dtype {dt!r} is not accepted (expected one of {', '.join(SAFETENSORS_DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 48 for s in shape)):
            bad(f"tensor {name!r}: shape {str(shape)[:60]} is not a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= len(body)):
            bad(f"tensor {name!r}: data offsets {str(offs)[:60]} are outside the data ({len(body):,} bytes)")
        dtype = SAFETENSORS_DTYPES[dt]
        if math.prod(s for s in shape if s) > 1 << 48:
            bad(f"tensor {name!r}: shape {shape} is far larger than any file")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offs[1] - offs[0] != nbytes:
            bad(f"tensor {name!r}: shape {shape} needs {nbytes:,} bytes, its data has {offs[1] - offs[0]:,}")
        entries.append((offs[0], offs[1], name, dtype, shape))
    pos = 0
    for start, end, name, _, _ in sorted(entries):
        if start != pos:
            bad(f"tensor {name!r}: data overlaps another tensor or leaves a gap")
        pos = end
    if pos != len(body):
        bad(f"{len(body) - pos:,} bytes of data belong to no tensor")
    tensors = OrderedDict()
    for start, end, name, dtype, shape in sorted(entries, key=lambda e: e[2]):
        raw = bytearray(body[start:end])
        t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensors[name] = t.view(dtype).reshape(shape)
    return tensors, meta


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------- latent files
def read_tensor_file(path: "str | os.PathLike", what: str = "file") -> "torch.Tensor | dict | list | tuple":
    """What a small tensor file holds, by its suffix: .safetensors -> dict name -> tensor (its
    checked header), .npy -> one tensor (a plain numeric array), anything else -> the contents
    of a torch.save file (read_torch_file). The latent and w_avg readers pick their tensor from it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return dict(read_safetensors(path, what)[0])
    if suffix == ".npy":
        arr = np.asarray(read_npy_file(path, what))
        # torch takes native byte order only: a big-endian array ('>f4') is converted, value for value
        return torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("=")))
    return read_torch_file(path, what)


LATENT_KEYS = ("w_source", "w_u", "w", "ws", "latents", "latent", "w_plus")


def load_latents(path: "str | os.PathLike", what: str = "latent file", key: str | None = None) -> torch.Tensor:
    """A latent tensor from .safetensors / .pt / .pth / .npy (read without executing anything):
    the tensor itself, the entry `key`, else the entry named w_source (or w_u, w, ws, latents,
    ...), else the only tensor in the file. Returned as float32, shape as stored; complex or
    integer latents are refused rather than cast."""
    path = Path(path)
    obj = read_tensor_file(path, what)
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if key is not None:
            if key not in tensors:
                raise CheckpointError(f"{what} {path} has no tensor {key!r} (file has {short_list(obj, 8)})")
            found = key
        else:
            found = next((k for k in LATENT_KEYS if k in tensors), None)
            if found is None and len(tensors) == 1:
                found = next(iter(tensors))
        if found is None:
            raise CheckpointError(f"{what} {path}: no latent tensor found (looked for {', '.join(LATENT_KEYS)}; "
                                  f"file has {short_list(obj, 8)})")
        obj = tensors[found]
    if not torch.is_tensor(obj):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a tensor")
    if not obj.is_floating_point():
        raise CheckpointError(f"{what} {path}: latents of dtype {str(obj.dtype).replace('torch.', '')}; expected "
                              "real floating-point values")
    return obj.float()
