"""Generators: loading (official pickle or guide-fast safetensors), the project's own format,
fingerprints and the checkpoint history (docs/formats.md §3).

Own format: one safetensors file whose metadata holds the JSON config, the sha256 of the
checkpoint it came from, the neural rendering resolution, and `history`: the chain of weight
fingerprints from the original checkpoint through every unlearning run (parent -> result).

Whatever the source, a generator is built only after its config has been type- and
range-checked and every tensor's name, shape and dtype matched against that config (on the
meta device: nothing is allocated for a config the file cannot back with bytes).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError, GuideFastError, InputError
from ..io import atomic_path, write_error
from .files import check_file, read_safetensors, sha256_file
from .keys import describe_mismatch

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..eg3d.generator import GeneratorConfig, TriPlaneGenerator

GENERATOR_FORMAT = "guide-fast/generator"
FORMAT_VERSION = "1"
MAX_HISTORY = 1000
SYNTHESIS_PREFIX = "backbone.synthesis."
EXACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # widen to fp32 without loss


# --------------------------------------------------------------------------- fingerprints
def state_fingerprint(module_or_state: "torch.nn.Module | Mapping[str, torch.Tensor]") -> str:
    """sha256 over (name, dtype, shape, bytes) of every state_dict entry: identifies a set of
    weights independently of the file format it came from."""
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_fingerprint(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def check_history(history, source: str) -> list[dict]:
    """A checkpoint's history as stored: a list of {action, parent, result, ...} steps whose
    fingerprints chain (each step's parent is the result of the one before)."""
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        raise CheckpointError(f"{source}: metadata 'history' is not a list of at most {MAX_HISTORY} steps")
    prev = None
    out = []
    for i, step in enumerate(history):
        if not isinstance(step, dict) or not _is_fingerprint(step.get("result")):
            raise CheckpointError(f"{source}: metadata 'history' step {i} has no result fingerprint")
        parent = step.get("parent")
        if parent is not None and not _is_fingerprint(parent):
            raise CheckpointError(f"{source}: metadata 'history' step {i} has a malformed parent fingerprint")
        if i and parent != prev:
            raise CheckpointError(f"{source}: metadata 'history' step {i} does not continue from step {i - 1} "
                                  f"(parent {str(parent)[:12]}, previous result {prev[:12]})")
        if not all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in step.items()):
            raise CheckpointError(f"{source}: metadata 'history' step {i} holds non-scalar values")
        prev = step["result"]
        out.append(dict(step))
    return out


def history_with(gen, fingerprint: str | None = None, **step) -> list[dict]:
    """gen's history, extended so that its last result is `fingerprint` (the current weights):
    by `step` when given (e.g. action='unlearn'), else by an 'origin' or 'modified' step."""
    fp = fingerprint or state_fingerprint(gen)
    history = [dict(s) for s in (getattr(gen, "checkpoint_history", None) or [])]
    last = history[-1]["result"] if history else None
    if step:
        history.append({"action": step.pop("action", "modified"), "parent": last, "result": fp, **step})
    elif last != fp:
        if last is None:
            history.append({"action": "origin", "parent": None, "result": fp,
                            "source_sha256": getattr(gen, "source_sha256", None) or None})
        else:
            history.append({"action": "modified", "parent": last, "result": fp})
    return history


# --------------------------------------------------------------------------- building
def describe_non_finite(state: "Mapping[str, torch.Tensor]") -> str | None:
    """None if every floating tensor is finite, else 'N non-finite values in K tensors (first: name)'."""
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return None
    return f"{sum(n for _, n in bad):,} non-finite values in {len(bad)} tensors (first: {bad[0][0]})"


def expected_state(config) -> "OrderedDict[str, torch.Tensor]":
    """The generator's state dict for `config`, on the meta device (names, shapes, dtypes only)."""
    from ..eg3d.generator import TriPlaneGenerator

    with torch.device("meta"):
        return TriPlaneGenerator(config).state_dict()


def _check_dtypes(state, source: str) -> None:
    for k, v in state.items():
        if v.dtype in EXACT_DTYPES:
            continue
        if v.dtype == torch.float64:
            if bool(torch.isfinite(v).all()) and torch.equal(v.to(torch.float32).to(torch.float64), v):
                continue
            raise CheckpointError(f"{source}: tensor {k} is float64 with values float32 cannot hold exactly; "
                                  "refusing to round the weights")
        kind = "complex" if v.dtype.is_complex else "integer" if not v.is_floating_point() else "unsupported"
        raise CheckpointError(f"{source}: tensor {k} has {kind} dtype {str(v.dtype).replace('torch.', '')}; the "
                              "generator's weights are real floating-point numbers (refusing to cast)")


def build_and_fill(config: "GeneratorConfig", state: "Mapping[str, torch.Tensor]", source: str,
                   renderer: str = "reference") -> "TriPlaneGenerator":
    """Check `state` against `config` (names, shapes, dtypes, finiteness), then build the module."""
    from ..eg3d.generator import TriPlaneGenerator

    try:
        expected = expected_state(config)
    except (InputError, ValueError, RuntimeError, TypeError, ZeroDivisionError, AssertionError) as exc:
        raise CheckpointError(f"{source}: generator config cannot be built: {str(exc)[:200]}") from None
    problems = describe_mismatch(state, expected)
    if problems:
        raise CheckpointError(f"{source}: tensors do not match the EG3D generator of this config: {problems}")
    _check_dtypes(state, source)
    non_finite = describe_non_finite(state)
    if non_finite:
        raise CheckpointError(f"{source}: {non_finite}; refusing a generator that can only render garbage")
    gen = TriPlaneGenerator(config, renderer=renderer)
    gen.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
    return gen.eval().requires_grad_(False)


