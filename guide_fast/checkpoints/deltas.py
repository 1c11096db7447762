"""Weight deltas: what an unlearning run changed, applied and reverted bit-exactly
(docs/formats.md §4).

A delta holds, for every `backbone.synthesis.*` parameter, the difference unlearned - source
in float64. The difference of two float32 numbers is exact in float64 unless their exponents
are far apart; the few elements where `source + d` or `unlearned - d` would not round back to
the exact float32 value are found when the delta is written and stored as a patch (their index
with both exact values), so applying and reverting are bit-exact always.

Metadata: the source's and the result's weight fingerprints, the source file's sha256, the
source generator's config, the result's history. Applying (sign +1) requires the generator
to be the source, reverting (sign -1) requires it to be the result; a delta without metadata is
refused unless the caller forces it.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError, InputError
from .files import read_safetensors
from .format import SYNTHESIS_PREFIX, _is_fingerprint, check_history, history_with, state_fingerprint, \
    write_safetensors

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..eg3d.generator import TriPlaneGenerator

DELTA_FORMAT = "guide-fast/delta"
DELTA_VERSION = "2"
FIX = "::fix_"             # <name>::fix_index / ::fix_source / ::fix_result: the exact-value patch
RESERVED_META = ("format", "format_version", "source_sha256", "source_fingerprint", "result_fingerprint",
                 "config", "history")


def compute_delta(source: "TriPlaneGenerator", unlearned: "TriPlaneGenerator") -> "OrderedDict[str, torch.Tensor]":
    """unlearned - source for the `backbone.synthesis.*` parameters (the only ones GUIDE trains),
    in float64 (exact for all but far-apart magnitudes; see save_delta for those)."""
    src = dict(source.named_parameters())
    out = OrderedDict()
    for name, p in unlearned.named_parameters():
        if name not in src or tuple(src[name].shape) != tuple(p.shape):
            raise InputError(f"the generators differ in architecture at parameter {name}")
        if name.startswith(SYNTHESIS_PREFIX):
            out[name] = (p.detach().cpu().double() - src[name].detach().cpu().double()).contiguous()
        elif not torch.equal(p.detach().cpu(), src[name].detach().cpu()):
            raise InputError(f"parameter {name} differs between the generators but is outside backbone.synthesis")
    return out


def _patch(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor):
    """Indices (flat) where b + d != a or a - d != b after rounding to a's dtype."""
    fwd = (b.double() + d).to(a.dtype)
    back = (a.double() - d).to(b.dtype)
    bad = ~((fwd.view(torch.int32) == a.view(torch.int32)) & (back.view(torch.int32) == b.view(torch.int32))) \
        if a.dtype == torch.float32 else ~((fwd == a) & (back == b))
    return torch.nonzero(bad.reshape(-1)).reshape(-1)


def save_delta(source: "TriPlaneGenerator", unlearned: "TriPlaneGenerator", path: "str | os.PathLike",
               extra: dict | None = None) -> Path:
    """Safetensors of the synthesis-weight differences with the source's and the result's
    fingerprints, the source config and the result's history. `extra`: more metadata (strings,
    or JSON-encoded); it cannot replace the reserved keys."""
    delta = compute_delta(source, unlearned)
    src = dict(source.named_parameters())
    res = dict(unlearned.named_parameters())
    tensors = OrderedDict()
    for name, d in delta.items():
        tensors[name] = d
        a = res[name].detach().cpu().contiguous()
        b = src[name].detach().cpu().contiguous()
        idx = _patch(a, b, d)
        if idx.numel():
            tensors[name + FIX + "index"] = idx
            tensors[name + FIX + "source"] = b.reshape(-1)[idx].clone()
            tensors[name + FIX + "result"] = a.reshape(-1)[idx].clone()
    result_fp = state_fingerprint(unlearned)
    meta = {
        "format": DELTA_FORMAT,
        "format_version": DELTA_VERSION,
        "source_sha256": getattr(source, "source_sha256", None) or "",
        "source_fingerprint": state_fingerprint(source),
        "result_fingerprint": result_fp,
        "config": json.dumps(source.config.to_dict()),   # the generator's, whatever `extra` holds
        "history": json.dumps(getattr(unlearned, "checkpoint_history", None) or history_with(unlearned, result_fp)),
    }
    for k, v in (extra or {}).items():
        if k in RESERVED_META:
            raise InputError(f"save_delta: metadata key {k!r} is reserved (it describes the generator)")
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    write_safetensors(path, tensors, meta, "the weight delta")
    return Path(path)


