"""The one comparison of a file's tensors with what a network expects (names and shapes).

Used by every loader: the EG3D generator (before the module is built), the face-recognition
backbones, LPIPS/VGG, the FID Inception and `guide-fast weights`.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import CheckpointError


def _shape(v) -> tuple:
    return tuple(int(s) for s in (v.shape if hasattr(v, "shape") else v))


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in _shape(shape)) + "]"


def compare_keys(state: Mapping, expected: Mapping, optional_suffixes: "tuple[str, ...]" = ("num_batches_tracked",),
                 optional: "tuple[str, ...] | set[str]" = ()) -> list[str]:
    """Differences between `state` (name -> tensor) and `expected` (name -> tensor or shape), in
    expected order: 'missing KEY (expected SHAPE)', 'shape mismatch KEY: file S, expected E',
    then 'unexpected KEY SHAPE'. Keys ending in an optional suffix, or named in `optional`, may
    be absent (docs/face_models.md §0)."""
    optional = set(optional)
    diffs = []
    for key, shape in expected.items():
        if key not in state:
            if not (optional_suffixes and key.endswith(tuple(optional_suffixes))) and key not in optional:
                diffs.append(f"missing {key} (expected {fmt_shape(shape)})")
        elif not hasattr(state[key], "shape"):
            diffs.append(f"shape mismatch {key}: file holds a {type(state[key]).__name__}, expected {fmt_shape(shape)}")
        elif _shape(state[key]) != _shape(shape):
            diffs.append(f"shape mismatch {key}: file {fmt_shape(state[key])}, expected {fmt_shape(shape)}")
    for key, value in state.items():
        if key not in expected:
            diffs.append(f"unexpected {key} {fmt_shape(value) if hasattr(value, 'shape') else type(value).__name__}")
    return diffs


def describe_mismatch(state: Mapping, expected: Mapping, optional: "tuple[str, ...] | set[str]" = (), limit: int = 4,
                      optional_suffixes: "tuple[str, ...]" = ()) -> str:
    """'' when `state` matches `expected`, else one line: the counts of missing, unexpected and
    wrong-shape keys with the first `limit` of each."""
    diffs = compare_keys(state, expected, optional_suffixes=optional_suffixes, optional=optional)
    groups = {"missing key(s)": [], "unexpected key(s)": [], "shape mismatch(es)": []}
    for d in diffs:
        kind = ("missing key(s)" if d.startswith("missing") else
                "unexpected key(s)" if d.startswith("unexpected") else "shape mismatch(es)")
        groups[kind].append(d.split(" ", 2)[-1] if kind == "shape mismatch(es)" else d.split(" ", 1)[1])
    parts = []
    for kind, items in groups.items():
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > limit else ""
            parts.append(f"{len(items)} {kind}: " + ", ".join(items[:limit]) + more)
    return "; ".join(parts)


def check_weight_values(state: Mapping, source, integer_suffixes: "tuple[str, ...]" = ("num_batches_tracked",)) -> None:
    """CheckpointError naming `source` unless every tensor of a network's weights is floating point
    (integers only under names ending in `integer_suffixes`, BatchNorm's counters) and finite:
    names and shapes can be right while the values are NaN, inf or integers, which would make a
    network that scores nothing (NaN embeddings) or a load that fails halfway."""
    import torch

    ints = [k for k, v in state.items() if torch.is_tensor(v) and not v.is_floating_point()
            and not str(k).endswith(tuple(integer_suffixes))]
    if ints:
        raise CheckpointError(f"{source}: {len(ints)} weight tensor(s) are not floating point, e.g. "
                              + ", ".join(f"{k} ({state[k].dtype})" for k in ints[:3]))
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: non-finite values (NaN / inf) in {len(bad)} tensor(s), e.g. {bad[:3]}")
    # the networks run in float32 (or lower): a finite float64 1e300 would be inf there
    big = [k for k, v in floats.items() if v.dtype == torch.float64 and not bool(torch.isfinite(v.float()).all())]
    if big:
        raise CheckpointError(f"{source}: float64 values beyond float32's range in {len(big)} tensor(s), e.g. {big[:3]}")