# --------------------------------------------------------------------------- loading
def _as_path(path: "str | os.PathLike", name: str = "path") -> Path:
    """Path(path), refusing what is not a path (None, a number, bytes) by name: pathlib's own
    TypeError would reach the user as a traceback."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{name} must be a file path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def load_generator(path: "str | os.PathLike", renderer: str = "reference", device: "torch.device | str | None" = None,
                   key: str = "G_ema") -> "TriPlaneGenerator":
    """Load a generator from an official EG3D pickle (G_ema) or guide-fast's safetensors format.

    Nothing from the file is executed and no declared size is trusted. The generator records
    `source_sha256` (of the original checkpoint) and `checkpoint_history` (its fingerprint chain).
    """
    path = _as_path(path)
    if not path.exists():
        raise CheckpointError(f"generator checkpoint not found: {path}")
    check_file(path, "generator checkpoint")
    kind = _sniff(path)
    if kind == "pickle":
        from .eg3d_pickle import config_from_official, read_official_pickle

        obj, state = read_official_pickle(path, key=key)
        config = config_from_official(obj, state, str(path))
        gen = build_and_fill(config, state, str(path), renderer)
        gen.source_sha256 = sha256_file(path)
        gen.checkpoint_history = history_with(gen)
    elif kind == "safetensors":
        gen = _load_safetensors_generator(path, renderer)
    else:
        raise CheckpointError(f"{path}: neither an EG3D network pickle nor a guide-fast safetensors file")
    if device is not None:
        gen = gen.to(device)
    return gen


def read_generator_metadata(path) -> dict:
    """The checked metadata of a guide-fast generator file: config (a GeneratorConfig),
    source_sha256, history (list of steps)."""
    from ..eg3d.generator import GeneratorConfig

    path = _as_path(path)
    tensors, meta = read_safetensors(path, "generator checkpoint")
    if meta.get("format") != GENERATOR_FORMAT:
        raise CheckpointError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {GENERATOR_FORMAT!r}")
    if meta.get("format_version") not in (None, FORMAT_VERSION):
        raise CheckpointError(f"{path}: metadata 'format_version' is {meta.get('format_version')!r}; this guide-fast "
                              f"reads version {FORMAT_VERSION}")
    try:
        cfg = json.loads(meta["config"])
    except KeyError:
        raise CheckpointError(f"{path}: metadata 'config' is missing") from None
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an int of 4300+ digits
        raise CheckpointError(f"{path}: metadata 'config' is not JSON ({str(exc)[:200]})") from None
    try:
        config = GeneratorConfig.from_dict(cfg)
    except InputError as exc:
        raise CheckpointError(f"{path}: metadata 'config': {exc}") from None
    nrr = meta.get("neural_rendering_resolution")
    if nrr is not None and nrr != str(config.neural_rendering_resolution):
        raise CheckpointError(f"{path}: metadata 'neural_rendering_resolution' is {nrr!r}, but the config says "
                              f"{config.neural_rendering_resolution}")
    history = []
    if meta.get("history"):
        try:
            history = json.loads(meta["history"])
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: metadata 'history' is not JSON ({str(exc)[:200]})") from None
        history = check_history(history, str(path))
    sha = meta.get("source_sha256") or None
    if sha is not None and not _is_fingerprint(sha):
        raise CheckpointError(f"{path}: metadata 'source_sha256' is not a sha256 hex digest")
    return {"config": config, "source_sha256": sha, "history": history, "tensors": tensors}


def _load_safetensors_generator(path: Path, renderer: str):
    info = read_generator_metadata(path)
    gen = build_and_fill(info["config"], info["tensors"], str(path), renderer)
    gen.source_sha256 = info["source_sha256"] or sha256_file(path)
    gen.checkpoint_history = info["history"]
    gen.checkpoint_history = history_with(gen)
    return gen


# --------------------------------------------------------------------------- writing
def write_safetensors(path, tensors, meta: dict, what: str) -> None:
    """Atomically write tensors + metadata; never a file holding non-finite weights. A failed
    write (disk full, ...) is one InputError and leaves an earlier file at `path` intact."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    non_finite = describe_non_finite(tensors)
    if non_finite:
        raise GuideFastError(f"refusing to write {path}: {what} has {non_finite}")
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise write_error(path, exc) from None


def save_generator(gen: "TriPlaneGenerator", path: "str | os.PathLike", source_sha256: str | None = None) -> Path:
    """Write the generator as one safetensors file (config, provenance and history in its metadata)."""
    path = _as_path(path)
    state = OrderedDict((k, v.detach().to("cpu").contiguous().clone()) for k, v in gen.state_dict().items())
    history = history_with(gen, state_fingerprint(state))
    meta = {
        "format": GENERATOR_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(gen.config.to_dict()),
        "neural_rendering_resolution": str(gen.config.neural_rendering_resolution),
        "source_sha256": source_sha256 or getattr(gen, "source_sha256", None) or "",
        "history": json.dumps(history),
    }
    write_safetensors(path, state, meta, "the generator")
    return path


def convert(src: "str | os.PathLike", dst: "str | os.PathLike") -> Path:
    """Official pickle (or own format) -> guide-fast safetensors, keeping the source sha256."""
    gen = load_generator(src)
    return save_generator(gen, dst, source_sha256=gen.source_sha256)


def checkpoint_history(path: "str | os.PathLike") -> dict:
    """{fingerprint, source_sha256, history} of a generator file, for `guide-fast history`.
    A pickle's history is its own origin step."""
    gen = load_generator(path)
    return {"fingerprint": state_fingerprint(gen), "source_sha256": gen.source_sha256,
            "history": gen.checkpoint_history}