def load_delta(path: "str | os.PathLike") -> "tuple[OrderedDict[str, torch.Tensor], dict]":
    """-> (delta: name -> tensor (float64 differences and their patches), metadata dict)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"delta file not found: {path}")
    delta, meta = read_safetensors(path, "delta file")
    if meta.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {DELTA_FORMAT!r}")
    if meta.get("format_version") != DELTA_VERSION:
        raise CheckpointError(f"{path}: delta format version {meta.get('format_version')!r}; this guide-fast reads "
                              f"version {DELTA_VERSION} (bit-exact float64 differences with both fingerprints); an "
                              "older delta's float32 differences cannot be applied exactly: write it again")
    for key in ("source_fingerprint", "result_fingerprint"):
        if not _is_fingerprint(meta.get(key)):
            raise CheckpointError(f"{path}: metadata {key!r} is missing or not a sha256 hex digest")
    if meta.get("history"):
        try:
            check_history(json.loads(meta["history"]), str(path))
        except (ValueError, RecursionError):
            raise CheckpointError(f"{path}: metadata 'history' is not JSON") from None
    _check_delta_tensors(delta, str(path))
    return delta, meta


def _check_delta_tensors(delta, source: str) -> None:
    for name, t in delta.items():
        base, _, fix = name.partition(FIX)
        if not base.startswith(SYNTHESIS_PREFIX):
            raise CheckpointError(f"{source}: delta tensor {name!r} is outside backbone.synthesis")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            # NaN or inf in a weight difference makes a broken generator whose fingerprint the
            # file can still name: refused here, whatever the metadata says
            raise CheckpointError(f"{source}: delta tensor {name!r} holds {int((~torch.isfinite(t)).sum())} "
                                  "non-finite value(s) (NaN or inf)")
        if not fix:
            if t.dtype != torch.float64:
                raise CheckpointError(f"{source}: delta tensor {name!r} is {t.dtype}, expected float64")
            continue
        if fix not in ("index", "source", "result") or base not in delta:
            raise CheckpointError(f"{source}: delta tensor {name!r} is not a patch of a delta tensor")
        idx = delta.get(base + FIX + "index")
        if idx is None or idx.dtype != torch.int64 or idx.ndim != 1:
            raise CheckpointError(f"{source}: delta patch {base + FIX}index is missing or not int64 [K]")
        if fix == "index":
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= delta[base].numel()):
                raise CheckpointError(f"{source}: delta patch {name!r} indexes outside {base}")
        elif t.ndim != 1 or t.shape[0] != idx.shape[0] or not t.is_floating_point():
            raise CheckpointError(f"{source}: delta patch {name!r} does not match its index")


def _check_sign(sign) -> int:
    if isinstance(sign, bool) or not isinstance(sign, (int, float)) or not math.isfinite(sign) or sign not in (1, -1):
        raise InputError(f"sign must be +1 (apply) or -1 (revert), got {sign!r}")
    return int(sign)


def apply_delta(gen: "TriPlaneGenerator", delta: "Mapping[str, torch.Tensor]", meta: dict | None = None, sign: int = 1,
                check_source: bool = True, force: bool = False) -> "TriPlaneGenerator":
    """Apply (sign=+1: source -> unlearned) or revert (sign=-1: unlearned -> source) a delta in
    place, bit-exactly; returns gen. The generator must be the delta's source (+1) or result (-1)
    by weight fingerprint; check_source=False skips that check. A delta without metadata is
    refused unless force=True. On any error gen is left unchanged."""
    sign = _check_sign(sign)
    if not meta:
        if not force:
            raise CheckpointError("refusing a delta without metadata: nothing says which generator it belongs to "
                                  "(pass force=True to apply it anyway)")
    want_before = want_after = None
    if meta:
        fps = (meta.get("source_fingerprint"), meta.get("result_fingerprint"))
        if not all(_is_fingerprint(f) for f in fps) and not force:
            raise CheckpointError("the delta's metadata lacks its source and result fingerprints")
        want_before, want_after = fps if sign > 0 else fps[::-1]
    if check_source and want_before and _is_fingerprint(want_before):
        fp = state_fingerprint(gen)
        if fp != want_before:
            role = "source" if sign > 0 else "result (unlearned generator)"
            raise CheckpointError(f"this delta was made from a different {role}: the generator's weights "
                                  f"(fingerprint {fp[:12]}…) are not the delta's {role} ({want_before[:12]}…)")
    params = dict(gen.named_parameters())
    new = {}
    for name, d in delta.items():
        if FIX in name:
            continue
        if name not in params:
            raise CheckpointError(f"delta tensor {name!r} has no counterpart in the generator")
        p = params[name]
        if tuple(p.shape) != tuple(d.shape):
            raise CheckpointError(f"delta tensor {name!r} has shape {list(d.shape)}, generator has {list(p.shape)}")
        value = (p.detach().cpu().double() + sign * d).to(p.dtype)
        idx = delta.get(name + FIX + "index")
        if idx is not None and idx.numel():
            exact = delta[name + FIX + ("result" if sign > 0 else "source")]
            value.view(-1)[idx] = exact.to(p.dtype)
        if not bool(torch.isfinite(value).all()):  # e.g. a finite float64 difference beyond float32's range
            raise CheckpointError(f"applying the delta makes {name!r} non-finite (NaN or inf); the generator is "
                                  "left unchanged")
        new[name] = value
    old = {name: params[name].detach().clone() for name in new}
    with torch.no_grad():
        for name, value in new.items():
            params[name].copy_(value.to(params[name].device))
    if meta and want_after and _is_fingerprint(want_after) and check_source:
        fp = state_fingerprint(gen)
        if fp != want_after:  # cannot happen for a delta written by save_delta: undo, never a hybrid
            with torch.no_grad():
                for name, value in old.items():
                    params[name].copy_(value)
            raise CheckpointError("the delta did not reproduce its recorded weights (a corrupt delta?); the "
                                  "generator was left unchanged")
    if meta:
        history = _history_from(meta)
        if history:
            gen.checkpoint_history = history if sign > 0 else history[:-1]
    return gen


def _history_from(meta: dict) -> list:
    try:
        history = json.loads(meta.get("history") or "[]")
    except (ValueError, RecursionError):
        return []
    return history if isinstance(history, list) else []


def revert_delta(gen: "TriPlaneGenerator", delta: "Mapping[str, torch.Tensor]", meta: dict | None = None,
                 force: bool = False) -> "TriPlaneGenerator":
    """Revert a delta in place (unlearned -> source), bit-exactly; the generator must be its result."""
    return apply_delta(gen, delta, meta, sign=-1, force=force)
